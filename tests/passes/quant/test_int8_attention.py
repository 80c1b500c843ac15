"""``quantize:attention=int8``: the int8 attention op (reference, integer kernel, ONNX) and the rewrite."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import ptool
from ptool.errors import PassError
from ptool.ops import quant as ops
from tests.models import zoo

SPEC = "quantize:activations=per-token,attention=int8"


def _operands(shape=(2, 3, 17, 8), kv_len=None, seed=0):
    torch.manual_seed(seed)
    b, h, n, d = shape
    m = kv_len or n
    return torch.randn(b, h, n, d) * 2, torch.randn(b, h, m, d) * 2, torch.randn(b, h, m, d)


def _masks(b, n, m):
    padding = torch.ones(b, 1, 1, m, dtype=torch.bool)
    padding[1, ..., m - 5:] = False
    additive = torch.randn(b, 1, n, m)
    return {"none": (None, False), "padding": (padding, False), "additive": (additive, False),
            "causal": (None, True), "padding+causal": (padding, True)}


@pytest.mark.parametrize("case", ["none", "padding", "additive", "causal", "padding+causal"])
def test_integer_kernel_matches_the_float_reference(case):
    q, k, v = _operands()
    mask, causal = _masks(2, 17, 17)[case]
    got = ops._int8_attention(q, k, v, mask, 0.3, causal)
    want = ops._attention_int8(q, k, v, mask, 0.3, causal)
    assert got.shape == want.shape == (2, 3, 17, 8)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["none", "padding", "additive", "causal", "padding+causal"])
def test_reference_is_close_to_float_attention(case):
    q, k, v = _operands(kv_len=17)
    mask, causal = _masks(2, 17, 17)[case]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3)
    got = ops.attention_int8(q, k, v, mask, 0.3, causal)
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
    step = v.abs().amax() / 127  # the coarsest value grid
    assert (got - want).abs().max() < 3 * step


def test_probability_levels_keep_the_top_weight_exact_and_hide_masked_rows():
    scores = torch.tensor([[0.0, -1.0, 2.0, float("-inf")], [float("-inf")] * 4])
    levels, sums = ops.probability_levels(scores)
    assert levels[0].tolist() == [round(127 * torch.exp(torch.tensor(-2.0)).item()),
                                  round(127 * torch.exp(torch.tensor(-3.0)).item()), 127, 0]
    assert levels[1].tolist() == [0, 0, 0, 0] and sums[1].item() == 1  # a row hidden whole: output 0


def test_unequal_query_and_key_lengths():
    q, k, v = _operands(kv_len=29)
    got = ops._int8_attention(q, k, v, None, 0.35, True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=False, scale=0.35,
                                          attn_mask=torch.ones(17, 29, dtype=torch.bool).tril(12))
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


@functools.cache
def _quantized(model: str, spec: str = SPEC):
    fixture = getattr(zoo, model)()
    return fixture, ptool.transform(fixture.model, [spec], fixture.example_inputs,
                                    example_kwargs=fixture.example_kwargs)


def _attention_nodes(m2) -> int:
    return sum(n.target is torch.ops.ptool_quant.attention_int8.default for n in m2.graph_module.graph.nodes)


@pytest.mark.parametrize("model", ["bert", "vit", "gpt2"])
def test_every_attention_becomes_int8_and_the_model_stays_close(model):
    fixture, m2 = _quantized(model)
    assert _attention_nodes(m2) == 2  # both layers
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default
                   for n in m2.graph_module.graph.nodes)
    args, kwargs = fixture.heldout(1)
    with torch.no_grad():
        cmp = ptool.verify.compare(fixture.run((args, kwargs)), m2(*args, **kwargs))
    assert cmp.cosine > 0.995


def test_attention_runs_on_integer_matmuls_in_torch():
    fixture, m2 = _quantized("bert")
    args, kwargs = fixture.heldout(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        m2(*args, **kwargs)
    names = [e.name for e in prof.events()]
    batch, heads, layers = 2, 4, 2
    linears = 2 * 4 + 1  # fused qkv, o, fc1, fc2 per layer + pooler
    assert names.count("aten::_int_mm") == linears + 2 * batch * heads * layers
    assert not any("scaled_dot_product" in n for n in names)


class _GroupedQuery(torch.nn.Module):
    """4 query heads reading 2 key/value heads through SDPA's own ``enable_gqa``."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def test_grouped_query_attention_is_left_float_with_the_reason():
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    m2 = ptool.transform(_GroupedQuery(), ["quantize:attention=int8"], (q, k, v))
    assert _attention_nodes(m2) == 0
    [skip] = m2.report.records[-1].skipped
    assert "grouped-query" in skip.reason


def test_llama_repeats_its_key_value_heads_before_attention_so_both_sites_convert():
    fixture, m2 = _quantized("llama")
    assert _attention_nodes(m2) == 2
    args, kwargs = fixture.heldout(1)
    with torch.no_grad():
        assert ptool.verify.compare(fixture.run((args, kwargs)), m2(*args, **kwargs)).cosine > 0.995


@pytest.mark.parametrize("model", ["bert", "gpt2"])
def test_onnx_runtime_matches_torch(model):
    fixture, m2 = _quantized(model)
    run = ptool.compile(m2, backend="onnxruntime", example_inputs=fixture.example_inputs,
                        example_kwargs=fixture.example_kwargs)
    args, kwargs = fixture.heldout(2)
    with torch.no_grad():
        assert ptool.verify.compare(m2(*args, **kwargs), run(*args, **kwargs)).max_abs_error < 1e-4


@pytest.mark.slow
def test_tvm_and_torch_compile_match_torch():
    fixture, m2 = _quantized("bert")
    args, kwargs = fixture.heldout(2)
    with torch.no_grad():
        want = m2(*args, **kwargs)
    for backend, options in (("tvm", {}), ("torch", {"compile": True, "freezing": True})):
        run = ptool.compile(m2, backend=backend, example_inputs=fixture.example_inputs,
                            example_kwargs=fixture.example_kwargs, **options)
        with torch.no_grad():
            assert ptool.verify.compare(want, run(*args, **kwargs)).max_abs_error < 1e-4, backend


def test_bad_attention_option_names_the_allowed_values():
    with pytest.raises(PassError, match="float.*int8"):
        ptool.passes.registry.parse_pass("quantize:attention=int4")


def test_a_mask_of_unknown_dtype_is_left_alone_with_the_reason():
    from ptool.passes.quant.int8_attention import unsupported_attention

    graph = torch.fx.Graph()
    q, k, v, mask = (graph.placeholder(name) for name in ("q", "k", "v", "mask"))
    for node in (q, k, v):
        node.meta["val"] = torch.empty(1, 2, 4, 8)
    reason = unsupported_attention({"query": q, "key": k, "value": v, "attn_mask": mask})
    assert reason is not None and "mask's dtype is unknown" in reason
    mask.meta["val"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert unsupported_attention({"query": q, "key": k, "value": v, "attn_mask": mask}) is None
