"""A DeiT-style model trained on scikit-learn's digits with many tokens: patch 1 on 8x8 images.

The digits ViT (:mod:`tests.models.digits_vit`) has 17 tokens and two layers, too few for token
reduction to save much. This one has 64 patches + CLS + a distillation token = 66 tokens and six
layers, the shape of the DeiT models token-reduction papers measure on (a CLS and a distillation
token in front of a square grid), at a size that trains on a CPU: Hugging Face
``DeiTForImageClassification`` (its logits read the CLS token), hidden 48, 4 heads, MLP 96.

Same data and split as the digits ViT; AdamW + one-cycle, 30 epochs, one intra-op thread, seeded.
Training takes a few minutes on a 2-core CPU, so the weights are cached on disk under
``~/.cache/ptool/digits-deit/`` (keyed by seed and the torch version); callers always get a fresh model.
"""

from __future__ import annotations

import functools
import pathlib
import time

import torch
from torch import nn

from tests.models.digits_vit import DigitsViT, accuracy, digits_data, seeded, single_thread, train

__all__ = ["deit_config", "digits_deit"]

EPOCHS = 60
BATCH = 64
LR = 2e-3
WEIGHT_DECAY = 0.05
CACHE = pathlib.Path.home() / ".cache" / "ptool" / "digits-deit"


def deit_config():
    """The ``DeiTConfig`` of the model: patch 1 (64 patches), CLS + distillation token, 6 layers."""
    from transformers import DeiTConfig

    return DeiTConfig(image_size=8, patch_size=1, num_channels=1, hidden_size=48, num_hidden_layers=6,
                      num_attention_heads=4, intermediate_size=96, num_labels=10,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _new_model(seed: int) -> nn.Module:
    from transformers import DeiTForImageClassification

    return seeded(DeiTForImageClassification, deit_config(), seed)


def _fit(seed: int) -> dict[str, torch.Tensor]:
    return train(_new_model(seed), digits_data(), seed=seed, epochs=EPOCHS, lr=LR, weight_decay=WEIGHT_DECAY,
                 batch=BATCH)


@functools.lru_cache(maxsize=2)
def _weights(seed: int) -> tuple[dict[str, torch.Tensor], float]:
    path = CACHE / f"seed{seed}-e{EPOCHS}-lr{LR:g}-torch{torch.__version__.split('+')[0]}.pt"
    start = time.perf_counter()
    if path.exists():
        state = torch.load(path, weights_only=True)
    else:
        with single_thread():
            state = _fit(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    return state, time.perf_counter() - start


def digits_deit(seed: int = 0) -> DigitsViT:
    """A fresh DeiT-style digits model with trained weights (trained once, then read from the cache)."""
    state, seconds = _weights(seed)
    model = _new_model(seed)
    model.load_state_dict(state)
    model.eval()
    data = digits_data()
    with single_thread():
        acc = accuracy(model, data.x_test, data.y_test)
    return DigitsViT(model, data, acc, seconds)
