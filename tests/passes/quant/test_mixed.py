"""quantize:mode=auto: float / int8 / int4 per layer under a byte budget, from measured sensitivity."""

from __future__ import annotations

import copy
import functools
import itertools
import random

import pytest
import torch

import ptool
from ptool.default_model import encode, reference_sentences
from ptool.errors import PassError
from ptool.frontends.huggingface import sample_sentences
from ptool.frontends.torch_export import capture
from ptool.passes.base import PassContext
from ptool.passes.quant.mixed import Knapsack, Layer, Option, stored_bytes
from ptool.passes.quant.quantize import Quantize
from ptool.passes.registry import parse_pass
from tests.models import zoo

SEQ = 16


@functools.cache
def _embedder():
    """The real all-MiniLM-L6-v2 sentence embedder, captured once; calibration on the Python manual,
    held-out: the 64 shipped sentences (never calibrated on), in batches of 2 x 16 tokens."""
    f = zoo.sentence_embedder()
    gm = capture(f.model, f.example_inputs, f.example_kwargs).graph_module
    ids, mask = encode(reference_sentences()[:8], SEQ)
    calls = [((ids[i:i + 2], mask[i:i + 2]), {}) for i in range(0, 8, 2)]
    ids, mask = encode(sample_sentences(), SEQ)
    heldout = [(ids[i:i + 2], mask[i:i + 2]) for i in range(0, len(ids), 2)]
    return f, gm, calls, heldout


@functools.cache
def _run(spec: str):
    """``(graph, notes, held-out cosine)`` of ``spec`` run on a fresh copy of the embedder's graph."""
    f, gm0, calls, heldout = _embedder()
    gm = copy.deepcopy(gm0)
    p = parse_pass(spec)
    result = p.run(gm, PassContext(calibration=[a for a, _ in calls], calibration_calls=calls))
    gm.recompile()
    with torch.no_grad():
        cos = torch.cat([torch.nn.functional.cosine_similarity(f.model(*x), gm(*x), dim=-1) for x in heldout])
    return gm, result, float(cos.mean())


@functools.cache
def _bert():
    f = zoo.bert()
    return f, capture(f.model, f.example_inputs, f.example_kwargs).graph_module, f.batches(4)


@functools.cache
def _bert_run(spec: str):
    """``(graph, result, held-out cosine)`` of ``spec`` on the small random-weight BERT (2 layers, hidden 32)."""
    f, gm0, calls = _bert()
    gm = copy.deepcopy(gm0)
    result = parse_pass(spec).run(gm, PassContext(calibration=[a for a, _ in calls], calibration_calls=calls))
    gm.recompile()
    cos = [ptool.verify.compare(f.run(f.heldout(seed)), gm(*f.heldout(seed)[0], **f.heldout(seed)[1])).cosine
           for seed in (1, 2, 3)]
    return gm, result, sum(cos) / len(cos)


# ------------------------------------------------------------------------------ the solver
def _random_layers(seed: int, n: int) -> list[Layer]:
    rng = random.Random(seed)
    layers = []
    for _ in range(n):
        size = rng.randint(10, 1000)
        opts = [Option("float", 4 * size), Option("int8", size + rng.randint(0, 8), rng.random() * 1e-3),
                Option("int4", size // 2 + rng.randint(0, 8), rng.random() * 1e-2)]
        layers.append(Layer(site=None, options=rng.sample(opts, 3)))
    return layers


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_is_optimal_and_never_over_capacity(seed):
    layers = _random_layers(seed, 6)
    knapsack = Knapsack(layers)
    for capacity in range(knapsack.base, knapsack.base + knapsack.steps * knapsack.unit + 1, 97):
        sol = knapsack.solve(knapsack.step_of(capacity))
        assert sol.bytes <= capacity
        feasible = [sum(o.error for o in combo) for combo in itertools.product(*(la.options for la in layers))
                    if sum(o.bytes for o in combo) <= capacity]
        # optimal up to the rounding of each choice's bytes to a step (unit = 1 byte here: exact)
        assert knapsack.unit == 1 and sol.predicted == pytest.approx(min(feasible), rel=1e-12, abs=1e-15)
    assert knapsack.step_of(knapsack.base - 1) == -1


def test_knapsack_error_falls_and_bytes_rise_with_the_budget():
    knapsack = Knapsack(_random_layers(7, 60))
    assert knapsack.unit > 1  # 60 layers span more bytes than the DP has steps: rounded up
    sols = [knapsack.solve(k) for k in range(0, knapsack.steps + 1, max(1, knapsack.steps // 50))]
    for small, big in itertools.pairwise(sols):
        assert big.predicted <= small.predicted
    capacities = [knapsack.base + k * knapsack.unit for k in range(0, knapsack.steps + 1, max(1, knapsack.steps // 50))]
    assert all(s.bytes <= c for s, c in zip(sols, capacities))
    front = knapsack.front_steps()
    assert all(knapsack.best[a] > knapsack.best[b] for a, b in itertools.pairwise(front))


# ------------------------------------------------------------------------------ on a small BERT
BUDGETS = (0.2, 0.3, 0.45)


@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_is_respected_exactly(budget):
    gm, result, _ = _bert_run(f"quantize:mode=auto,budget={budget}")
    _, gm0, _ = _bert()
    before = stored_bytes(gm0)
    notes = result.notes["mixed_precision"]
    assert notes["bytes_before"] == before
    assert stored_bytes(gm) == notes["bytes_after"] <= int(budget * before)
    assert notes["bytes_after"] >= 0.9 * budget * before  # the budget is used, not wasted
    rows = notes["layers"]
    assert len(rows) == 2 * 6 + 1 + 3  # 6 Linears a layer, the pooler; word, position and token-type tables
    assert {r["choice"] for r in rows} <= {"float", "int8", "int4"}
    fixed = before - sum(4 * r["params"] for r in rows)
    assert sum(r["bytes"] for r in rows) + fixed == notes["bytes_after"]


def test_choice_is_monotone_in_the_budget():
    """More bytes: a larger model, a lower predicted and measured output error, a higher held-out cosine."""
    runs = [_bert_run(f"quantize:mode=auto,budget={b}") for b in BUDGETS]
    notes = [r[1].notes["mixed_precision"] for r in runs]
    assert notes[0]["bytes_after"] < notes[1]["bytes_after"] < notes[2]["bytes_after"]
    assert notes[0]["predicted_error"] > notes[1]["predicted_error"] > notes[2]["predicted_error"]
    assert notes[0]["measured_error"] > notes[1]["measured_error"] > notes[2]["measured_error"]
    cosines = [r[2] for r in runs]
    assert cosines[0] < cosines[1] < cosines[2], cosines
    bits = {"float": 32, "int8": 8, "int4": 4}
    for small, big in itertools.pairwise(notes):  # few layers lose bits when the budget grows
        lower = sum(bits[b["choice"]] < bits[a["choice"]] for a, b in zip(small["layers"], big["layers"]))
        assert lower <= len(small["layers"]) // 4


def test_max_error_picks_the_smallest_model_reaching_it():
    _, full, _ = _bert_run("quantize:mode=auto,budget=0.45")
    target = 3 * full.notes["mixed_precision"]["predicted_error"]
    _, loose, _ = _bert_run(f"quantize:mode=auto,budget=0.45,max_error={target!r}")
    assert loose.notes["mixed_precision"]["predicted_error"] <= target
    assert loose.notes["mixed_precision"]["bytes_after"] < full.notes["mixed_precision"]["bytes_after"]
    _, unreachable, _ = _bert_run("quantize:mode=auto,budget=0.2,max_error=0.0")
    assert "no configuration within budget=0.2" in unreachable.notes["max_error_not_reached"]


def test_report_prints_the_per_layer_table_and_the_front():
    f = zoo.bert()
    m2 = ptool.transform(f.model, ["quantize:mode=auto,budget=0.3,choices=int8+int4"], f.example_inputs,
                         example_kwargs=f.example_kwargs, calibration=f.calibration(4))
    text = str(m2.report)
    assert "choice per layer" in text and "Pareto front" in text
    assert "encoder.layer.0.output.dense" in text
    notes = m2.report.records[-1].notes["mixed_precision"]
    assert {r["choice"] for r in notes["layers"]} <= {"int8", "int4"}
    assert all(p["fraction"] <= 1 for p in notes["front"])
    assert any(p["measured_error"] is not None for p in notes["front"])


def test_front_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from ptool.tune.plot import plot_size_error

    _, result, _ = _bert_run("quantize:mode=auto,budget=0.3")
    notes = result.notes["mixed_precision"]
    path = plot_size_error(notes["front"], tmp_path / "front.png", chosen=notes)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ------------------------------------------------------------------------------ on MiniLM (real weights)
@pytest.mark.slow
def test_minilm_budget_quarter_beats_uniform_int8_and_int4_on_held_out_cosine():
    """Measured (64 held-out sentences, 16 tokens; calibrated on 8 sentences of the Python manual): auto at
    0.25 (0.2473x) 0.99577, uniform int8 dynamic (0.253x) 0.99379, uniform int4 g32 (0.161x) 0.97621."""
    _, auto, cos_auto = _run("quantize:mode=auto,budget=0.25")
    _, _, cos_int8 = _run("quantize")
    _, _, cos_int4 = _run("quantize:mode=int4-weight")
    assert auto.notes["mixed_precision"]["fraction"] <= 0.25
    assert cos_auto >= 0.995
    assert cos_auto > cos_int8 > cos_int4


@pytest.mark.slow
def test_minilm_mixed_model_runs_on_onnx_runtime_like_torch(tmp_path):
    import onnx

    gm, result, _ = _run("quantize:mode=auto,budget=0.25")
    _, _, _, heldout = _embedder()
    choices = {r["choice"] for r in result.notes["mixed_precision"]["layers"]}
    assert choices == {"float", "int8", "int4"}
    path = ptool.export_onnx(gm, tmp_path / "auto.onnx", example_inputs=heldout[0])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear"} <= ops
    run = ptool.compile(gm, backend="onnxruntime", example_inputs=heldout[0])
    with torch.no_grad():
        err = max(float((gm(*x) - run(*x)).abs().max()) for x in heldout[:4])
    assert err < 2e-2  # int8 dynamic: ORT rounds the activation once (test_quantize's bound)


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize(("spec", "phrase"), [
    ("quantize:mode=auto,budget=0", "budget must be in (0, 1]"),
    ("quantize:mode=auto,budget=1.5", "budget must be in (0, 1]"),
    ("quantize:budget=0.25", "budget applies to mode=auto only"),
    ("quantize:mode=int4-weight,choices=int8+int4", "choices applies to mode=auto only"),
    ("quantize:mode=auto", "needs budget="),
    ("quantize:mode=auto,budget=0.3,max_error=-1", "max_error must be >= 0"),
    ("quantize:mode=auto,budget=0.3,choices=int8+int8", "at most once"),
    ("quantize:mode=auto,budget=0.3,choices=int2", "'choices'"),
    ("quantize:mode=auto,budget=0.3,keep_float=2", "do not apply to it"),
    ("quantize:mode=auto,budget=0.3,method=gptq", "method=gptq applies to the weight-only mode"),
])
def test_bad_options_are_one_line_errors(spec, phrase):
    with pytest.raises(PassError) as err:
        parse_pass(spec)
    assert phrase in str(err.value) and "\n" not in str(err.value)


def test_budget_below_the_smallest_choice_is_a_clear_error():
    f, gm0, calls = _bert()
    p = Quantize(mode="auto", budget=0.2, choices=("float", "int8"))
    with pytest.raises(PassError, match=r"budget=0.2 is below the smallest size the choices float\+int8 reach on "
                                        r"this model \(0\.3\d+ of its \d+ weight bytes\); raise budget to"):
        p.run(copy.deepcopy(gm0), PassContext(calibration=[a for a, _ in calls], calibration_calls=calls))


def test_auto_needs_calibration_data():
    f = zoo.bert()
    with pytest.raises(PassError, match="needs calibration data"):
        ptool.transform(f.model, ["quantize:mode=auto,budget=0.25"], f.example_inputs)


def test_auto_on_an_onnx_model_is_refused_with_the_reason():
    from ptool.passes.onnx.quantize import quantize_refusal

    assert "torch model" in quantize_refusal(Quantize(mode="auto", budget=0.25))
