"""Sparse softmax kernels against dense references built from explicit N x M masks."""

from __future__ import annotations

import math

import pytest
import torch

import ptool
from ptool.passes.attention.kernel import SiteShape, softmax_attention, softmax_weights
from ptool.passes.attention.sparse import (
    SPARSE_KERNELS,
    AxialAttention,
    SEAAttention,
    TopKAttention,
    estimator_kl,
)
from ptool.verify import compare
from tests.passes.attention.kernel_site import KernelSite

B, H, N, D = 2, 2, 24, 8
GRID, PREFIX = (4, 4), 1
N_GRID = PREFIX + GRID[0] * GRID[1]
OPTIONS = {"window": 6, "block_size": 5, "k": 0.25}
NAMES = sorted(SPARSE_KERNELS)


def _qkv(n: int = N, seed: int = 0, m: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, n, D, generator=g), torch.randn(B, H, m or n, D, generator=g),
            torch.randn(B, H, m or n, D, generator=g))


def _n(name: str) -> int:
    return N_GRID if name == "axial" else N


def _kernel(name: str, causal: bool, q, k, v, /, **options):
    grid = dict(grid=GRID, prefix=PREFIX) if name == "axial" else {}
    return SPARSE_KERNELS[name](SiteShape.of(q, k, v, causal=causal, **grid), **{**OPTIONS, **options})


def _masks(n: int, causal: bool) -> dict[str, torch.Tensor | None]:
    """None, key padding (bool / additive) and a full 4-D bool mask (with the causal part, as HF builds)."""
    pad = torch.ones(B, 1, 1, n, dtype=torch.bool)
    pad[1, ..., -5:] = False
    full = pad.expand(B, 1, n, n) & (torch.rand(B, 1, n, n, generator=torch.Generator().manual_seed(3)) > 0.2)
    if causal:
        full = full & torch.ones(n, n, dtype=torch.bool).tril()
    return {"none": None, "bool": pad, "additive": torch.where(pad, 0.0, torch.finfo(torch.float32).min),
            "full": full}


def _pattern(name: str, causal: bool, n: int) -> torch.Tensor:
    """The structural (N, N) pattern written out entry by entry (topk/sea: everything)."""
    def ok(i: int, j: int) -> bool:
        if causal and j > i:
            return False
        if name == "window":
            return i - j < OPTIONS["window"] if causal else abs(i - j) <= OPTIONS["window"] // 2
        if name == "block-diag":
            return i // OPTIONS["block_size"] == j // OPTIONS["block_size"]
        if name == "axial":
            if i < PREFIX or j < PREFIX:
                return True
            (ri, ci), (rj, cj) = divmod(i - PREFIX, GRID[1]), divmod(j - PREFIX, GRID[1])
            return ri == rj or ci == cj
        return True

    return torch.tensor([[ok(i, j) for j in range(n)] for i in range(n)])


def _reference(q, k, v, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense masked softmax in float64; rows with nothing visible are 0 (the kernels' contract)."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    w = s.masked_fill(~visible, -math.inf).softmax(-1).nan_to_num(0.0)
    return (w @ v.double()).float()


def _visible(mask: torch.Tensor | None, pattern: torch.Tensor) -> torch.Tensor:
    ok = pattern.expand(B, H, *pattern.shape)
    if mask is not None:
        ok = ok & (mask if mask.dtype == torch.bool else mask > -1e4)
    return ok


def _topk_set(scores: torch.Tensor, visible: torch.Tensor, count: int, share: float | None = None) -> torch.Tensor:
    """Per row, the ``count`` best visible keys by explicit sorting (masked keys never chosen);
    with ``share``, at most ``ceil(share * visible keys)`` of them."""
    keep = torch.zeros_like(visible)
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in scores.shape[:-1])):
        row, vis = scores[tuple(idx)], visible[tuple(idx)]
        order = [j for j in row.argsort(descending=True).tolist() if vis[j]]
        limit = count if share is None else min(count, max(1, math.ceil(share * len(order))))
        keep[tuple(idx)][order[:limit]] = True
    return keep


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "full"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_dense_reference(name, causal, mask_kind):
    n = _n(name)
    q, k, v = _qkv(n)
    kern = _kernel(name, causal, q, k, v, **({"tail": "drop"} if name in ("topk", "sea") else {}))
    mask = _masks(n, causal)[mask_kind]
    visible = _visible(mask, _pattern(name, causal, n))
    if name == "topk":  # a fractional k is a share of each query's visible keys
        visible = visible & _topk_set(q @ k.transpose(-1, -2), visible, kern.k_count(n), share=kern.k)
    elif name == "sea":
        visible = visible & _topk_set(kern.estimate_logits(q, k, mask).detach(), visible, kern.k_count(n),
                                      share=kern.k)
    expected = _reference(q, k, v, visible, kern.shape.scale)
    torch.testing.assert_close(kern(q, k, v, mask), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(kern.attention_weights(q, k, mask) @ v, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(("name", "options"), [
    ("topk", {"k": N}), ("sea", {"k": N}), ("window", {"window": 2 * N}), ("block-diag", {"block_size": N}),
])
def test_covering_everything_is_softmax(name, options, causal):
    q, k, v = _qkv()
    mask = _masks(N, causal)["bool"]
    kern = _kernel(name, causal, q, k, v, **options)
    expected = softmax_attention(q, k, v, mask, kern.shape.scale, causal)
    torch.testing.assert_close(kern(q, k, v, mask), expected, atol=1e-5, rtol=0)


def test_topk_with_one_key_picks_the_argmax():
    q, k, v = _qkv()
    kern = _kernel("topk", False, q, k, v, k=1, tail="drop")
    best = (q @ k.transpose(-1, -2)).argmax(-1)
    expected = torch.gather(v, 2, best.unsqueeze(-1).expand(-1, -1, -1, D))
    torch.testing.assert_close(kern(q, k, v), expected, atol=1e-6, rtol=0)


def test_k_is_a_fraction_below_one_and_a_count_from_one():
    q, k, v = _qkv()
    shape = SiteShape.of(q, k, v)
    assert [TopKAttention(shape, k=x).k_count(24) for x in (0.25, 0.01, 1, 5, 100)] == [6, 1, 1, 5, 24]


@pytest.mark.parametrize("options", [{"k": 0}, {"k": 2.5}, {"window": 0}, {"block_size": 0}, {"feature_dim": -1}])
def test_bad_options_raise(options):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=next(iter(options))):
        TopKAttention(SiteShape.of(q, k, v), **options)


def test_unknown_option_is_an_error():
    q, k, v = _qkv()
    with pytest.raises(TypeError):
        SEAAttention(SiteShape.of(q, k, v), windw=3)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", NAMES)
def test_padded_keys_never_influence_the_output(name, causal):
    n = _n(name)
    q, k, v = _qkv(n)
    mask = _masks(n, causal)["bool"]
    kern = _kernel(name, causal, q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, -5:] = 100 * torch.randn(H, 5, D)
    v2[1, :, -5:] = 1e3
    torch.testing.assert_close(kern(q, k2, v2, mask), kern(q, k, v, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_causal_kernels_do_not_see_the_future(name):
    n = _n(name)
    q, k, v = _qkv(n)
    kern = _kernel(name, True, q, k, v)
    t = n // 2
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1:] = 50 * torch.randn(B, H, n - t - 1, D)
    v2[:, :, t + 1:] = 1e3
    torch.testing.assert_close(kern(q, k2, v2)[:, :, :t + 1], kern(q, k, v)[:, :, :t + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["window", "block-diag"])
def test_queries_align_to_the_last_keys(name):
    q, k, v = _qkv(8, m=N)  # a decode-like step: 8 new queries over 24 cached keys
    kern = _kernel(name, True, q, k, v)
    full = _pattern(name, True, N)[N - 8:]
    torch.testing.assert_close(kern(q, k, v), _reference(q, k, v, full.expand(B, H, 8, N), kern.shape.scale),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least as many keys"):
        kern(k, q, v[:, :, :8])


def test_axial_needs_a_grid():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="site 3: axial attention needs a 2-D token grid"):
        AxialAttention(SiteShape.of(q, k, v, layer=3))
    with pytest.raises(ValueError, match=r"prefix \+ rows \* cols"):
        AxialAttention(SiteShape.of(q, k, v, grid=(4, 4), prefix=1))


def test_axial_rows_are_distributions_over_prefix_row_and_column():
    q, k, v = _qkv(N_GRID)
    w = _kernel("axial", False, q, k, v).attention_weights(q, k)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, N_GRID))
    assert ((w[..., PREFIX:, :] > 0).sum(-1) == PREFIX + GRID[0] + GRID[1] - 1).all()


def _recall(kern, teacher, q, k) -> float:
    """Teacher attention mass on the keys the estimator selects (METHODS P5's recall)."""
    with torch.no_grad():
        return float((teacher * (kern.attention_weights(q, k) > 0)).sum(-1).mean())


@pytest.mark.parametrize("estimator", [{"estimator": "features"}, {"estimator": "lowrank", "feature_dim": 3}],
                         ids=["features", "lowrank"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_sea_estimator_learns_by_kl_distillation(causal, estimator):
    q, k, v = (2 * t for t in _qkv(seed=1))  # logit std ~2.8: peaked teacher rows
    kern = _kernel("sea", causal, q, k, v, tail="drop", **estimator)
    teacher = softmax_weights(q, k, None, kern.shape.scale, causal)
    before = _recall(kern, teacher, q, k)
    opt = torch.optim.Adam(kern.parameters(), lr=1e-2)
    for _ in range(300):
        loss = estimator_kl(teacher, kern.estimate_logits(q, k))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _recall(kern, teacher, q, k)
    best = _recall(_kernel("topk", causal, q, k, v, tail="drop"), teacher, q, k)  # exact top-k: the ceiling
    # measured: features .78 -> .88 of .96; lowrank (rank 3 of 8 isotropic dims, which caps it) .67 -> .81
    share = 0.5 if estimator["estimator"] == "features" else 0.4
    assert after - before >= share * (best - before), (before, after, best)


def test_sea_gradients_reach_the_estimator_only_through_estimate_logits():
    q, k, v = (t.requires_grad_() for t in _qkv())
    kern = _kernel("sea", False, q, k, v)
    kern(q, k, v).sum().backward()
    assert kern.proj_q.grad is None and q.grad is not None and v.grad is not None  # top-k is a step function
    teacher = softmax_weights(q.detach(), k.detach(), None, kern.shape.scale)
    estimator_kl(teacher, kern.estimate_logits(q.detach(), k.detach())).backward()
    assert kern.proj_q.grad.abs().sum() > 0 and kern.proj_k.grad.abs().sum() > 0




def _lowered_error(name: str, causal: bool, backend: str) -> float:
    n = _n(name)
    q, k, v = _qkv(n, seed=5)
    mask = _masks(n, causal)["bool"]
    site = KernelSite(_kernel(name, causal, q, k, v)).eval()
    compiled = ptool.compile(site, backend, (q, k, v, mask))
    with torch.no_grad():
        return compare(site(q, k, v, mask), compiled(q, k, v, mask)).max_rel_error


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", NAMES)
def test_lowers_to_onnxruntime(name, causal):
    assert _lowered_error(name, causal, "onnxruntime") <= 1e-4


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", NAMES)
def test_lowers_to_tvm(name, causal):
    pytest.importorskip("tvm")
    assert _lowered_error(name, causal, "tvm") <= 1e-4


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_topk_tail_mean_keeps_top_weights_and_spreads_the_rest(causal):
    n = _n("topk")
    q, k, v = _qkv(n)
    mask = _masks(n, causal)["bool"]
    kern = _kernel("topk", causal, q, k, v)  # tail="mean" is the default
    visible = _visible(mask, _pattern("topk", causal, n))
    top = _topk_set(q @ k.transpose(-1, -2), visible, kern.k_count(n), share=kern.k)
    full = (q.double() @ k.double().transpose(-1, -2) * kern.shape.scale).masked_fill(~visible, -math.inf)
    full = full.softmax(-1).nan_to_num(0.0)
    w = kern.attention_weights(q, k, mask).double()
    rows = visible.any(-1)
    torch.testing.assert_close(w.sum(-1)[rows], torch.ones_like(w.sum(-1)[rows]), atol=1e-6, rtol=0)
    torch.testing.assert_close(w[top], full[top], atol=1e-6, rtol=0)  # the top-k keep their exact weight
    tail = visible & ~top
    for idx in torch.nonzero(rows):  # the tail shares the rest equally
        b, h, i = idx.tolist()
        t = tail[b, h, i]
        if t.any():
            expected = (1 - full[b, h, i][top[b, h, i]].sum()) / t.sum()
            torch.testing.assert_close(w[b, h, i][t], expected.expand(int(t.sum())), atol=1e-6, rtol=0)
    assert (w[~visible] == 0).all()
    torch.testing.assert_close(kern(q, k, v, mask), (w @ v.double()).float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_sea_tail_mean_rows_are_distributions_and_forward_agrees(causal):
    n = _n("sea")
    q, k, v = _qkv(n)
    mask = _masks(n, causal)["bool"]
    kern = _kernel("sea", causal, q, k, v)  # tail="mean" is the default
    w = kern.attention_weights(q, k, mask)
    visible = _visible(mask, _pattern("sea", causal, n))
    rows = visible.any(-1)
    torch.testing.assert_close(w.sum(-1)[rows], torch.ones_like(w.sum(-1)[rows]), atol=1e-5, rtol=0)
    assert (w[~visible] == 0).all()
    torch.testing.assert_close(kern(q, k, v, mask), w @ v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "full"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_sea_features_estimator_matches_dense_reference(causal, mask_kind):
    q, k, v = _qkv()
    kern = _kernel("sea", causal, q, k, v, tail="drop", estimator="features")
    assert kern.proj_q.shape == (H, D, 8)  # max(8, D // 4) features per sign
    mask = _masks(N, causal)[mask_kind]
    visible = _visible(mask, _pattern("sea", causal, N))
    visible = visible & _topk_set(kern.estimate_logits(q, k, mask).detach(), visible, kern.k_count(N), share=kern.k)
    torch.testing.assert_close(kern(q, k, v, mask), _reference(q, k, v, visible, kern.shape.scale), atol=1e-5, rtol=0)


def test_sea_lowrank_default_rank_is_a_quarter_of_the_head_from_32():
    for d, r in ((8, 8), (16, 8), (32, 8), (64, 16), (128, 32)):
        q = torch.zeros(1, 2, 4, d)
        assert SEAAttention(SiteShape.of(q, q, q)).proj_q.shape == (2, d, r)
    with pytest.raises(ValueError, match="estimator"):
        SEAAttention(SiteShape.of(q, q, q), estimator="performer")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_sea_lowrank_fit_is_exact_when_queries_and_keys_span_rank_r(causal):
    g = torch.Generator().manual_seed(7)
    basis_q, basis_k = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    batches = []
    for _ in range(3):  # q, k of rank 3 (different subspaces), random padding
        q = torch.randn(B, H, N, 3, generator=g) @ basis_q
        k = torch.randn(B, H, N, 3, generator=g) @ basis_k
        batches.append((q, k, torch.randn(B, H, N, D, generator=g), _masks(N, causal)["bool"]))
    q, k, v, mask = batches[0]
    kern = _kernel("sea", causal, q, k, v, feature_dim=3)
    before = kern.estimate_logits(q, k, mask).detach()
    kern.fit_batches(batches)
    for q, k, _, mask in batches:
        exact = (q @ k.transpose(-1, -2) * kern.shape.scale).masked_fill(~_visible(mask, _pattern("sea", causal, N)),
                                                                        -math.inf).log_softmax(-1)
        got = kern.estimate_logits(q, k, mask).detach()
        real = exact > -math.inf
        torch.testing.assert_close(got[real], exact[real], atol=2e-3, rtol=0)  # rank 3 of 8 recovers the scores
    assert not torch.allclose(before, kern.estimate_logits(*batches[0][:2], batches[0][3]).detach(), atol=1e-2)


def test_sea_lowrank_transfer_fits_on_every_calibration_batch():
    from ptool.passes.attention import convert

    q, k, v = _qkv()
    kern = _kernel("sea", False, q, k, v, feature_dim=3)
    seen = []
    kern.fit_batches = lambda batches: seen.append(len(batches))
    data = [(q, k, v, None)] * 3
    notes = convert.transfer({0: kern}, {0: data}, steps=1, lr=1e-3)
    assert seen == [3] and notes["fitted"] == [0]
