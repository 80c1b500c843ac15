"""smooth-quant: exact in float on every fixture, 1/s absorbed where it should be, skips with reasons,
outliers reduced on real MiniLM activations, ONNX Runtime agreement."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import ptool
from ptool.errors import PassError
from ptool.ir.graph import is_op
from ptool.options import build_pass
from ptool.passes.base import PassContext
from ptool.passes.quant.smooth import SmoothQuant, smoothing_scales
from tests.passes.quant._fixtures import fixture, heldout_rel, run_on_minilm

aten = torch.ops.aten
RTOL = 1e-5  # METHODS 7.2: exact passes, fp32
CALIBRATION = 3


@functools.cache
def _smoothed(name: str, online: bool = True):
    f = fixture(name)
    return ptool.transform(f.model, [SmoothQuant(online=online)], f.example_inputs, example_kwargs=f.example_kwargs,
                           calibration=f.batches(CALIBRATION))


# model -> how many sites absorb 1/s where (counts in the notes)
EXPECTED = {
    "llama": {"into-norm": 5, "into-value": 2, "into-product": 2},  # RMSNorm gammas, v->o, SwiGLU up
    "vit": {"into-norm": 5, "into-value": 2, "online": 2},  # pre-LN affines; fc2 after GELU is online
    "gpt2": {"into-norm": 4, "into-value": 2, "online": 2},  # lm_head is tied to wte: skipped
    "bert": {"online": 7, "into-value": 2},  # post-LN: the norm output is also the residual
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_exact_and_absorbed_where_expected(name):
    m2 = _smoothed(name)
    rec = m2.report["smooth-quant"]
    assert {k: rec.notes[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert rec.rewritten == sum(EXPECTED[name].values())
    assert rec.fidelity.max_rel_error <= RTOL  # the pass manager's check on example + calibration
    assert heldout_rel(name, m2) <= RTOL  # ours, on a held-out batch
    online = [n for n in m2.graph_module.graph.nodes if is_op(n, aten.mul) and any(
        isinstance(a, torch.fx.Node) and "smooth_inverse_scale" in str(a.target) for a in n.args)]
    assert len(online) == EXPECTED[name].get("online", 0)


def test_gpt2_skips_the_tied_head_with_the_reason():
    (skip,) = _smoothed("gpt2").report["smooth-quant"].skipped
    assert "lm_head" in skip.site and "tied" in skip.reason


def test_llama_norm_gamma_and_weight_keep_their_product():
    """gamma' = gamma / s and W' = W diag(s): W' diag(gamma') == W diag(gamma), and s is not trivial."""
    f, m2 = fixture("llama"), _smoothed("llama")
    params = dict(m2.graph_module.named_parameters())
    layer = f.model.model.layers[0]
    gamma = layer.input_layernorm.weight.double()
    new_gamma = params["model.layers.0.input_layernorm.weight"].double()
    for proj in ("q_proj", "k_proj"):  # (v_proj's rows also carry o_proj's 1/s)
        w = getattr(layer.self_attn, proj).weight.double()
        new_w = params[f"model.layers.0.self_attn.{proj}.weight"].double()
        torch.testing.assert_close(new_w * new_gamma, w * gamma, rtol=1e-5, atol=1e-7)
    ratio = new_gamma / gamma
    assert ratio.std() / ratio.mean() > 0.05  # s varies per channel


def test_post_ln_sites_are_skipped_with_reasons_when_online_is_off():
    rec = _smoothed("bert", online=False).report["smooth-quant"]
    assert rec.notes["into-value"] == 2 and rec.rewritten == 2 and "online" not in rec.notes
    reasons = {s.site: s.reason for s in rec.skipped}
    assert len(reasons) == 7
    assert sum("residual stream (post-LN)" in r for r in reasons.values()) == 4  # q/k/v and fc1 of 2 layers
    assert sum("gelu" in r for r in reasons.values()) == 2  # fc2
    assert all("online=true" in r for r in reasons.values())


def test_second_run_changes_nothing():
    f, m2 = fixture("llama"), _smoothed("llama")
    ctx = PassContext(calibration=[a for a, _ in f.batches(1)], calibration_calls=f.batches(1))
    gm = m2.graph_module
    before = str(gm.graph)
    result = SmoothQuant().run(gm, ctx)
    assert (result.changed, result.rewritten) == (False, 0) and str(gm.graph) == before
    assert all("already smoothed" in s.reason for s in result.skipped if "lm_head" not in s.site)


@functools.cache
def _minilm_smoothed():
    """MiniLM smoothed by the pass directly (the manager's extra verification runs cost time here)."""
    return run_on_minilm(SmoothQuant(), CALIBRATION)


def test_minilm_channel_max_ratio_falls_on_real_activations():
    gm, result = _minilm_smoothed()
    sites = result.notes["sites"]
    norm_readers = {k: v for k, v in sites.items() if k.endswith(("query+key+value", "intermediate:dense"))}
    assert len(norm_readers) == 12
    for label, s in norm_readers.items():  # LayerNorm outputs carry BERT's outlier channels
        assert s["after"]["channel_max_ratio"] < 0.7 * s["before"]["channel_max_ratio"], label
    mean = result.notes["mean"]
    assert mean["after"]["channel_max_ratio"] < mean["before"]["channel_max_ratio"]
    f = fixture("minilm")
    args, kwargs = f.inputs(11)
    with torch.no_grad():
        assert ptool.verify.compare(f.run((args, kwargs)), gm(*args, **kwargs)).max_rel_error <= RTOL


def test_smoothing_scales_formula():
    s = smoothing_scales(torch.tensor([4.0, 0.0, 9.0]), torch.tensor([1.0, 2.0, 0.0]), 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))  # 4^.5/1^.5; zero max -> 1


def test_bad_options_and_missing_calibration_raise():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(PassError, match="has no option 'alpah'.*did you mean 'alpha'"):
        build_pass(SmoothQuant, {"alpah": "0.5"})
    with pytest.raises(PassError, match=r"'online'.*\(allowed: true \| false\)"):
        build_pass(SmoothQuant, {"online": "maybe"})
    parsed = build_pass(SmoothQuant, {"alpha": "0.8", "layers": "mlp+attn"})
    assert parsed == SmoothQuant(alpha=0.8, layers=("mlp", "attn"))
    f = fixture("bert")
    with pytest.raises(PassError, match="needs calibration data"):
        ptool.transform(f.model, [SmoothQuant()], f.example_inputs)


def test_layers_option_selects_linears_by_module_path():
    f = fixture("llama")
    m2 = ptool.transform(f.model, [SmoothQuant(layers=("mlp",))], f.example_inputs, calibration=f.batches(1))
    sites = m2.report["smooth-quant"].notes["sites"]
    assert set(sites) == {f"model.layers.{i}.mlp:{n}" for i in (0, 1) for n in ("gate_proj+up_proj", "down_proj")}


def test_onnxruntime_matches_torch(tmp_path):
    import onnxruntime as ort

    f, m2 = fixture("bert"), _smoothed("bert")  # with online muls
    path = ptool.export_onnx(m2, tmp_path / "bert_smooth.onnx", example_inputs=f.example_inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args, _ = f.inputs(3)
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = m2(*args)
    ref = [want.last_hidden_state, want.pooler_output]
    fid = ptool.verify.compare(ref, [torch.from_numpy(np.asarray(g)) for g in got])
    assert fid.max_rel_error <= 1e-4, fid
