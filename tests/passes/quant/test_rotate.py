"""rotate: Hadamard matrices, exactness on every fixture, the global residual rotation on Llama,
per-head and online sites, skips with reasons, QSUR on real MiniLM activations, learned transforms,
ONNX Runtime agreement."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import ptool
from ptool.errors import PassError
from ptool.ir.graph import is_op
from ptool.options import build_pass
from ptool.passes.base import PassContext
from ptool.passes.quant.hadamard import hadamard, has_hadamard, orthogonal, random_orthogonal
from ptool.passes.quant.rotate import Rotate
from tests.passes.quant._fixtures import fixture, heldout_rel, onnxruntime_rel_error, run_on_minilm

aten = torch.ops.aten
RTOL = 1e-5  # METHODS 7.2: exact passes, fp32
CALIBRATION = 3


# ------------------------------------------------------------------------------ Hadamard matrices
# every size the fixtures use: hidden 32, head 8, MLP 64 (BERT/ViT/GPT-2/Llama); MiniLM 384, 1536, head 32
@pytest.mark.parametrize("n", [2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 64, 384, 1536])
def test_hadamard_is_orthogonal_with_equal_magnitude_entries(n):
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


def test_powers_of_two_are_sylvester():
    h = hadamard(8) * math.sqrt(8)
    torch.testing.assert_close(h, torch.kron(torch.kron(*[torch.tensor([[1.0, 1], [1, -1]], dtype=torch.float64)] * 2),
                                             torch.tensor([[1.0, 1], [1, -1]], dtype=torch.float64)))


def test_sizes_without_a_construction_fall_back_to_a_seeded_random_orthogonal():
    assert not has_hadamard(6) and not has_hadamard(10) and has_hadamard(12)
    with pytest.raises(ValueError, match="no Hadamard construction for size 6"):
        hadamard(6)
    q = orthogonal(6, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q, random_orthogonal(6, seed=3))
    assert not torch.equal(q, random_orthogonal(6, seed=4))


# ------------------------------------------------------------------------------ the pass on fixtures
@functools.cache
def _rotated(name: str, **options):
    f = fixture(name)
    return ptool.transform(f.model, [Rotate(**options)], f.example_inputs, example_kwargs=f.example_kwargs,
                           calibration=f.batches(CALIBRATION))


def _online_matmuls(gm) -> int:
    return sum(is_op(n, aten.matmul) and any(isinstance(a, torch.fx.Node) and "rotation" in str(a.target)
                                             for a in n.args) for n in gm.graph.nodes)


EXPECTED = {  # model -> how its sites were rotated
    "llama": {"residual-reader": 5, "per-head": 2, "online": 2},  # q/k/v, gate/up, lm_head via R_res; down online
    "bert": {"online": 7, "per-head": 2},  # post-LN: no residual rotation; q/k/v, fc1, fc2, pooler online
    "vit": {"online": 7, "per-head": 2},  # LayerNorm: not rotation-invariant
    "gpt2": {"online": 6, "per-head": 2},  # the tied lm_head is left alone
}
RESIDUAL_REASON = {
    "bert": "LayerNorm layer_norm subtracts the mean",
    "gpt2": "LayerNorm layer_norm subtracts the mean",
    "vit": "no token embedding starts a residual stream (and LayerNorm",
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_exact_and_rotated_where_expected(name):
    m2 = _rotated(name)
    rec = m2.report["rotate"]
    assert {k: rec.notes[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert rec.fidelity.max_rel_error <= RTOL  # the pass manager's check on example + calibration
    assert heldout_rel(name, m2) <= RTOL  # ours, on a held-out batch
    assert _online_matmuls(m2.graph_module) == EXPECTED[name]["online"]
    if name in RESIDUAL_REASON:
        (residual,) = [s for s in rec.skipped if s.site == "residual stream"]
        assert RESIDUAL_REASON[name] in residual.reason


def test_llama_residual_rotation_folds_gamma_and_rotates_embedding_readers_and_writers():
    f, m2 = fixture("llama"), _rotated("llama")
    rec = m2.report["rotate"]
    assert rec.notes["residual"] == {"width": 32, "readers": 11, "writers": 4, "embeddings": 1}
    assert rec.rewritten == 1 + 2 + 2  # the stream, 2 per-head, 2 online
    params = dict(m2.graph_module.named_parameters())
    q = hadamard(32)
    torch.testing.assert_close(params["model.embed_tokens.weight"].double(),
                               f.model.model.embed_tokens.weight.double() @ q, rtol=0, atol=1e-6)
    layer = f.model.model.layers[0]
    # a reader: W diag(gamma) Q; a writer (down_proj also reads an online rotation H_64): Q^T W H_64
    torch.testing.assert_close(params["model.layers.0.self_attn.q_proj.weight"].double(),
                               layer.self_attn.q_proj.weight.double() * layer.input_layernorm.weight.double() @ q,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(params["model.layers.0.mlp.down_proj.weight"].double(),
                               q.T @ layer.mlp.down_proj.weight.double() @ hadamard(64), rtol=0, atol=1e-6)
    assert not any(n.endswith("layernorm.weight") or n == "model.norm.weight" for n in params)  # gammas folded


def test_online_off_skips_unfoldable_sites_with_reasons():
    rec = _rotated("bert", online=False).report["rotate"]
    assert rec.notes["per-head"] == 2 and rec.rewritten == 2 and "online" not in rec.notes
    reasons = [s.reason for s in rec.skipped if s.site != "residual stream"]
    assert len(reasons) == 7 and all("online=true" in r for r in reasons)
    assert sum("residual stream (post-LN)" in r for r in reasons) == 4
    assert sum("gelu" in r for r in reasons) == 2
    llama = _rotated("llama", online=False).report["rotate"]
    assert "online" not in llama.notes and llama.notes["per-head"] == 2 and "residual" in llama.notes
    down = [s for s in llama.skipped if "down_proj" in s.site]
    assert len(down) == 2 and all("elementwise product" in s.reason for s in down)


def test_layers_subset_disables_the_residual_rotation_with_the_reason():
    rec = _rotated("llama", layers=("mlp",)).report["rotate"]
    mlp_sites = {f"model.layers.{i}.mlp:{n}" for i in (0, 1) for n in ("gate_proj+up_proj", "down_proj")}
    assert set(rec.notes["sites"]) == mlp_sites
    (residual,) = [s for s in rec.skipped if s.site == "residual stream"]
    assert "layers= selects a subset" in residual.reason


def test_second_run_changes_nothing():
    f, m2 = fixture("llama"), _rotated("llama")
    gm = m2.graph_module
    before = str(gm.graph)
    result = Rotate().run(gm, PassContext(example_inputs=f.example_inputs))
    assert (result.changed, result.rewritten) == (False, 0) and str(gm.graph) == before


# ------------------------------------------------------------------------------ real activations
def test_qsur_rises_on_real_minilm_activations():
    """BERT-family LayerNorm outputs carry a few huge channels; a Hadamard spreads them (QSUR up)."""
    f = fixture("minilm")
    gm, result = run_on_minilm(Rotate(), CALIBRATION)
    sites = result.notes["sites"]
    norm_readers = {k: v for k, v in sites.items() if k.endswith(("query+key+value", "intermediate:dense"))}
    assert len(norm_readers) == 12
    for label, s in norm_readers.items():
        assert s["after"]["qsur"] > 2 * s["before"]["qsur"], label
        assert s["after"]["kurtosis"] < s["before"]["kurtosis"], label
    mean = result.notes["mean"]
    assert mean["after"]["qsur"] > 1.5 * mean["before"]["qsur"]
    args, kwargs = f.inputs(11)
    with torch.no_grad():
        assert ptool.verify.compare(f.run((args, kwargs)), gm(*args, **kwargs)).max_rel_error <= RTOL


# ------------------------------------------------------------------------------ learned
def test_learned_is_exact_and_lowers_the_simulated_error_of_each_site():
    m2 = _rotated("llama", method="learned", train_steps=8)
    rec = m2.report["rotate"]
    # residual readers keep the Hadamard R_res and may get a learned norm scaling (a stored mul)
    assert rec.notes.get("residual-reader", 0) + rec.notes.get("residual-reader+scale", 0) == 5
    assert (rec.notes["per-head"], rec.notes["online"]) == (2, 2)
    assert rec.fidelity.max_rel_error <= RTOL
    assert heldout_rel("llama", m2) <= RTOL
    losses = rec.notes["learned_loss"]  # per site: relative W4A8 output error, Hadamard vs learned
    assert len(losses) == 9
    assert all(v["learned"] <= v["hadamard"] for v in losses.values())
    assert sum(v["learned"] < 0.9 * v["hadamard"] for v in losses.values()) >= 3
    hadamard_weights = dict(_rotated("llama").graph_module.named_parameters())
    changed = [n for n, p in m2.graph_module.named_parameters()
               if n in hadamard_weights and not torch.equal(p, hadamard_weights[n])]
    assert changed  # at least one site trained away from the Hadamard


def test_learned_needs_calibration():
    f = fixture("llama")
    with pytest.raises(PassError, match="rotate:method=learned' needs calibration data"):
        ptool.transform(f.model, [Rotate(method="learned")], f.example_inputs)


def test_bad_options_raise_naming_allowed_values():
    with pytest.raises(ValueError, match="method must be one of hadamard, learned"):
        Rotate(method="hadamrd")
    with pytest.raises(PassError, match=r"\(allowed: hadamard \| learned \| flat \| flatquant\).*did you mean 'hadamard'"):
        build_pass(Rotate, {"method": "hadamrd"})
    with pytest.raises(ValueError, match=r"weight_bits and act_bits must be in \[2, 16\]"):
        Rotate(act_bits=1)
    with pytest.raises(ValueError, match="train_steps must be >= 1"):
        Rotate(train_steps=0)
    assert build_pass(Rotate, {"method": "learned", "online": "false"}) == Rotate(method="learned", online=False)


# ------------------------------------------------------------------------------ ONNX Runtime
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_onnxruntime_matches_torch(name, tmp_path):
    fid = onnxruntime_rel_error(name, _rotated(name), tmp_path / f"{name}_rotated.onnx")
    assert fid.max_rel_error <= 1e-4, fid


# ------------------------------------------------------------------------------ simulation helper
def test_simulated_quantization_wraps_every_linear_and_leaves_the_graph_alone():
    from ptool.passes.quant.simulate import fake_quantize_activation, simulate_quantization

    f, m2 = fixture("llama"), _rotated("llama")
    gm = m2.graph_module
    before = str(gm.graph)
    args, _ = f.inputs(5)
    with torch.no_grad():
        ref = gm(*args).logits
        float_sim = simulate_quantization(gm, weight_bits=None, act_bits=None)(*args).logits
        sim = simulate_quantization(gm, weight_bits=4, act_bits=8, exclude=("lm_head",))
        out = sim(*args).logits
    assert str(gm.graph) == before and torch.equal(float_sim, ref)
    quantizers = [n for n in sim.graph.nodes if n.target is fake_quantize_activation]
    assert len(quantizers) == 14  # 7 Linears per layer x 2 layers; lm_head left in float
    assert 0.9 < ptool.verify.compare(ref, out).cosine < 1.0
