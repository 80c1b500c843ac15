"""What the MiniLM evaluation tools share: held-out and calibration batches, the embedding cosine, a log line."""

from __future__ import annotations

import sys

import torch

from ptool.default_model import encode, packed_batches, reference_sentences
from ptool.frontends.huggingface import sample_sentences


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def heldout_batches(seq: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 64 held-out sentences shipped with ptool, padded to ``seq``, in batches of ``batch``."""
    sentences = sample_sentences()
    ids, mask = encode(sentences, seq)
    return [(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(sentences) // batch * batch, batch)]


def calibration_batches(seq: int, batch: int, count: int, form: str = "packed") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of the reference text (never the held-out sentences).

    ``form``: ``packed`` - rows filled with consecutive sentences; ``padded`` - one sentence per
    row padded to ``seq`` (shaped like the real use: variable lengths, padding masks), batches
    taken evenly through the text so they span its topics; ``mixed`` - alternately one of each
    (``count // 2`` padded, the rest packed).
    """
    if form not in ("packed", "padded", "mixed"):
        raise ValueError(f"form must be 'packed', 'padded' or 'mixed', got {form!r}")
    if form == "packed":
        return packed_batches(reference_sentences(), seq, batch, count=count)
    sentences = reference_sentences()
    ids, mask = encode(sentences, seq)
    rows = [(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(sentences) // batch * batch, batch)]
    padded = rows[::max(1, len(rows) // count)][:count]
    if form == "padded":
        return padded
    packed = packed_batches(sentences, seq, batch, count=count - count // 2)
    mixed = [b for pair in zip(padded[:count // 2], packed) for b in pair]
    return mixed + packed[len(mixed) // 2:]


def mean_cosine(reference, model, batches) -> float:
    """Mean cosine between the two models' sentence embeddings over ``batches``."""
    values = []
    with torch.no_grad():
        for args in batches:
            values.append(torch.nn.functional.cosine_similarity(reference(*args), model(*args), dim=-1))
    return float(torch.cat(values).mean())
