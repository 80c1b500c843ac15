"""A tiny Hugging Face ViT trained on real data: scikit-learn's bundled 8x8 handwritten digits.

Used where a pass must be judged on task accuracy rather than on output distance alone (repbn's
acceptance test, benchmarks). Everything is seeded and single-process, so the trained weights are
the same on every run with the same torch build. Training (40 epochs, one intra-op thread) takes
about 15 s on a 2-core CPU (up to 30 s on a busy one) and is cached per process
(:func:`functools.lru_cache`); callers always get a fresh model. Test accuracy: 97.2% (seed 0).

Data: the 1,797 digits, pixel values 0..16 scaled to [-1, 1], as ``(N, 1, 8, 8)`` images;
a stratified 70/30 train/test split with a fixed seed (1,257 train / 540 test images).
Model: ``ViTForImageClassification`` with patch 2 (16 patches + CLS), hidden 48, 2 layers,
4 heads, MLP 96, 10 labels.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["DigitsData", "DigitsViT", "accuracy", "digits_data", "digits_vit", "seeded", "single_thread", "train",
           "vit_config"]

IMAGE = 8
TEST_FRACTION = 0.3
SPLIT_SEED = 0
EPOCHS = 40
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 0.05


@dataclass(frozen=True)
class DigitsData:
    """The digits split as tensors: images ``(N, 1, 8, 8)`` float32 in [-1, 1], labels int64."""

    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)

    def train_batches(self, batch: int = 64, n: int | None = None) -> list[tuple[torch.Tensor]]:
        """The training images in fixed order, as ``(pixel_values,)`` tuples of ``batch`` images
        (the last partial batch dropped); at most ``n`` of them. The form ``calibration=`` takes."""
        count = len(self.x_train) // batch
        count = count if n is None else min(n, count)
        return [(self.x_train[i * batch:(i + 1) * batch],) for i in range(count)]


@dataclass(frozen=True)
class DigitsViT:
    """A trained model, its data and its measured test accuracy (a fraction in [0, 1])."""

    model: nn.Module
    data: DigitsData
    test_accuracy: float
    seconds: float  # how long the training run behind the cached weights took

    @property
    def example_inputs(self) -> tuple[torch.Tensor]:
        return (self.data.x_test[:8],)


@functools.lru_cache(maxsize=1)
def digits_data() -> DigitsData:
    """Load and split scikit-learn's bundled digits (no download)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                           stratify=digits.target)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return DigitsData(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def vit_config():
    """The ``ViTConfig`` of the digits model."""
    from transformers import ViTConfig

    return ViTConfig(image_size=IMAGE, patch_size=2, num_channels=1, hidden_size=48, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=96, num_labels=10,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256, *, pad: bool = False) -> float:
    """Top-1 accuracy of ``model(pixel_values)`` (an HF output with ``.logits`` or a tensor).

    ``pad``: every call gets exactly ``batch`` images, the last batch padded with copies of its first
    image (not counted): for graphs traced at a fixed batch size.
    """
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            k = len(xb)
            if pad and k < batch:
                xb = torch.cat([xb, xb[:1].expand(batch - k, *xb.shape[1:])])
            out = model(xb)
            logits = out.logits if hasattr(out, "logits") else out
            correct += int((logits[:k].argmax(-1) == y[i:i + k]).sum())
    return correct / len(x)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, restoring the caller's setting afterwards.

    The matmuls here are (64*17) x 48: far too small to split. With two threads on a busy 2-core
    CI machine each step measured 14x slower (0.28 s vs 0.02 s) from threads spinning on each
    other, and one thread also makes the reductions' order, hence the weights, reproducible.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seeded(model_class: type, config, seed: int) -> nn.Module:
    """``model_class`` (a Hugging Face model) built from ``config`` with its weights drawn from ``seed``
    (the caller's random state untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class._from_config(config, attn_implementation="sdpa")


def _new_model(seed: int) -> nn.Module:
    from transformers import ViTForImageClassification

    return seeded(ViTForImageClassification, vit_config(), seed)


@functools.lru_cache(maxsize=4)
def _train(seed: int) -> tuple[dict[str, torch.Tensor], float, float]:
    """Train once per process and seed; return (state dict, test accuracy, seconds)."""
    import time

    start = time.perf_counter()
    with single_thread():
        state, acc = _fit(seed)
    return state, acc, time.perf_counter() - start


def train(model: nn.Module, data: DigitsData, *, seed: int, epochs: int, lr: float,
          weight_decay: float = WEIGHT_DECAY, batch: int = BATCH, log=None) -> dict[str, torch.Tensor]:
    """AdamW + one-cycle schedule on the training split, fixed batch order per seed (the digits ViT's and
    DeiT's training). Leaves ``model`` trained, in eval mode; returns a copy of its state dict.
    ``log(text)``: called once per epoch with the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(data.x_train) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(data.x_train), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            loss = nn.functional.cross_entropy(model(data.x_train[idx]).logits, data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log is not None:
            log(f"epoch {epoch + 1}: loss {loss.item():.3f}")
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fit(seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """Train a fresh model on the training split; its state dict and test accuracy."""
    data = digits_data()
    model = _new_model(seed)
    state = train(model, data, seed=seed, epochs=EPOCHS, lr=LR)
    return state, accuracy(model, data.x_test, data.y_test)


def digits_vit(seed: int = 0) -> DigitsViT:
    """A freshly built ViT with the trained weights for ``seed`` (trained on first use per process).

    Returns a new ``nn.Module`` each call (eval mode), so callers may transform or fine-tune it
    without touching the cached weights.
    """
    state, acc, seconds = _train(seed)
    model = _new_model(seed)
    model.load_state_dict(state)
    return DigitsViT(model.eval(), digits_data(), acc, seconds)
