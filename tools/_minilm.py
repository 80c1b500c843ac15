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


def calibration_batches(seq: int, batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Packed rows of the reference text (not the held-out sentences)."""
    return packed_batches(reference_sentences(), seq, batch, count=count)


def mean_cosine(reference, model, batches) -> float:
    """Mean cosine between the two models' sentence embeddings over ``batches``."""
    values = []
    with torch.no_grad():
        for args in batches:
            values.append(torch.nn.functional.cosine_similarity(reference(*args), model(*args), dim=-1))
    return float(torch.cat(values).mean())
