"""Train a tiny Llama-style byte-level decoder on the Python help texts, with a held-out split for perplexity.

The text is ``pydoc_data.topics.topics`` (the help texts ``help("topic")`` shows, shipped with
Python; Python Software Foundation licence), UTF-8 bytes (vocabulary 256, no tokenizer). Topics
sorted by name; every 8th one is held out (about an eighth of the bytes), the rest is training text.

Model (``transformers.LlamaForCausalLM``): 4 layers, hidden 128, MLP 384 (SwiGLU), 4 query heads
and 2 key/value heads of 32 (grouped-query attention), RoPE, RMSNorm, untied head; 0.85 M
parameters (every Linear width a multiple of 128, so int4 groups of 32 and 128 both fit). Recipe:
1500 AdamW steps (lr 3e-3, warm-up 100, cosine to 10%, weight decay 0.1, gradient clip 1), batch
16 random windows of 128 bytes, seed 0: about 3 M training tokens, 7 passes over the text. About
9 minutes on one thread of a busy 2-core machine (hidden 256 took 4x longer per step); the result is saved to
``~/.cache/ptool/decoder/`` with the recipe and reused while the recipe is the same.

    .venv/bin/python tools/train_decoder.py [--steps 1500] [--force]

As a module: :func:`load` (train if needed) and :func:`perplexity`, :func:`windows`, :func:`evaluation_split`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

CACHE = pathlib.Path.home() / ".cache" / "ptool" / "decoder"
SEQ = 128
#: Windows per perplexity call.
EVAL_BATCH = 8


@dataclasses.dataclass(frozen=True)
class Recipe:
    layers: int = 4
    hidden: int = 128
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 2
    steps: int = 1500
    batch: int = 16
    seq: int = SEQ
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    heldout_every: int = 8


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def corpus(every: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, heldout)`` byte tensors (int64): topics sorted by name, every ``every``-th held out."""
    from pydoc_data.topics import topics

    train, held = [], []
    for i, name in enumerate(sorted(topics)):
        (held if i % every == every - 1 else train).append(topics[name].encode("utf-8"))
    as_tensor = lambda parts: torch.tensor(list(b"\n\n".join(parts)), dtype=torch.long)  # noqa: E731
    return as_tensor(train), as_tensor(held)


def windows(data: torch.Tensor, seq: int = SEQ, count: int | None = None) -> torch.Tensor:
    """Non-overlapping ``(n, seq)`` windows of ``data`` from its start (the first ``count`` if given)."""
    n = data.numel() // seq if count is None else min(count, data.numel() // seq)
    return data[: n * seq].view(n, seq)


def evaluation_split(batch: int = EVAL_BATCH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train bytes, held-out bytes, held-out windows)``: the windows cut to a multiple of ``batch``, so
    every :func:`perplexity` call has one shape (what the benchmarks measure held-out perplexity on)."""
    train, held = corpus(Recipe().heldout_every)
    heldout = windows(held)
    return train, held, heldout[: heldout.shape[0] // batch * batch]


def build(recipe: Recipe) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
                         num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                         num_key_value_heads=recipe.kv_heads, max_position_embeddings=2 * recipe.seq,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


class Logits(nn.Module):
    """``ids (batch, seq) -> logits (batch, seq, 256)``: the decoder without a cache, one tensor out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def perplexity(run: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, batch: int = EVAL_BATCH) -> float:
    """``exp(mean NLL)`` of every next byte inside each window (``data``: ``(n, seq)``, ``n`` a multiple
    of ``batch``: every call has one shape)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, data.shape[0] - batch + 1, batch):
            ids = data[i:i + batch]
            logits = torch.as_tensor(run(ids)).float()
            nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def train(recipe: Recipe) -> tuple[nn.Module, dict]:
    train_data, held = corpus(recipe.heldout_every)
    model = build(recipe)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()
    start = time.perf_counter()
    for step in range(recipe.steps):
        starts = torch.randint(0, train_data.numel() - recipe.seq - 1, (recipe.batch,), generator=gen)
        ids = torch.stack([train_data[s:s + recipe.seq] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == recipe.steps - 1:
            log(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    seconds = time.perf_counter() - start
    heldout = windows(held, recipe.seq)
    heldout = heldout[: heldout.shape[0] // 8 * 8]
    ppl = perplexity(Logits(model), heldout)
    log(f"held-out perplexity {ppl:.3f} after {seconds:.0f} s")
    return model, {"train_seconds": seconds, "heldout_perplexity": ppl, "train_bytes": train_data.numel(),
                   "heldout_bytes": held.numel(), "parameters": sum(p.numel() for p in model.parameters())}


def load(recipe: Recipe = Recipe(), force: bool = False, folder: pathlib.Path = CACHE) -> tuple[nn.Module, dict]:
    """The trained decoder (``LlamaForCausalLM``, eval mode) and its training facts; trained and saved
    to ``folder`` unless a model of the same recipe is there."""
    from transformers import LlamaForCausalLM

    meta_path = folder / "meta.json"
    wanted = dataclasses.asdict(recipe)
    if not force and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe") == wanted:
            return LlamaForCausalLM.from_pretrained(folder).eval(), meta
    model, facts = train(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    meta = {"recipe": wanted, **facts}
    meta_path.write_text(json.dumps(meta, indent=2))
    return model, meta


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=Recipe.steps)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (one: 0.75 s a step on a busy 2-core machine, where two took 3 s)")
    p.add_argument("--force", action="store_true", help="train again even if a saved model has this recipe")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    _, meta = load(Recipe(steps=a.steps), force=a.force)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
