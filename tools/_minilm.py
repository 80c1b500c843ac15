"""What the MiniLM evaluation tools share: held-out and calibration batches, the embedding cosine, a log line."""

from __future__ import annotations

import sys

import torch

from ptool.default_model import encode, everyday_sentences, packed_batches, reference_sentences
from ptool.frontends.huggingface import sample_sentences


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def heldout_batches(seq: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 64 held-out sentences shipped with ptool, padded to ``seq``, in batches of ``batch``."""
    sentences = sample_sentences()
    ids, mask = encode(sentences, seq)
    return [(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(sentences) // batch * batch, batch)]


def calibration_batches(seq: int, batch: int, count: int, form: str = "packed",
                        text: str = "python-docs") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of calibration text (never the held-out sentences).

    ``form``: ``packed`` - rows filled with consecutive sentences; ``padded`` - one sentence per
    row padded to ``seq`` (shaped like the real use: variable lengths, padding masks); ``mixed`` -
    alternately one of each (``count // 2`` padded, the rest packed).

    ``text``: ``python-docs`` - the Python reference manual (:func:`reference_sentences`): padded
    batches are taken evenly through the text so they span its topics, packed rows start at its
    beginning; ``wordnet`` - WordNet's everyday usage examples (:func:`everyday_sentences`,
    already shuffled): padded rows take the first sentences, packed rows the ones after
    ``count * batch``, so the two forms never share a sentence.
    """
    if form not in ("packed", "padded", "mixed"):
        raise ValueError(f"form must be 'packed', 'padded' or 'mixed', got {form!r}")
    if text not in ("python-docs", "wordnet"):
        raise ValueError(f"text must be 'python-docs' or 'wordnet', got {text!r}")
    sentences = reference_sentences() if text == "python-docs" else everyday_sentences()
    if form == "packed":
        return packed_batches(sentences, seq, batch, count=count)
    npad = count if form == "padded" else count // 2
    if text == "wordnet":
        ids, mask = encode(sentences[:npad * batch], seq)
        padded = [(ids[i:i + batch], mask[i:i + batch]) for i in range(0, npad * batch, batch)]
        packed_text = sentences[count * batch:]
    else:
        ids, mask = encode(sentences, seq)
        rows = [(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(sentences) // batch * batch, batch)]
        padded = rows[::max(1, len(rows) // count)][:npad]
        packed_text = sentences
    if form == "padded":
        return padded
    packed = packed_batches(packed_text, seq, batch, count=count - npad)
    mixed = [b for pair in zip(padded, packed) for b in pair]
    return mixed + packed[len(mixed) // 2:]


def mean_cosine(reference, model, batches) -> float:
    """Mean cosine between the two models' sentence embeddings over ``batches``."""
    values = []
    with torch.no_grad():
        for args in batches:
            values.append(torch.nn.functional.cosine_similarity(reference(*args), model(*args), dim=-1))
    return float(torch.cat(values).mean())
