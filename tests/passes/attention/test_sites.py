"""Attention site detection: exactly one site per attention layer, in every form, and nothing else."""

import pytest
import torch
from torch import nn

from ptool.ir.record import record_values
from ptool.passes.attention.sites import find_sites, measured_causal
from ptool.passes.attention.swap import sites_of
from tests.models import zoo

CAUSAL = {"bert": False, "vit": False, "gpt2": True, "llama": True}


def _sites(fixture):
    gm = fixture.export().module()
    return sites_of(gm, (fixture.example_inputs, fixture.example_kwargs))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2", "llama"])
def test_one_site_per_layer_with_geometry(kind, impl):
    sites = _sites(getattr(zoo, kind)(attn_implementation=impl))
    assert [s.index for s in sites] == [0, 1]
    assert [s.form for s in sites] == [impl, impl]
    for layer, s in enumerate(sites):
        assert s.problem is None
        assert f".{layer}." in s.module + "."
        assert (s.heads, s.head_dim, s.value_dim) == (4, 8, 8)
        assert s.kv_heads == (2 if kind == "llama" else 4)
        assert s.q_len == s.kv_len == (17 if kind == "vit" else zoo.SEQ_LEN)
        assert s.scale == pytest.approx(8 ** -0.5)
        assert s.causal is CAUSAL[kind]
        if kind != "vit":  # transformers passes ViT an all-true mask, so only text models are asserted
            assert s.masked
        assert s.grid == ((4, 4) if kind == "vit" else None) and s.prefix == (1 if kind == "vit" else 0)


def test_minilm_has_six_sites():
    sites = _sites(zoo.minilm())
    assert len(sites) == 6 and all(s.heads == 12 and s.head_dim == 32 and not s.causal for s in sites)


def test_returned_attention_weights_are_reported_not_replaced():
    f = zoo.bert(attn_implementation="eager")
    kwargs = {**f.example_kwargs, "output_attentions": True}
    gm = torch.export.export(f.model, f.example_inputs, kwargs, strict=False).module()
    sites = find_sites(gm)
    assert len(sites) == 2
    assert all("also used by" in s.problem for s in sites)


class _MHA(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.causal = causal

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if self.causal else None
        return self.mha(x, x, x, need_weights=False, attn_mask=mask, is_causal=self.causal)[0]


@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention_module(causal):
    x = torch.randn(2, 8, 32)
    gm = torch.export.export(_MHA(causal).eval(), (x,), strict=False).module()
    sites = sites_of(gm, ((x,), {}))
    assert len(sites) == 1
    assert (sites[0].heads, sites[0].head_dim, sites[0].causal) == (4, 8, causal)


class _NotAttention(nn.Module):
    """A softmax gate over a weight product, applied to values: no q@k^T of two activations."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 8, 8))

    def forward(self, x):  # x (B, 2, 8, 8)
        return torch.softmax(torch.matmul(x, self.w), dim=-1) @ x


def test_softmax_over_a_weight_product_is_not_attention():
    x = torch.randn(3, 2, 8, 8)
    gm = torch.export.export(_NotAttention(), (x,), strict=False).module()
    assert find_sites(gm) == []


def test_measured_causal_tells_causal_from_padding():
    n = 6
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pad = torch.ones(2, 1, n, n, dtype=torch.bool)
    pad[1, ..., 4:] = False
    assert measured_causal(causal.expand(2, 1, n, n) & pad)
    assert not measured_causal(pad)
    additive = torch.zeros(n, n).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert measured_causal(additive)
    assert not measured_causal(torch.zeros(n, n))


def test_record_values_leaves_the_graph_as_it_was():
    f = zoo.bert()
    gm = f.export().module()
    before = gm.code
    site = find_sites(gm)[0]
    [values] = record_values(gm, [site.q, site.mask], [(f.example_inputs, f.example_kwargs)])
    assert values[site.q].shape == (2, 4, 16, 8) and values[site.mask].dtype == torch.bool
    assert gm.code == before
