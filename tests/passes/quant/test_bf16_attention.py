"""``quantize:attention=bf16``: attention written out with bf16 products and a float32 softmax."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import ptool
from ptool.verify import compare
from tests.models import zoo

SPEC = "quantize:activations=per-token,attention=bf16"


class _Attention(torch.nn.Module):
    """SDPA on its inputs, with one of the mask forms SDPA takes."""

    def __init__(self, mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None):
        super().__init__()
        self.mask, self.causal, self.scale = mask, causal, scale

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal, scale=self.scale)


def _operands(seed=0):
    torch.manual_seed(seed)
    return torch.randn(2, 3, 17, 8) * 2, torch.randn(2, 3, 19, 8) * 2, torch.randn(2, 3, 19, 8)


def _masks():
    padding = torch.ones(2, 1, 1, 19, dtype=torch.bool)
    padding[1, ..., 14:] = False
    return {"none": None, "padding": padding, "additive": torch.randn(2, 1, 17, 19)}


def _products(m2) -> list[torch.fx.Node]:
    return [n for n in m2.graph_module.graph.nodes if n.target is torch.ops.aten.matmul.default]


@pytest.mark.parametrize("mask", ["none", "padding", "additive"])
def test_it_computes_sdpa_to_bf16_rounding_with_every_mask_form(mask):
    q, k, v = _operands()
    model = _Attention(_masks()[mask], scale=0.3)
    m2 = ptool.transform(model, ["quantize:attention=bf16"], (q, k, v))
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default
                   for n in m2.graph_module.graph.nodes)
    products = _products(m2)
    assert len(products) == 2 and all(a.meta["val"].dtype == torch.bfloat16 for p in products for a in p.args)
    q, k, v = _operands(seed=1)  # other values than the traced ones
    with torch.no_grad():
        cmp = compare(model(q, k, v), m2(q, k, v))
    assert cmp.cosine > 0.9999
    assert cmp.max_rel_error < 0.02  # scaled queries, keys, values and exponentials rounded to bf16 (relative 2^-9) once each


def test_causal_and_grouped_query_attention_stay_as_they_are_with_the_reason():
    q, k, v = _operands()
    m2 = ptool.transform(_Attention(causal=True), ["quantize:attention=bf16"], (q, k[:, :, :17], v[:, :, :17]))
    [skip] = m2.report.records[-1].skipped
    assert "causal" in skip.reason and not _products(m2)
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    gqa = _Attention()
    gqa.forward = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    m2 = ptool.transform(gqa, ["quantize:attention=bf16"], (q, k, v))
    [skip] = m2.report.records[-1].skipped
    assert "grouped-query" in skip.reason


@functools.cache
def _quantized(model: str, spec: str = SPEC):
    fixture = getattr(zoo, model)()
    return fixture, ptool.transform(fixture.model, [spec], fixture.example_inputs,
                                    example_kwargs=fixture.example_kwargs)


@pytest.mark.parametrize("model", ["bert", "vit"])
def test_every_attention_site_is_written_out_and_adds_little_to_int8_linears(model):
    fixture, m2 = _quantized(model)
    _, linears_only = _quantized(model, "quantize:activations=per-token")
    assert len(_products(m2)) == 2 * 2  # two layers, two products each
    assert m2.report.records[-1].notes["bf16_attention"]
    args, kwargs = fixture.heldout(2)
    with torch.no_grad():
        assert compare(linears_only(*args, **kwargs), m2(*args, **kwargs)).cosine > 0.9999
        assert compare(fixture.run((args, kwargs)), m2(*args, **kwargs)).cosine > 0.995


def test_a_padding_mask_shared_by_the_layers_becomes_one_additive_term():
    fixture, m2 = _quantized("bert")
    graph = m2.graph_module.graph
    [term] = [n for n in graph.nodes if n.target is torch.ops.aten.log.default]  # log(1) = 0, log(0) = -inf
    assert len(term.users) == 2 and all(u.target is torch.ops.aten.add.Tensor for u in term.users)
    assert not any(n.target is torch.ops.aten.masked_fill.Scalar for n in graph.nodes)
    args, kwargs = fixture.heldout(2)
    assert (args[1] == 0).any()  # the attention mask: the held-out batch pads some keys
    with torch.no_grad():
        assert compare(fixture.run((args, kwargs)), m2(*args, **kwargs)).cosine > 0.995


@pytest.mark.slow
def test_the_backends_match_torch():
    fixture, m2 = _quantized("bert")
    args, kwargs = fixture.heldout(2)
    with torch.no_grad():
        want = m2(*args, **kwargs)
    for backend, options in (("torch", {"compile": True, "freezing": True}), ("onnxruntime", {}), ("tvm", {})):
        run = ptool.compile(m2, backend=backend, example_inputs=fixture.example_inputs,
                            example_kwargs=fixture.example_kwargs, **options)
        with torch.no_grad():
            cmp = compare(want, run(*args, **kwargs))
        if backend == "torch":  # the same bf16 products
            assert cmp.max_abs_error < 1e-4
        else:  # no bf16 arithmetic there: the products in float32, nearer the float model
            assert cmp.cosine > 0.9999, backend


def test_the_tuner_leaves_it_out_where_the_cpu_has_no_bf16_units():
    from ptool.tune.fingerprint import DeviceFingerprint, device_fingerprint
    from ptool.tune.space import precision_candidates

    fp = device_fingerprint().to_dict()
    plain = DeviceFingerprint.from_dict({**fp, "isa": ["avx512f", "avx512_vnni"]})
    candidates, left_out = precision_candidates([SPEC, "quantize:activations=per-token"], plain)
    assert candidates == [("quantize:activations=per-token",)]
    assert left_out == [((SPEC,), "bf16 left out: this CPU has neither avx512_bf16 nor amx_bf16")]
    rich = DeviceFingerprint.from_dict({**fp, "isa": ["avx512f", "avx512_vnni", "avx512_bf16"]})
    assert precision_candidates([SPEC], rich) == ([(SPEC,)], [])
