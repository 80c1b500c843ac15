"""The linear-attention kernels: exact against their quadratic references, mask- and causality-safe,
recurrent == parallel, trainable where they should be, and lowered to ONNX Runtime and TVM."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import ptool
from ptool.passes.attention import linear_core as core
from ptool.passes.attention.kernel import SiteShape, key_keep, softmax_attention, softmax_weights
from ptool.passes.attention.linear import (
    LINEAR_KERNELS,
    HedgehogKernel,
    PerformerKernel,
    RecurrentDecoder,
    ReluKernel,
    TransNormerKernel,
)
from tests.passes.attention.kernel_site import KernelSite

B, H, N, D = 2, 2, 24, 8
PAD = 5  # batch row 1 has its last PAD tokens padded
NORMALIZED = ["elu", "relu", "performer", "hedgehog"]
VARIANTS = [(name, False) for name in LINEAR_KERNELS] + [("transnormer", True)]  # (map, local)
VARIANT_IDS = [f"{n}-diag" if local else n for n, local in VARIANTS]
DECODERS = ["elu", "performer", "hedgehog", "transnormer"]


def _qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g) for _ in range(3))


def _mask(causal: bool, form: str) -> torch.Tensor:
    """Right padding in row 1; causal sites get the 4-D causal+padding mask transformers builds."""
    keys = torch.ones(B, 1, 1, N, dtype=torch.bool)
    keys[1, ..., N - PAD:] = False
    ok = keys & torch.ones(N, N, dtype=torch.bool).tril() if causal else keys
    if form == "bool":
        return ok
    return torch.where(ok, 0.0, torch.finfo(torch.float32).min)


def _kernel(name: str, causal: bool, *, local: bool = False, chunk_size: int = 64, **kw) -> torch.nn.Module:
    q, k, v = _qkv()
    kernel = LINEAR_KERNELS[name](SiteShape.of(q, k, v, causal=causal, **kw), chunk_size=chunk_size, local=local)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move learnable terms off their init so they take part in every check
        if isinstance(kernel, ReluKernel):
            kernel.pos_embed.normal_(0, 0.5, generator=g)
            if kernel.conv is not None:
                kernel.conv.weight.normal_(0, 0.3, generator=g)
                kernel.conv.bias.normal_(0, 0.1, generator=g)
        elif isinstance(kernel, HedgehogKernel):
            for p in kernel.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        elif isinstance(kernel, TransNormerKernel):
            kernel.gain.fill_(1.7)
    return kernel.eval()


def _rms_norm(o: torch.Tensor, gain: float) -> torch.Tensor:
    o = o.double()
    return o / (o.pow(2).mean(dim=(1, 3), keepdim=True).sqrt() + core.DEFAULT_EPS) * gain


def _reference(kernel, q, k, v, mask) -> torch.Tensor:
    """The kernel's output through materialized weights, built independently of the fast paths."""
    causal = kernel.shape.causal
    keep = key_keep(mask, torch.float32)
    if isinstance(kernel, TransNormerKernel) and kernel.local:
        blocks = torch.arange(N) // min(kernel.chunk_size, N)
        ok = (blocks[:, None] == blocks[None, :]) & (mask if mask.dtype == torch.bool else mask == 0)
        w = softmax_weights(q.double(), k.double(), ok, kernel.shape.scale, causal)
        if causal:
            ok = ok & torch.ones(N, N, dtype=torch.bool).tril()
        return _rms_norm(w * ok.any(-1, keepdim=True) @ v.double(), kernel.gain.item())
    fq, fk = kernel.features(q, k, keep)
    if isinstance(kernel, TransNormerKernel):
        out = core.quadratic_linear_attention(fq, fk, v.double(), causal=causal, keep=keep, normalize=False)
        return _rms_norm(out, kernel.gain.item())
    out = core.quadratic_linear_attention(fq, fk, v, causal=causal, keep=keep)
    if isinstance(kernel, ReluKernel) and kernel.conv is not None:  # the conv term, written out here
        vk = (v * keep).transpose(-1, -2).reshape(B * H, D, N)
        pad = (4, 0) if causal else (2, 2)
        conv = F.conv1d(F.pad(vk, pad), kernel.conv.weight, kernel.conv.bias, groups=D)
        out = out + conv.reshape(B, H, D, N).transpose(-1, -2)
    return out


def _unpadded(o: torch.Tensor) -> torch.Tensor:
    return torch.cat([o[0].flatten(), o[1, :, : N - PAD].flatten()])


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# -- exactness against the quadratic form ---------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [7, 64])
@pytest.mark.parametrize("form", ["bool", "additive"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(("name", "local"), VARIANTS, ids=VARIANT_IDS)
def test_forward_matches_quadratic_reference(name, local, causal, form, chunk_size):
    kernel = _kernel(name, causal, local=local, chunk_size=chunk_size)
    q, k, v = _qkv()
    mask = _mask(causal, form)
    with torch.no_grad():
        out = kernel(q, k, v, mask)
        ref = _reference(kernel, q, k, v, mask)
    assert out.shape == (B, H, N, D) and out.dtype == q.dtype
    assert _max_err(out, ref) <= 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(("name", "local"), VARIANTS, ids=VARIANT_IDS)
def test_padded_keys_have_no_influence(name, local, causal):
    kernel = _kernel(name, causal, local=local, chunk_size=7)
    q, k, v = _qkv()
    k2, v2 = k.clone(), v.clone()
    k2[1, :, N - PAD:] = 5 * torch.randn(H, PAD, D)
    v2[1, :, N - PAD:] = 5 * torch.randn(H, PAD, D)
    mask = _mask(causal, "bool")
    with torch.no_grad():
        a, b = kernel(q, k, v, mask), kernel(q, k2, v2, mask)
    assert _max_err(_unpadded(b), _unpadded(a)) <= 1e-6


@pytest.mark.parametrize(("name", "local"), VARIANTS, ids=VARIANT_IDS)
def test_causal_outputs_ignore_future_tokens(name, local):
    kernel = _kernel(name, True, local=local, chunk_size=7)
    q, k, v = _qkv()
    t = 13
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t:] = 5 * torch.randn(B, H, N - t, D)
    with torch.no_grad():
        a, b = kernel(q, k, v), kernel(q2, k2, v2)
    assert _max_err(b[:, :, :t], a[:, :, :t]) <= 1e-6


def test_relu_grid_conv_skips_prefix_and_matches_conv2d():
    rows, cols, prefix = 4, 5, 4  # N = 24 = 4 + 4 * 5
    kernel = _kernel("relu", False, grid=(rows, cols), prefix=prefix)
    q, k, v = _qkv()
    with torch.no_grad():
        term = kernel(q, k, v) - core.linear_attention(*kernel.features(q, k), v)
        grid = v[:, :, prefix:].reshape(B * H, rows, cols, D).permute(0, 3, 1, 2)
        ref = F.conv2d(grid, kernel.conv.weight, kernel.conv.bias, padding=2, groups=D)
    assert isinstance(kernel.conv, torch.nn.Conv2d)
    assert term[:, :, :prefix].abs().max() == 0
    assert _max_err(term[:, :, prefix:], ref.permute(0, 2, 3, 1).reshape(B, H, rows * cols, D)) <= 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fresh_relu_kernel_is_plain_relu_linear_attention(causal):
    q, k, v = _qkv()
    kernel = ReluKernel(SiteShape.of(q, k, v, causal=causal))
    mask = _mask(causal, "bool")
    keep = key_keep(mask, torch.float32)
    with torch.no_grad():
        ref = core.linear_attention(F.relu(q), F.relu(k), v, causal=causal, keep=keep)
        assert _max_err(kernel(q, k, v, mask), ref) <= 1e-6


# -- weights, decoding, training ------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", NORMALIZED)
def test_attention_weights_are_rows_of_forward(name, causal):
    kernel = _kernel(name, causal)
    if isinstance(kernel, ReluKernel):
        torch.nn.init.zeros_(kernel.conv.weight)  # the weights leave the conv term out
        torch.nn.init.zeros_(kernel.conv.bias)
    q, k, v = _qkv()
    mask = _mask(causal, "additive")
    with torch.no_grad():
        w = kernel.attention_weights(q, k, mask)
        out = kernel(q, k, v, mask)
    assert w.shape == (B, H, N, N) and (w >= 0).all()
    # a row sums to a / (a + eps): visible off 1 only where phi(q) barely meets the keys (relu's zeros)
    assert torch.allclose(w.sum(-1), torch.ones(B, H, N), atol=1e-3)
    assert w[1, :, :, N - PAD:].abs().max() == 0
    if causal:
        assert (w.triu(1) == 0).all()
    assert _max_err(out, w @ v) <= 1e-5


def test_transnormer_has_no_attention_weights():
    for local in (False, True):
        assert _kernel("transnormer", True, local=local).attention_weights(*_qkv()[:2]) is None


@pytest.mark.parametrize("name", DECODERS)
def test_recurrent_decode_matches_causal_parallel(name):
    kernel = _kernel(name, True)
    q, k, v = _qkv()
    state = kernel.init_state(B)
    with torch.no_grad():
        steps = []
        for t in range(N):
            o, state = kernel.decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
            steps.append(o)
        assert _max_err(torch.cat(steps, dim=2), kernel(q, k, v)) <= 1e-4


@pytest.mark.parametrize(("name", "causal", "local"), [("relu", True, False), ("transnormer", True, True),
                                                       ("elu", False, False)])
def test_decode_unsupported_is_a_clear_error(name, causal, local):
    kernel = _kernel(name, causal, local=local)
    assert not kernel.supports_decode
    with pytest.raises(NotImplementedError, match="cannot decode"):
        kernel.init_state(B)
    with pytest.raises(NotImplementedError, match="cannot decode"):
        RecurrentDecoder(kernel)


@pytest.mark.parametrize(("name", "params"), [("hedgehog", {"q_map.weight", "k_map.weight"}),
                                              ("relu", {"pos_embed", "conv.weight", "conv.bias"}),
                                              ("transnormer", {"gain"})])
def test_learnable_kernels_get_gradients(name, params):
    q, k, v = _qkv()
    kernel = LINEAR_KERNELS[name](SiteShape.of(q, k, v, causal=True))  # fresh init: conv at zero
    assert kernel.trainable and {n for n, _ in kernel.named_parameters()} == params
    kernel(q, k, v, _mask(True, "bool")).square().mean().backward()
    for n, p in kernel.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, n


def test_parameter_free_kernels():
    q, k, v = _qkv()
    for name in ("elu", "performer"):
        assert not LINEAR_KERNELS[name](SiteShape.of(q, k, v)).trainable


def test_hedgehog_starts_at_identity_and_features_are_two_sided_softmax():
    q, k, v = _qkv()
    kernel = HedgehogKernel(SiteShape.of(q, k, v))
    assert torch.equal(kernel.q_map.weight, torch.eye(D).expand(H, D, D))
    fq, _ = kernel.features(q, k)
    x = q * D ** -0.25
    assert torch.allclose(fq, torch.cat([x.softmax(-1), (-x).softmax(-1)], -1), atol=1e-6)
    wide = HedgehogKernel(SiteShape.of(q, k, v), feature_dim=12)
    assert wide.features(q, k)[0].shape[-1] == 24


def test_performer_projection_is_seeded_and_approximates_softmax():
    q, k, v = (0.5 * x for x in _qkv())
    shape = SiteShape.of(q, k, v, causal=True)
    default, a, b = PerformerKernel(shape), PerformerKernel(shape, seed=3), PerformerKernel(shape, seed=3)
    assert default.feature_map.features == round(D * math.log(D))
    assert torch.equal(a.feature_map.projection, b.feature_map.projection)
    assert not torch.equal(a.feature_map.projection, default.feature_map.projection)
    assert "feature_map.projection" in a.state_dict()
    # FAVOR+ is an unbiased estimate of exp(q.k * scale): many features track softmax attention
    big = PerformerKernel(shape, feature_dim=4096)
    fid = ptool.verify.compare(softmax_attention(q, k, v, None, shape.scale, True), big(q, k, v))
    assert fid.cosine >= 0.99


def test_constructor_signature_and_bad_sites():
    for cls in LINEAR_KERNELS.values():
        params = inspect.signature(cls.__init__).parameters
        assert list(params) == ["self", "shape", "feature_dim", "chunk_size", "seed", "local"]
    q, k, v = _qkv()
    cross = SiteShape.of(q, k[:, :, :10], v[:, :, :10], causal=True)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        LINEAR_KERNELS["elu"](cross)
    with pytest.raises(ValueError, match="DiagAttention"):
        TransNormerKernel(SiteShape.of(q, k[:, :, :10], v[:, :, :10]), local=True)
    with pytest.raises(ValueError, match="grid"):
        ReluKernel(SiteShape.of(q, k, v, grid=(4, 4), prefix=1))
    with pytest.raises(ValueError, match="chunk_size"):
        LINEAR_KERNELS["elu"](SiteShape.of(q, k, v), chunk_size=0)


# -- lowering -------------------------------------------------------------------------------------------




def _lowered_error(kernel, backend: str, args: tuple) -> tuple[float, object]:
    model = KernelSite(kernel).eval()
    options = {"intra_op_threads": 1} if backend == "onnxruntime" else {}
    run = ptool.compile(model, backend, args, **options)
    with torch.no_grad():
        return ptool.verify.compare(model(*args), run(*args)).max_rel_error, run


def _site_args(causal: bool) -> tuple:
    return (*_qkv(), _mask(causal, "additive" if causal else "bool"))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(("name", "local"), VARIANTS, ids=VARIANT_IDS)
def test_lowers_to_onnxruntime(name, local, causal):
    err, _ = _lowered_error(_kernel(name, causal, local=local, chunk_size=7), "onnxruntime", _site_args(causal))
    assert err <= 1e-4


@pytest.mark.parametrize("name", DECODERS)
def test_recurrent_decoder_lowers_to_onnxruntime(name):
    kernel = _kernel(name, True)
    q, k, v = _qkv()
    decoder = RecurrentDecoder(kernel).eval()
    s, z = kernel.init_state(B)
    run = ptool.compile(decoder, "onnxruntime", (q[:, :, :1], k[:, :, :1], v[:, :, :1], s, z), intra_op_threads=1)
    steps = []
    for t in range(N):  # feed ORT its own state: the whole prefix runs through the exported step
        o, s, z = run(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], s, z)
        steps.append(o)
    with torch.no_grad():
        assert _max_err(torch.cat(steps, dim=2), kernel(q, k, v)) <= 1e-4


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(("name", "local"), VARIANTS, ids=VARIANT_IDS)
def test_lowers_to_tvm(name, local, causal):
    err, run = _lowered_error(_kernel(name, causal, local=local, chunk_size=7), "tvm", _site_args(causal))
    assert err <= 1e-4
    assert run.info["frontend"] == "exported_program"  # imported natively, not via the ONNX fallback


def test_transnormer_gradients_stay_finite_on_all_zero_rows():
    """Padded query rows come out of NormAttention as zeros; the RMS norm must not turn them into NaN gradients."""
    q, k, v = (x.requires_grad_() for x in _qkv())
    kernel = TransNormerKernel(SiteShape.of(q, k, v))
    out = kernel(q, k, v * 0.0, None)
    assert torch.equal(out, torch.zeros_like(out))
    (out.sum() + (kernel(q, k, v, None) ** 2).mean()).backward()
    for x in (q, k, v, kernel.gain):
        assert torch.isfinite(x.grad).all()
