"""Sigmoid and softplus (LSSA / LSSAR) attention against references written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ptool
from ptool.passes.attention.kernel import SiteShape
from ptool.passes.attention.kernels_other import OTHER_KERNELS, SigmoidAttention, SoftplusAttention
from ptool.verify import compare
from tests.passes.attention.kernel_site import KernelSite

B, H, N, D = 2, 2, 24, 8
PADDED = 5


def _qkv(n: int = N, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g) for _ in range(3))


def _masks(causal: bool) -> dict[str, torch.Tensor | None]:
    pad = torch.ones(B, 1, 1, N, dtype=torch.bool)
    pad[1, ..., -PADDED:] = False
    full = pad.expand(B, 1, N, N) & (torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(3)) > 0.2)
    if causal:
        full = full & torch.ones(N, N, dtype=torch.bool).tril()
    return {"none": None, "bool": pad, "additive": torch.where(pad, 0.0, torch.finfo(torch.float32).min),
            "full": full}


def _visible(mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """The explicit (B, H, N, M) visibility: entry by entry causality, then the mask."""
    ok = torch.tensor([[(j <= i) or not causal for j in range(N)] for i in range(N)]).expand(B, H, N, N)
    return ok if mask is None else ok & (mask if mask.dtype == torch.bool else mask > -1e4)


def _sigmoid_reference(q, k, v, visible, bias):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    w = torch.sigmoid(s + bias) * visible
    return (w @ v.double()).float()


def _softplus_reference(q, k, v, visible, n_train, reweight=False):
    out = torch.zeros(B, H, N, D, dtype=torch.float64)
    for b, h, i in torch.cartesian_prod(torch.arange(B), torch.arange(H), torch.arange(N)).tolist():
        keys = visible[b, h, i].nonzero().flatten()
        if len(keys) == 0:
            continue
        lam = math.log(max(len(keys), 2)) / math.log(n_train)
        a = F.softplus(lam * (k[b, h, keys].double() @ q[b, h, i].double()) / math.sqrt(D))
        a = a / a.sum()
        if reweight:
            r = torch.relu(a - 1 / len(keys)) ** 3
            a = r / r.sum() if r.sum() > 0 else a
        out[b, h, i] = a @ v[b, h, keys].double()
    return out.float()


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "full"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_sigmoid_matches_the_formula(causal, mask_kind):
    q, k, v = _qkv()
    kern = SigmoidAttention(SiteShape.of(q, k, v, causal=causal))
    mask = _masks(causal)[mask_kind]
    expected = _sigmoid_reference(q, k, v, _visible(mask, causal), -math.log(N))
    torch.testing.assert_close(kern(q, k, v, mask), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(kern.attention_weights(q, k, mask) @ v, expected, atol=1e-5, rtol=0)


def test_sigmoid_bias_starts_at_minus_log_n_per_head_and_trains():
    q, k, v = _qkv()
    kern = SigmoidAttention(SiteShape.of(q, k, v))
    torch.testing.assert_close(kern.bias.detach(), torch.full((H,), -math.log(N)))
    assert kern.trainable
    kern(q, k, v).sum().backward()
    assert kern.bias.grad.shape == (H,) and (kern.bias.grad != 0).all()
    rows = kern.attention_weights(q, k).sum(-1)
    assert not torch.allclose(rows, torch.ones_like(rows))  # no normalization


@pytest.mark.parametrize("reweight", [False, True], ids=["lssa", "lssar"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "full"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_softplus_matches_the_formula(causal, mask_kind, reweight):
    q, k, v = _qkv()
    kern = SoftplusAttention(SiteShape.of(q, k, v, causal=causal), reweight=reweight)
    mask = _masks(causal)[mask_kind]
    expected = _softplus_reference(q, k, v, _visible(mask, causal), N, reweight)
    torch.testing.assert_close(kern(q, k, v, mask), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(kern.attention_weights(q, k, mask) @ v, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reweight", [False, True], ids=["lssa", "lssar"])
def test_softplus_rows_are_distributions_and_reweighting_sharpens(reweight):
    q, k, v = _qkv()
    mask = _masks(True)["bool"]
    w = SoftplusAttention(SiteShape.of(q, k, v, causal=True), reweight=reweight).attention_weights(q, k, mask)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, N))
    assert (w[1, ..., -PADDED:] == 0).all() and (w.triu(1) == 0).all()
    plain = SoftplusAttention(SiteShape.of(q, k, v)).attention_weights(q, k)
    sharp = SoftplusAttention(SiteShape.of(q, k, v), reweight=True).attention_weights(q, k)
    entropy = lambda p: -(p * p.clamp_min(1e-30).log()).sum(-1).mean()  # noqa: E731
    assert entropy(sharp) < entropy(plain) - 0.5


def test_softplus_scale_is_one_at_the_capture_length_and_grows_beyond():
    q, k, v = _qkv()
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    a = F.softplus(s)
    kern = SoftplusAttention(SiteShape.of(q, k, v))
    torch.testing.assert_close(kern.attention_weights(q, k), a / a.sum(-1, keepdim=True))
    short = SoftplusAttention(SiteShape.of(q[:, :, :6], k[:, :, :6], v[:, :, :6]))  # captured at 6 keys
    a = F.softplus(math.log(N) / math.log(6) * s)
    torch.testing.assert_close(short.attention_weights(q, k), a / a.sum(-1, keepdim=True))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", sorted(OTHER_KERNELS))
def test_padded_keys_never_influence_the_output(name, causal):
    q, k, v = _qkv()
    mask = _masks(causal)["bool"]
    kern = OTHER_KERNELS[name](SiteShape.of(q, k, v, causal=causal))
    k2, v2 = k.clone(), v.clone()
    k2[1, :, -PADDED:] = 100 * torch.randn(H, PADDED, D)
    v2[1, :, -PADDED:] = 1e3
    torch.testing.assert_close(kern(q, k2, v2, mask), kern(q, k, v, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(OTHER_KERNELS))
def test_causal_kernels_do_not_see_the_future(name):
    q, k, v = _qkv()
    kern = OTHER_KERNELS[name](SiteShape.of(q, k, v, causal=True))
    t = N // 2
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1:] = 50 * torch.randn(B, H, N - t - 1, D)
    v2[:, :, t + 1:] = 1e3
    torch.testing.assert_close(kern(q, k2, v2)[:, :, :t + 1], kern(q, k, v)[:, :, :t + 1], atol=1e-6, rtol=0)


def test_options_are_shared_and_checked():
    q, k, v = _qkv()
    for cls in OTHER_KERNELS.values():
        cls(SiteShape.of(q, k, v), k=0.5, window=8, block_size=16, feature_dim=4, seed=1)
        with pytest.raises(ValueError, match="window"):
            cls(SiteShape.of(q, k, v), window=0)




def _lowered_error(name: str, causal: bool, backend: str, **options) -> float:
    q, k, v = _qkv(seed=5)
    mask = _masks(causal)["bool"]
    site = KernelSite(OTHER_KERNELS[name](SiteShape.of(q, k, v, causal=causal), **options)).eval()
    compiled = ptool.compile(site, backend, (q, k, v, mask))
    with torch.no_grad():
        return compare(site(q, k, v, mask), compiled(q, k, v, mask)).max_rel_error


CASES = [("sigmoid", {}), ("softplus", {}), ("softplus", {"reweight": True})]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(("name", "options"), CASES)
def test_lowers_to_onnxruntime(name, options, causal):
    assert _lowered_error(name, causal, "onnxruntime", **options) <= 1e-4


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(("name", "options"), CASES)
def test_lowers_to_tvm(name, options, causal):
    pytest.importorskip("tvm")
    assert _lowered_error(name, causal, "tvm", **options) <= 1e-4
