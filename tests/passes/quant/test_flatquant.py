"""rotate:method=flatquant: the Kronecker-factored SVD transform, block grouping, exactness in float on the
Llama / GPT-2 / ViT / BERT fixtures, options, and a lower simulated W4A4 error than the Hadamard on a
Llama with outlier channels."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import ptool
from ptool.errors import PassError
from ptool.frontends.torch_export import capture
from ptool.options import build_pass
from ptool.passes.base import PassContext
from ptool.passes.quant import _flat, _sites
from ptool.passes.quant._learn import kronecker_factors
from ptool.passes.quant.rotate import Rotate
from ptool.passes.quant.simulate import simulate_quantization
from tests.passes.quant._fixtures import fixture, heldout_rel, onnxruntime_rel_error

RTOL = 1e-5  # METHODS 7.2: exact passes, fp32
STEPS = 5


# ------------------------------------------------------------------------------ the transform
@pytest.mark.parametrize("k,sizes", [(8, (2, 4)), (32, (4, 8)), (384, (16, 24)), (768, (24, 32)),
                                     (1536, (32, 48)), (11008, (86, 128)), (7, (1, 7))])
def test_kronecker_factors_are_nearest_to_square(k, sizes):
    assert kronecker_factors(k) == sizes


def _perturbed(k: int, seed: int) -> _flat.KronAffine:
    """A KronAffine away from its start: random skew parts of U and V, singular values and scales."""
    t = _flat.KronAffine(k, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return t


@pytest.mark.parametrize("k,blocks", [(24, 1), (8, 3)])
def test_transform_is_invertible_and_its_dense_form_matches(k, blocks):
    t = _perturbed(k, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, blocks * k, generator=gen, dtype=torch.float64)
    w = torch.randn(6, blocks * k, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        xt, wt = t.x(x.float()).double(), t.w(w.float()).double()
    s, p, p_inv, (p1, p2) = t.dense()
    torch.testing.assert_close(p, torch.kron(p1, p2), rtol=0, atol=0)
    torch.testing.assert_close(p @ p_inv, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)
    assert torch.linalg.cond(p) > 1.5  # not orthogonal: the singular values moved
    dense_t = torch.block_diag(*[p / s[:, None]] * blocks)
    torch.testing.assert_close(xt, x @ dense_t, rtol=0, atol=1e-4)  # forward == the folded matrix
    torch.testing.assert_close(xt @ wt.t(), x @ w.t(), rtol=0, atol=1e-4)  # (x T)(W T^-T)^T = x W^T
    dense_inv = torch.block_diag(*[p_inv * s[None, :]] * blocks)
    torch.testing.assert_close(x @ dense_t @ dense_inv, x, rtol=0, atol=1e-10)


def test_transform_starts_as_a_kronecker_product_of_hadamards():
    from ptool.passes.quant.hadamard import hadamard

    s, p, _, _ = _flat.KronAffine(32).dense()
    torch.testing.assert_close(p, torch.kron(hadamard(4), hadamard(8)), rtol=0, atol=1e-6)
    torch.testing.assert_close(s, torch.ones(32, dtype=torch.float64))


def test_blocks_group_sites_by_layer_with_their_boundary_values():
    f = fixture("llama")
    gm = capture(f.model, f.example_inputs, f.example_kwargs).graph_module
    sites, _ = _sites.find_sites(gm)
    blocks = _flat.find_blocks(gm, sites)
    assert [b.prefix for b in blocks] == ["model.layers.0", "model.layers.1", "lm_head"]
    assert [len(b.sites) for b in blocks] == [4, 4, 1]  # q/k/v, o_proj, gate/up, down_proj; lm_head
    layer0 = blocks[0]
    assert len(layer0.outputs) == 1  # the residual stream after the block
    assert layer0.outputs[0] in blocks[1].inputs
    assert len(layer0.inputs) >= 3  # the stream, RoPE's cos and sin (and the mask)


# ------------------------------------------------------------------------------ exactness
@functools.cache
def _flat_model(name: str, **options):
    f = fixture(name)
    return ptool.transform(f.model, [Rotate(method="flatquant", train_steps=STEPS, act_bits=4, **options)],
                           f.example_inputs, example_kwargs=f.example_kwargs, calibration=f.batches(3))


EXPECTED = {  # model -> how its sites were folded
    "llama": {"residual-reader+online": 5, "per-head": 2, "scale+online": 2},  # down_proj: 1/s into up_proj
    "gpt2": {"scale+online": 4, "per-head": 2, "online": 2},  # c_attn, c_fc: 1/s into ln_1/ln_2; c_proj after GELU
    "vit": {"scale+online": 5, "per-head": 2, "online": 2},  # + the classifier after the final LayerNorm
    "bert": {"online": 7, "per-head": 2},  # post-LN: the norm output is also the residual stream
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_exact_in_float_on_every_architecture(name):
    m2 = _flat_model(name)
    rec = m2.report["rotate"]
    assert {k: rec.notes[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert rec.fidelity.max_rel_error <= RTOL  # the pass manager's check on example + calibration
    assert heldout_rel(name, m2) <= RTOL  # ours, on a held-out batch
    losses = rec.notes["flatquant_loss"]
    assert all(v["trained"] <= v["start"] for v in losses.values())
    assert any(v["trained"] < v["start"] for v in losses.values())  # training lowered at least one block's loss


def test_second_run_changes_nothing():
    f, m2 = fixture("llama"), _flat_model("llama")
    gm = m2.graph_module
    before = str(gm.graph)
    ctx = PassContext(example_inputs=f.example_inputs, calibration=[a for a, _ in f.batches(2)])
    result = Rotate(method="flatquant", train_steps=STEPS).run(gm, ctx)
    assert (result.changed, result.rewritten) == (False, 0) and str(gm.graph) == before


def test_online_off_keeps_only_sites_a_linear_absorbs():
    rec = _flat_model("bert", online=False).report["rotate"]
    assert rec.notes["per-head"] == 2 and rec.rewritten == 2 and "online" not in rec.notes
    assert sum("online=true" in s.reason for s in rec.skipped) == 7


# ------------------------------------------------------------------------------ options
def test_flatquant_needs_calibration():
    f = fixture("llama")
    with pytest.raises(PassError, match="rotate:method=flat' needs calibration data"):
        ptool.transform(f.model, [Rotate(method="flatquant")], f.example_inputs)
    assert Rotate(method="flatquant").method == "flat"  # the public name is flat; flatquant is kept for it


def test_bad_options_name_flatquant_among_the_allowed_methods():
    with pytest.raises(ValueError, match="method must be one of hadamard, learned, flat, flatquant"):
        Rotate(method="flatqunat")
    with pytest.raises(PassError, match=r"\(allowed: hadamard \| learned \| flat \| flatquant\).*did you mean 'flatquant'"):
        build_pass(Rotate, {"method": "flatqunat"})
    assert build_pass(Rotate, {"method": "flatquant", "train_steps": "7", "act_bits": "4"}) == Rotate(
        method="flat", train_steps=7, act_bits=4)


# ------------------------------------------------------------------------------ W4A4
def _outlier_llama():
    """The Llama fixture with 2 channels of every RMSNorm gamma scaled 20x (tools/eval_rotate.py's llama-gamma)."""
    f = fixture("llama")
    model = copy.deepcopy(f.model)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight[:2] *= 20
    return f, model


def _w4a4_error(reference, m2, batches) -> float:
    """Relative squared error of the logits under simulated W4A4 (lm_head in float), over held-out batches."""
    sim = simulate_quantization(m2.graph_module, weight_bits=4, act_bits=4, exclude=("lm_head",))
    num = den = 0.0
    with torch.no_grad():
        for args, kwargs in batches:
            ref, out = reference(*args, **kwargs).logits, sim(*args, **kwargs).logits
            num, den = num + float((out - ref).pow(2).sum()), den + float(ref.pow(2).sum())
    return num / den


@pytest.mark.slow
def test_w4a4_error_below_hadamard_on_outlier_llama():
    f, model = _outlier_llama()
    calib, heldout = f.batches(8, seed=100), f.batches(8, seed=1000)
    args = calib[0][0]
    errors = {}
    for method in ("hadamard", "flatquant"):
        m2 = ptool.transform(model, [Rotate(method=method, train_steps=40, act_bits=4)], args,
                             calibration=[a for a, _ in calib])
        assert m2.report["rotate"].fidelity.max_rel_error <= RTOL
        errors[method] = _w4a4_error(model, m2, heldout)
    assert errors["flatquant"] < 0.85 * errors["hadamard"], errors  # measured: 0.061 vs 0.081 (0.75x)


# ------------------------------------------------------------------------------ lowering
def _kronecker_nodes(gm) -> int:
    return sum(n.target is torch.ops.aten.unflatten.int for n in gm.graph.nodes)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_online_kronecker_transforms_run_on_onnxruntime(name, tmp_path):
    m2 = _flat_model(name)
    rec = m2.report["rotate"]
    online = sum(v for k, v in rec.notes.items() if k.endswith("online"))
    assert _kronecker_nodes(m2.graph_module) == online  # one P_1 (x) P_2 per online site, not a dense matrix
    fid = onnxruntime_rel_error(name, m2, tmp_path / f"{name}_flatquant.onnx")
    assert fid.max_rel_error <= 1e-4, fid
