"""Gated and delta-rule linear attention (GLA, DeltaNet, RetNet decay): chunked == quadratic, recurrent
decode == parallel, padding- and causality-safe, trainable, on a Llama-style model (RoPE, GQA), and
lowered to ONNX Runtime and TVM."""

from __future__ import annotations

import pytest
import torch

import ptool
from ptool.errors import PassError
from ptool.ir.record import record_values
from ptool.passes.attention import gated as G
from ptool.passes.attention.kernel import SiteShape, key_keep, softmax_attention
from ptool.passes.attention.linear import LINEAR_KERNELS
from ptool.passes.registry import parse_pass
from tests.models import zoo
from tests.passes.attention.kernel_site import KernelSite

B, H, N, D = 2, 2, 24, 8
PAD = 5  # batch row 1: its last PAD tokens padded
MIXERS = list(G.GATED_KERNELS)


def _qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g) for _ in range(3))


def _mask(causal: bool) -> torch.Tensor:
    """Right padding in row 1, additive; causal sites get the 4-D causal+padding mask transformers builds."""
    ok = torch.ones(B, 1, 1, N, dtype=torch.bool)
    ok[1, ..., N - PAD:] = False
    if causal:
        ok = ok & torch.ones(N, N, dtype=torch.bool).tril()
    return torch.where(ok, 0.0, torch.finfo(torch.float32).min)


def _perturb(kernel: torch.nn.Module, seed: int = 7) -> None:
    """Move every parameter off its init (gates, decays, beta, feature maps) so each takes part in the checks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in kernel.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _kernel(mixer: str, causal: bool, *, chunk_size: int = 7, feature_map: str = "hedgehog") -> G.GatedKernel:
    q, k, v = _qkv()
    shape = SiteShape.of(q, k, v, causal=causal)
    kernel = G.GATED_KERNELS[mixer](shape, LINEAR_KERNELS[feature_map](shape), chunk_size=chunk_size)
    _perturb(kernel)
    return kernel.eval()


def _quadratic(kernel: G.GatedKernel, q, k, v, mask) -> torch.Tensor:
    """The mixer's readout through the materialised N x N matrix (float64), both directions when non-causal."""
    keep = key_keep(mask, torch.float32)
    fq, fk = kernel._features(q, k, keep)
    v = v if keep is None else v * keep
    if isinstance(kernel, G.DeltaKernel):
        beta = kernel.beta(k, keep)
        out = G.delta_quadratic(fq, fk, v, beta)
        if not kernel.shape.causal:
            out = out + G.delta_quadratic(*(x.flip(-2) for x in (fq, fk, v, beta))).flip(-2)
        return out
    return G.gated_quadratic(fq, fk, v, kernel.log_decay(k, keep), causal=kernel.shape.causal)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_chunked_form_matches_quadratic(mixer, causal, chunk_size):
    kernel = _kernel(mixer, causal, chunk_size=chunk_size)
    q, k, v = _qkv()
    mask = _mask(causal)
    with torch.no_grad():
        got, want = kernel.mix(q, k, v, mask), _quadratic(kernel, q, k, v, mask)
        out = kernel(q, k, v, mask)
    assert _err(got, want) <= 1e-5
    assert out.shape == (B, H, N, D) and torch.isfinite(out).all()


def test_retnet_scans_both_ways_beyond_the_parallel_length(monkeypatch):
    """Past PARALLEL_MAX_LEN a non-causal RetNet site runs the two chunked scans: the same numbers."""
    kernel = _kernel("retnet", False)
    q, k, v = _qkv()
    mask = _mask(False)
    with torch.no_grad():
        parallel = kernel.mix(q, k, v, mask)
        monkeypatch.setattr(G, "PARALLEL_MAX_LEN", N - 1)
        scans = kernel.mix(q, k, v, mask)
    assert _err(parallel, _quadratic(kernel, q, k, v, mask)) <= 1e-5 and _err(scans, parallel) <= 1e-5


@pytest.mark.parametrize("size", [1, 5, 16])
def test_unit_lower_inverse_by_blocks_is_the_inverse(size):
    """DeltaNet's (I + tril(diag(beta) K K^T, -1))^-1 by blocks, on positive unit features (dot products
    near 1: the badly conditioned case), against float64's inverse."""
    g = torch.Generator().manual_seed(size)
    fk = torch.nn.functional.normalize(torch.rand(3, 4, size, 12, generator=g), dim=-1)
    beta = torch.rand(3, 4, size, 1, generator=g)
    system = torch.eye(size, dtype=torch.float64) + ((fk * beta) @ fk.transpose(-1, -2)).double().tril(-1)
    assert _err(G._unit_lower_inverse(fk, beta), torch.linalg.inv(system)) <= 1e-5


@pytest.mark.parametrize("feature_map", ["elu", "performer"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_other_feature_maps(mixer, feature_map):
    kernel = _kernel(mixer, True, feature_map=feature_map)
    q, k, v = _qkv()
    with torch.no_grad():
        assert _err(kernel.mix(q, k, v), _quadratic(kernel, q, k, v, None)) <= 1e-5


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_padded_keys_have_no_influence(mixer, causal):
    kernel = _kernel(mixer, causal)
    q, k, v = _qkv()
    k2, v2 = k.clone(), v.clone()
    k2[1, :, N - PAD:] = 5 * torch.randn(H, PAD, D)
    v2[1, :, N - PAD:] = 5 * torch.randn(H, PAD, D)
    mask = _mask(causal)
    with torch.no_grad():
        a, b = kernel(q, k, v, mask), kernel(q, k2, v2, mask)
    assert _err(b[1, :, :N - PAD], a[1, :, :N - PAD]) <= 1e-6 and torch.equal(a[0], b[0])


@pytest.mark.parametrize("mixer", MIXERS)
def test_causal_outputs_ignore_future_tokens(mixer):
    kernel = _kernel(mixer, True)
    q, k, v = _qkv()
    t = 13
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t:] = 5 * torch.randn(B, H, N - t, D)
    with torch.no_grad():
        assert _err(kernel(q2, k2, v2)[:, :, :t], kernel(q, k, v)[:, :, :t]) <= 1e-6


def _decode(kernel: G.GatedKernel, q, k, v, step=None) -> torch.Tensor:
    step = step or kernel.decode_step
    state = kernel.init_state(q.shape[0])
    outs = []
    for t in range(q.shape[-2]):
        o, state = step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        outs.append(o)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("mixer", MIXERS)
def test_recurrent_decode_matches_chunked(mixer):
    kernel = _kernel(mixer, True)
    q, k, v = _qkv()
    with torch.no_grad():
        assert _err(_decode(kernel, q, k, v), kernel(q, k, v)) <= 1e-5
    assert kernel.init_state(B).shape == (B, H, kernel.feature_width, D)  # constant in the sequence length


def test_decode_on_a_non_causal_site_is_a_clear_error():
    kernel = _kernel("gla", False)
    with pytest.raises(NotImplementedError, match="non-causal"):
        kernel.init_state(B)
    with pytest.raises(NotImplementedError, match="non-causal"):
        G.StateDecoder(kernel)


def test_retnet_decay_is_retnets_fixed_schedule_and_no_parameter():
    kernel = _kernel("retnet", True)
    gamma = torch.exp(kernel.log_gamma)
    assert torch.allclose(gamma, 1 - 2.0 ** (-5 - torch.arange(H).float()))
    assert "log_gamma" not in dict(kernel.named_parameters()) and "log_gamma" in kernel.state_dict()


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_parameter_gets_a_gradient(mixer):
    q, k, v = _qkv()
    shape = SiteShape.of(q, k, v, causal=True)
    kernel = G.GATED_KERNELS[mixer](shape, LINEAR_KERNELS["hedgehog"](shape), chunk_size=7)
    _perturb(kernel)
    kernel(q, k, v, _mask(True)).square().mean().backward()
    for name, p in kernel.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_fit_sets_the_output_scale_to_softmax():
    q, k, v = _qkv()
    v = 3 * v
    kernel = _kernel("gla", False)
    kernel.fit_batches([(q, k, v, None)])
    with torch.no_grad():
        target = softmax_attention(q, k, v, None, kernel.shape.scale)
        rms = torch.nn.functional.silu(kernel.gate_bias)
    assert torch.allclose(rms, target.pow(2).mean(dim=(0, 2)).sqrt(), rtol=1e-4)


def test_pass_options_are_checked():
    with pytest.raises(PassError, match="feature_map must be one of elu, performer, hedgehog"):
        parse_pass("linear-attention:feature_map=flow,mixer=gla")
    with pytest.raises(PassError, match="window=0"):
        parse_pass("linear-attention:mixer=delta,window=8")
    with pytest.raises(ValueError, match="self-attention site"):
        q, k, v = _qkv()
        shape = SiteShape.of(q, k[:, :, :10], v[:, :, :10])
        G.GLAKernel(shape, LINEAR_KERNELS["elu"](shape))


# -- on a Llama-style model (RoPE, grouped-query attention) ----------------------------------------------


def _llama(mixer: str):
    fixture = zoo.llama()
    m2 = ptool.transform(fixture.model, [f"linear-attention:mixer={mixer},chunk_size=4,transfer_steps=0"],
                         fixture.example_inputs, example_kwargs=fixture.example_kwargs)
    gm = m2.graph_module
    calls = [node for node in gm.graph.nodes if node.op == "call_module" and "ptool_attention" in node.target]
    for i, call in enumerate(calls):
        _perturb(gm.get_submodule(call.target), seed=i)
    return fixture, m2, gm, calls


@pytest.mark.parametrize("mixer", MIXERS)
def test_llama_chunked_equals_quadratic_and_decode_equals_parallel(mixer):
    fixture, m2, gm, calls = _llama(mixer)
    assert m2.report[0].rewritten == 2
    ids = fixture.example_inputs[0]
    runs = [fixture.heldout(), ((ids, torch.ones_like(ids)), {})]  # padded batch; all-real tokens for decoding
    values = record_values(gm, [a for c in calls for a in c.args if a is not None] + calls, runs)
    for call in calls:
        kernel: G.GatedKernel = gm.get_submodule(call.target)
        assert kernel.shape.causal and kernel.shape.kv_heads < kernel.shape.heads
        q, k, v, mask = (values[0][a] if a is not None else None for a in call.args)
        with torch.no_grad():
            quadratic = kernel._output(_quadratic(kernel, q, k, v, mask).float(), q)
        assert _err(values[0][call], quadratic) <= 1e-4
        q, k, v = (values[1][a] for a in call.args[:3])
        with torch.no_grad():
            assert _err(_decode(kernel, q, k, v), values[1][call]) <= 1e-4


def _lowered_rel_error(mixer: str, backend: str) -> float:
    fixture, m2, _, _ = _llama(mixer)
    run = ptool.compile(m2, backend=backend)
    args, kwargs = fixture.heldout()
    with torch.no_grad():
        return ptool.verify.compare(m2(*args, **kwargs), run(*args, **kwargs)).max_rel_error


@pytest.mark.parametrize("mixer", MIXERS)
def test_llama_lowers_to_onnxruntime(mixer):
    assert _lowered_rel_error(mixer, "onnxruntime") <= 1e-4


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.parametrize("mixer", MIXERS)
def test_llama_lowers_to_tvm(mixer):
    assert _lowered_rel_error(mixer, "tvm") <= 1e-4


# -- kernels and the decode step, lowered ----------------------------------------------------------------


def _lowered(kernel, backend: str, causal: bool):
    model = KernelSite(kernel).eval()
    args = (*_qkv(), _mask(causal))
    run = ptool.compile(model, backend, args, **({"intra_op_threads": 1} if backend == "onnxruntime" else {}))
    with torch.no_grad():
        return ptool.verify.compare(model(*args), run(*args)).max_rel_error, run


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_kernel_lowers_to_onnxruntime(mixer, causal):
    err, _ = _lowered(_kernel(mixer, causal), "onnxruntime", causal)
    assert err <= 1e-4


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_step_lowers_to_onnxruntime(mixer):
    kernel = _kernel(mixer, True)
    q, k, v = _qkv()
    decoder = G.StateDecoder(kernel).eval()
    run = ptool.compile(decoder, "onnxruntime", (q[:, :, :1], k[:, :, :1], v[:, :, :1], kernel.init_state(B)),
                        intra_op_threads=1)
    with torch.no_grad():  # ORT is fed its own state: the whole prefix runs through the exported step
        assert _err(_decode(kernel, q, k, v, step=lambda *a: tuple(run(*a))), kernel(q, k, v)) <= 1e-4


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_kernel_lowers_to_tvm(mixer, causal):
    err, run = _lowered(_kernel(mixer, causal), "tvm", causal)
    assert err <= 1e-4
    assert run.info["frontend"] == "exported_program"  # imported natively, not via the ONNX fallback
