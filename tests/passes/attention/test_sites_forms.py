"""Attention in every form: Swin, MaxViT, bmm and mask spellings are sites; talking heads, channel and
factorized attention are reported skips; no softmax feeding a product is silent."""

import pytest
import torch
from torch import nn

import ptool
from ptool.passes.attention.sites import find_sites, scan
from ptool.passes.attention.swap import scan_of
from ptool.passes.registry import parse_pass
from tests.passes.attention import attention_forms as forms
from tests.passes.attention.attention_forms import SwapForSoftmax

PRODUCTS = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default, torch.ops.aten.einsum.default}
SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}


def _graph(factory):
    model, args = factory()
    return model, args, torch.export.export(model, args, strict=False).module()


def _scan(factory):
    _, args, gm = _graph(factory)
    return scan_of(gm, (args, {}))


def _heldout(args):
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(a.shape, generator=gen) for a in args)


def _max_rel_error(model, converted, args):
    with torch.no_grad():
        return ptool.verify.compare(model(*args), converted(*args)).max_rel_error


# ------------------------------------------------------------------------------------ sites
def test_swin_window_attention_keeps_its_bias_and_shift_mask():
    found = _scan(forms.swin)
    assert found.skipped == []
    plain, shifted = found.sites
    for site in (plain, shifted):
        assert (site.form, site.spelling, site.rank) == ("eager", "matmul", 4)
        assert (site.heads, site.head_dim, site.q_len, site.kv_len) == (2, 8, 16, 16)
        assert site.scale == 1.0 and site.q.target is torch.ops.aten.mul.Tensor  # Swin scales q
        assert not site.causal and site.problem is None
    assert plain.module == "blocks.0.attn" and shifted.module == "blocks.1.attn"
    assert plain.bias_names() == ["relative_position_bias_table"]
    assert shifted.bias_names() == ["relative_position_bias_table", "attn_mask"]
    # the bias is added in the canonical (B_, H, N, N) layout; the mask inside the (B, nW, H, N, N) view
    assert not plain.terms[0].layout and not shifted.terms[0].layout
    assert [op.__name__ for op, _ in shifted.terms[1].layout.steps] == ["expand.default", "reshape.default"]
    # -100 is a soft mask (exp(-100) is not 0 to every kernel): it is a bias, not a mask
    assert [t.role for t in shifted.terms] == ["bias", "bias"] and not shifted.masked


def test_roles_without_example_inputs_come_from_the_weights():
    _, _, gm = _graph(forms.swin)
    sites = find_sites(gm)
    assert [[t.role for t in s.terms] for s in sites] == [["bias"], ["bias", "bias"]]


def test_maxvit_5d_einsum_is_flattened_to_batch_heads():
    model, args, gm = _graph(forms.maxvit)
    [site] = scan_of(gm, (args, {})).sites
    assert (site.spelling, site.rank, site.terms) == ("einsum", 5, [])
    assert (site.heads, site.head_dim, site.value_dim, site.q_len) == (2, 8, 8, 16)
    assert site.scale == pytest.approx(8 ** -0.5)
    q = torch.randn(2, 3, 2, 16, 8)  # (B, W, H, N, D) -> (B * W, H, N, D)
    assert torch.equal(site.q_layout.apply(q), q.reshape(6, 2, 16, 8))
    out = torch.randn(6, 2, 16, 8)
    assert torch.equal(site.out_layout.apply(out), out.reshape(2, 3, 2, 16, 8))


def test_tf_einsum_spelling_heads_after_tokens_with_bias():
    [site] = _scan(forms.maxvit_tf).sites
    assert (site.spelling, site.rank, site.heads, site.q_len) == ("einsum", 5, 2, 16)
    assert site.bias_names() == ["rel_bias"]
    q = torch.randn(2, 3, 16, 2, 8)  # (B, W, N, H, D) -> (B * W, H, N, D)
    assert torch.equal(site.q_layout.apply(q), q.permute(0, 1, 3, 2, 4).reshape(6, 2, 16, 8))


def test_bmm_recovers_the_heads_folded_into_the_batch():
    [site] = _scan(forms.bmm).sites
    assert (site.spelling, site.rank, site.heads, site.q_len, site.head_dim) == ("bmm", 3, 2, 12, 8)
    assert site.scale == pytest.approx(8 ** -0.5)


@pytest.mark.parametrize("factory", [forms.swin, forms.maxvit, forms.maxvit_tf, forms.bmm])
def test_rewiring_every_form_is_exact(factory):
    """Softmax in place of softmax: the canonical q, k, v, terms and output layouts are exact."""
    model, args = factory()
    sites = len(_scan(factory).sites)
    converted = ptool.transform(model, [SwapForSoftmax()], args)
    assert converted.report[0].rewritten == sites >= 1
    assert not any(n.target in SOFTMAX for n in converted.graph_module.graph.nodes)
    assert _max_rel_error(model, converted, _heldout(args)) <= 1e-5


# ------------------------------------------------------------------------------------ passes
def test_linear_attention_skips_biased_sites_and_says_why():
    model, args = forms.swin()
    converted = ptool.transform(model, ["linear-attention:transfer_steps=0"], args)
    record = converted.report[0]
    assert record.rewritten == 0
    assert [(s.site, s.reason) for s in record.skipped] == [
        ("attention 0 (blocks.0.attn)", "the scores carry an additive bias (relative_position_bias_table) that "
         "HedgehogKernel cannot apply (it reads masks as key visibility only); the site keeps softmax"),
        ("attention 1 (blocks.1.attn)", "the scores carry an additive bias (relative_position_bias_table, "
         "attn_mask) that HedgehogKernel cannot apply (it reads masks as key visibility only); the site keeps "
         "softmax"),
    ]


def test_topk_over_every_key_keeps_the_swin_bias_applied():
    """top-k with k = every key is softmax: equal outputs prove the bias and shift mask stay applied."""
    model, args = forms.swin()
    converted = ptool.transform(model, ["sparse-attention:method=topk,k=16,transfer_steps=0"], args)
    assert converted.report[0].rewritten == 2 and converted.report[0].skipped == []
    assert _max_rel_error(model, converted, _heldout(args)) <= 1e-5


@pytest.mark.parametrize("spec,factory", [
    ("sigmoid-attention:transfer_steps=0", forms.swin),
    ("sparse-attention:method=topk,k=8,transfer_steps=0", forms.swin),
    ("linear-attention:transfer_steps=0", forms.maxvit),
])
def test_converted_forms_stay_within_the_declared_bound(spec, factory):
    model, args = factory()
    converted = ptool.transform(model, [spec], args)
    record = converted.report[0]
    assert record.rewritten == len(_scan(factory).sites) and record.skipped == []
    bound = parse_pass(spec).numerics.bound
    assert record.within_contract and record.violation is None
    assert bound <= record.fidelity.cosine < 1.0  # changed, and within what the pass promises


# ------------------------------------------------------------------------------------ reported skips
CAIT = ("talking heads: proj_l mixes the heads' scores before the softmax, and proj_w mixes the probabilities "
        "after it (linear layers across heads); the attention kernels compute each head on its own")
XCIT = ("channel attention (XCiT cross-covariance): the softmax runs over a 8x8 channel map q^T k with the 24 "
        "tokens summed; the attention kernels attend over tokens")
COAT = ("factorized attention (CoaT): the softmax normalizes getitem_1 over its 16 tokens (dim -2) on its own and "
        "{product} sums that axis (k^T v); there are no q@k^T scores, and it is already linear in the tokens")


@pytest.mark.parametrize("factory,reason", [
    (forms.cait, CAIT), (forms.xcit, XCIT), (forms.coat, COAT.format(product="matmul")),
    (forms.coat_einsum, COAT.format(product="einsum")),
])
def test_other_softmax_attention_is_a_reported_skip(factory, reason):
    found = _scan(factory)
    assert found.sites == []
    assert [(s.node.name, s.module, s.reason) for s in found.skipped] == [("softmax", "<root>", reason)]


def test_the_pass_report_lists_the_softmaxes_it_did_not_convert():
    model, args = forms.cait()
    converted = ptool.transform(model, ["linear-attention:transfer_steps=0"], args)
    record = converted.report[0]
    assert record.rewritten == 0
    assert [(s.site, s.reason) for s in record.skipped] == [
        ("softmax softmax (<root>)", f"softmax attention, not converted: {CAIT}")]
    assert record.notes["softmax_not_converted"] == 1 and record.notes["attention_sites"] == 0


class _Spelled(nn.Module):
    """Mask and scale spellings of one 4-D attention."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.bias = nn.Parameter(torch.randn(2, 6, 6))

    def forward(self, q, k, v, keep):
        scores = q @ k.transpose(-1, -2)
        if self.how == "masked_fill":
            return (scores * 0.3).masked_fill(~keep, float("-inf")).softmax(-1) @ v
        if self.how == "where":
            return torch.where(keep, scores / 3.0, torch.finfo(q.dtype).min).softmax(-1) @ v
        if self.how == "scale after bias":
            return ((scores + self.bias) * 0.25).softmax(-1) @ v
        if self.how == "minus bias, k scaled":
            return (q @ (k * 0.5).transpose(-1, -2) - self.bias).softmax(-1) @ v
        if self.how == "k q^T":
            return (k @ q.transpose(-1, -2)).softmax(-2).transpose(-1, -2) @ v
        if self.how == "soft fill":
            return scores.masked_fill(~keep, -5.0).softmax(-1) @ v
        if self.how == "temperature":
            return (scores * self.bias[:, :1, :1]).softmax(-1) @ v
        if self.how == "query axis":
            return scores.softmax(-2) @ v
        raise AssertionError(self.how)


def _spelled_args():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=gen) for _ in range(3))
    keep = torch.rand(2, 1, 6, 6, generator=gen) > 0.3
    keep[..., 0] = True
    return q, k, v, keep


@pytest.mark.parametrize("how,scale,terms", [
    ("masked_fill", 0.3, [("keep", "keep", "mask", 1.0)]),
    ("where", 1 / 3, [("keep", "keep", "mask", 1.0)]),
    ("scale after bias", 0.25, [("bias", "add", "bias", 0.25)]),
    ("minus bias, k scaled", 1.0, [("bias", "add", "bias", -1.0)]),
    ("k q^T", 1.0, []),
])
def test_mask_and_scale_spellings_are_sites(how, scale, terms):
    model, args = _Spelled(how).eval(), _spelled_args()
    gm = torch.export.export(model, args, strict=False).module()
    [site] = scan_of(gm, (args, {})).sites
    assert site.scale == pytest.approx(scale)
    assert [(t.name, t.kind, t.role, t.factor) for t in site.terms] == terms
    converted = ptool.transform(model, [SwapForSoftmax()], args)
    assert converted.report[0].rewritten == 1
    assert _max_rel_error(model, converted, args) <= 1e-5


@pytest.mark.parametrize("how,reason", [
    ("soft fill", "masked_fill fills the scores with -5, not a mask value (<= -10000)"),
    ("temperature", "the scores are multiplied by a tensor, slice_2 of shape (2, 1, 1) (mul), not by a constant"),
    ("query axis", "the softmax (dim -2) does not run over the key axis of q@k^T"),
])
def test_spellings_that_are_not_sites_say_why(how, reason):
    args = _spelled_args()
    gm = torch.export.export(_Spelled(how).eval(), args, strict=False).module()
    found = scan(gm)
    assert found.sites == [] and [s.reason for s in found.skipped] == [reason]


class _Gate(nn.Module):
    """A softmax over a weight product applied to values, and a softmax on the output: no q@k^T."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return torch.softmax(torch.softmax(x @ self.w, dim=-1) @ x, dim=-1)


def test_a_softmax_over_a_weight_product_is_reported_and_an_output_softmax_is_ignored():
    gm = torch.export.export(_Gate(), (torch.randn(3, 8, 8),), strict=False).module()
    found = scan(gm)
    assert found.sites == []
    assert [(s.node.name, s.reason) for s in found.skipped] == [
        ("softmax", "q@k^T has a weight or constant operand (a linear layer, not attention)")]


# ------------------------------------------------------------------------------------ never silent
def _feeds_a_product(softmax: torch.fx.Node, depth: int = 6) -> bool:
    """Independent of the finder: does any use of ``softmax`` reach a matmul/bmm/einsum within ``depth``?"""
    frontier = [softmax]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        if any(u.target in PRODUCTS for u in frontier):
            return True
    return False


@pytest.mark.parametrize("factory,sites,skips", [
    (forms.swin, 2, 0), (forms.maxvit, 1, 0), (forms.maxvit_tf, 1, 0), (forms.bmm, 1, 0), (forms.cait, 0, 1),
    (forms.xcit, 0, 1), (forms.coat, 0, 1), (forms.coat_einsum, 0, 1), (forms.all_forms, 3, 3),
])
def test_every_softmax_feeding_a_product_is_a_site_or_a_listed_skip(factory, sites, skips):
    _, args, gm = _graph(factory)
    found = scan_of(gm, (args, {}))
    assert (len(found.sites), len(found.skipped)) == (sites, skips)
    owned = {n for s in found.sites for n in s.nodes if n.target in SOFTMAX}
    listed = {s.node for s in found.skipped}
    assert not owned & listed and all(s.reason for s in found.skipped)
    softmaxes = [n for n in gm.graph.nodes if n.target in SOFTMAX]
    feeding = [n for n in softmaxes if _feeds_a_product(n)]
    assert feeding == softmaxes  # every softmax in these models feeds a product ...
    assert set(feeding) == owned | listed  # ... and each is a site or a reported skip
