"""The fixture models themselves: they run, are deterministic, export, and are what they claim."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from tests.models import zoo

ARCHS = sorted(zoo.FIXTURES)


def _leaves(out) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _assert_same(a, b, *, atol: float = 0.0, rtol: float = 0.0) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request) -> zoo.Fixture:
    return zoo.FIXTURES[request.param]()


@pytest.fixture(scope="module", params=[f.name for f in zoo.bn_zoo()])
def bn_case(request) -> zoo.Fixture:
    return next(f for f in zoo.bn_zoo() if f.name == request.param)


# ---------------------------------------------------------------------------------------------
# transformers architectures


def test_arch_runs_and_is_eval(arch: zoo.Fixture) -> None:
    assert not arch.model.training
    out = arch.run()
    assert isinstance(out, (tuple, dict, torch.Tensor)), "a tensor, a tuple or a transformers ModelOutput"
    for leaf in _leaves(out):
        assert torch.isfinite(leaf).all()
        assert leaf.abs().max() < 1e4


def test_arch_is_deterministic(arch: zoo.Fixture) -> None:
    _assert_same(arch.run(), arch.run())
    again = zoo.FIXTURES[arch.name]()
    _assert_same(arch.run(), again.run())
    _assert_same(arch.inputs(0), (arch.example_inputs, arch.example_kwargs))


def test_heldout_batch_same_shapes_different_values(arch: zoo.Fixture) -> None:
    example = _leaves((arch.example_inputs, arch.example_kwargs))
    heldout = _leaves(arch.heldout())
    assert [(t.shape, t.dtype) for t in example] == [(t.shape, t.dtype) for t in heldout]
    assert any(not torch.equal(a, b) for a, b in zip(example, heldout, strict=True))
    out_a, out_b = _leaves(arch.run()), _leaves(arch.run(arch.heldout()))
    assert not torch.allclose(out_a[0], out_b[0])


def test_arch_exports_non_strict(arch: zoo.Fixture) -> None:
    ep = arch.export()
    exported = ep.module()
    for inputs in [(arch.example_inputs, arch.example_kwargs), arch.heldout(), arch.heldout(7)]:
        args, kwargs = inputs
        with torch.no_grad():
            _assert_same(exported(*args, **kwargs), arch.run(inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "minilm"])
def test_export_does_not_specialize_on_mask_values(name: str) -> None:
    """Exported with a padded mask, the graph must still be right for an unpadded one."""
    fixture = zoo.FIXTURES[name]()
    exported = fixture.export().module()
    args, kwargs = fixture.heldout(3)
    named = dict(zip(["input_ids", "attention_mask"], args, strict=False)) | kwargs
    named["attention_mask"] = torch.ones_like(named["attention_mask"])
    args, kwargs = zoo.split_call(fixture.model, named)
    with torch.no_grad():
        _assert_same(exported(*args, **kwargs), fixture.model(*args, **kwargs), atol=1e-5, rtol=1e-5)


def test_llama_is_gqa_rope_causal() -> None:
    f = zoo.llama()
    config = f.model.config
    assert config.num_key_value_heads < config.num_attention_heads
    assert type(f.model.model.rotary_emb).__name__ == "LlamaRotaryEmbedding"
    ids, mask = f.example_inputs
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % config.vocab_size
    logits, logits_changed = f.run()[0], f.run(((changed, mask), {}))[0]
    torch.testing.assert_close(logits[:, :-1], logits_changed[:, :-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[:, -1], logits_changed[:, -1])


def test_bert_attention_mask_hides_padding() -> None:
    f = zoo.bert()
    ids, mask = f.example_inputs
    assert (mask[1] == 0).any(), "row 1 of the example batch is padded"
    changed = ids.masked_fill(mask == 0, 7)
    hidden, hidden_changed = f.run()[0], f.run(((changed, mask), {}))[0]
    keep = mask.bool()
    torch.testing.assert_close(hidden[keep], hidden_changed[keep], atol=1e-5, rtol=1e-5)


def test_norms_are_not_identity() -> None:
    for f in (zoo.resnet(), zoo.mobilenet_v2()):
        bns = [m for m in f.model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and f.folds == len(bns)
        for bn in bns:
            assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
            assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
            assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
    for f in (zoo.bert(), zoo.llama()):
        norms = [m for m in f.model.modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))]
        assert norms
        assert all(not torch.allclose(m.weight, torch.ones_like(m.weight)) for m in norms)


def test_minilm_has_real_weights_and_text() -> None:
    f = zoo.minilm()
    assert f.model.config.hidden_size == 384 and f.model.config.num_hidden_layers == 6
    ids, mask = f.example_inputs
    assert ids.shape == (zoo.BATCH, zoo.SEQ_LEN) and int(ids[0, 0]) == 101  # [CLS]
    # Trained LayerNorms are far from the ones/zeros init.
    ln = f.model.embeddings.LayerNorm
    assert not torch.allclose(ln.weight, torch.ones_like(ln.weight), atol=0.05)


# ---------------------------------------------------------------------------------------------
# BatchNorm cases


def _scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_var is None:  # batch statistics: fold with whatever a naive pass would use
        return (bn.weight if bn.affine else torch.ones(bn.num_features)), (
            bn.bias if bn.affine else torch.zeros(bn.num_features))
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return scale, shift


def _reference_fold_after(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """Independent reference for layer -> BN, written out per layer type (incl. grouped transposed conv)."""
    layer = __import__("copy").deepcopy(layer)
    scale, shift = _scale_shift(bn)
    with torch.no_grad():
        w = layer.weight
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            g = layer.groups
            shaped = w.view(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
            shaped.mul_(scale.view(g, 1, w.shape[1], *[1] * (w.dim() - 2)))
        else:
            w.mul_(scale.view(-1, *[1] * (w.dim() - 1)))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        layer.bias = nn.Parameter(bias * scale + shift)
    return layer


def _reference_fold_before(bn: nn.Module, conv: nn.Conv2d) -> nn.Conv2d:
    """BN -> conv: conv(x*s + t) = conv'(x) with w' = w*s (per input channel) and b' = b + sum(w*t)."""
    conv = __import__("copy").deepcopy(conv)
    scale, shift = _scale_shift(bn)
    with torch.no_grad():
        extra = (conv.weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
        conv.weight.mul_(scale.view(1, -1, 1, 1))
        conv.bias = nn.Parameter((conv.bias if conv.bias is not None else 0) + extra)
    return conv


def test_bn_case_runs_exports_and_counts(bn_case: zoo.Fixture) -> None:
    bns = [m for m in bn_case.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bn_case.folds + bn_case.keeps == len(bns)
    for bn in bns:
        if bn.running_var is not None:
            assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    _assert_same(bn_case.run(), bn_case.run())
    _assert_same(bn_case.run(), zoo.bn_zoo()[[f.name for f in zoo.bn_zoo()].index(bn_case.name)].run())
    exported = bn_case.export().module()
    args, _ = bn_case.heldout()
    with torch.no_grad():
        _assert_same(exported(*args), bn_case.model(*args), atol=1e-6, rtol=1e-6)
    assert bn_case.calibration(2)[0][0].shape == bn_case.example_inputs[0].shape


def test_bn_case_labels_match_a_reference_fold(bn_case: zoo.Fixture) -> None:
    """Folding by hand is exact where the fixture says ``folds`` and wrong where it says ``keeps``."""
    model = bn_case.model
    args, _ = bn_case.heldout()
    expected = bn_case.run((args, {}))
    if isinstance(model, zoo._Seq):
        layers = list(model.layers)
        first, second = layers[0], layers[1]
        if isinstance(first, nn.modules.batchnorm._BatchNorm):
            folded = nn.Sequential(_reference_fold_before(first, second), *layers[2:])
        else:
            folded = nn.Sequential(_reference_fold_after(first, second), *layers[2:])
        with torch.no_grad():
            got = folded(*args)
        if bn_case.keeps:
            assert not torch.allclose(got, expected, atol=1e-3), f"{bn_case.name} should not fold exactly"
        else:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    elif isinstance(model, zoo._SharedConvOutput):
        folded_conv = _reference_fold_after(model.conv, model.bn)
        with torch.no_grad():
            y = folded_conv(*args)
            got = y + model.side(torch.relu(y))
        assert not torch.allclose(got, expected, atol=1e-3), "folding a shared conv output must change the result"
    else:
        assert isinstance(model, zoo._ResidualBlock)
        c1, c2 = _reference_fold_after(model.conv1, model.bn1), _reference_fold_after(model.conv2, model.bn2)
        (x,) = args
        with torch.no_grad():
            got = torch.relu(c2(torch.relu(c1(x))) + x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bn_batchstats_case_depends_on_the_batch() -> None:
    case = next(f for f in zoo.bn_zoo() if f.name == "conv2d_bn_batchstats")
    (x,), _ = case.inputs(0)
    full = case.run(((x,), {}))
    half = case.run(((x[:1],), {}))
    assert not torch.allclose(full[:1], half, atol=1e-4), "eval BN without running stats uses batch statistics"


def test_randomize_batchnorm_is_seeded() -> None:
    a, b = nn.BatchNorm2d(5), nn.BatchNorm2d(5)
    assert zoo.randomize_batchnorm(a, 3) == 1 and zoo.randomize_batchnorm(b, 3) == 1
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(tensor, b.state_dict()[name])
    assert (a.running_var >= 0.5).all()
