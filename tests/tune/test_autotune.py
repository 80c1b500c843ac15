"""ptool.autotune: device fingerprint, search, exclusion by max_error, budget, the saved record and its reuse."""

from __future__ import annotations

import json
import os
import struct
import time

import pytest
import torch
from torch import nn

import ptool
from ptool.errors import PassError, UsageError
from ptool.tune.fingerprint import ISA_FLAGS, DeviceFingerprint, _cpuinfo, device_fingerprint
from ptool.tune.plot import pareto_front
from ptool.tune.record import Row, Status
from ptool.tune.tuner import TIE, _mark_winner

ORT_ONE = {"onnxruntime": [{}, {"intra_op_threads": 1}]}


def mlp() -> tuple[nn.Module, torch.Tensor, list[tuple[torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16)).eval()
    x = torch.randn(4, 64)
    held = [(torch.randn(4, 64, generator=torch.Generator().manual_seed(s)),) for s in (1, 2)]
    return model, x, held


# -- fingerprint ------------------------------------------------------------------------------------


def test_fingerprint_reads_this_machine():
    fp = device_fingerprint()
    assert fp.device == "cpu"
    assert fp.cores == len(os.sched_getaffinity(0))
    assert fp.versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert fp.versions["ptool"] == ptool.__version__
    if os.path.exists("/proc/cpuinfo"):
        text = open("/proc/cpuinfo").read()
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":")[1].split())
        assert fp.isa == tuple(f for f in ISA_FLAGS if f in flags)
        name = next(line for line in text.splitlines() if line.startswith("model name")).split(":", 1)[1].strip()
        assert fp.cpu_model == name


def test_fingerprint_key_is_stable_and_changes_with_any_field():
    fp = device_fingerprint()
    assert fp.key == device_fingerprint().key and len(fp.key) == 12
    assert DeviceFingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp
    other = DeviceFingerprint.from_dict({**fp.to_dict(), "versions": {**fp.versions, "onnxruntime": "0.0"}})
    assert other.key != fp.key
    assert DeviceFingerprint.from_dict({**fp.to_dict(), "isa": ["avx2"]}).key != fp.key


def test_cpuinfo_parses_amx_and_degrades_without_the_file(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel Xeon Platinum 8480+\n"
                    "flags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile amx_bf16 amx_int8\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    assert _cpuinfo(info) == ("Intel Xeon Platinum 8480+",
                              ("avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"))
    assert _cpuinfo(tmp_path / "missing") == (None, ())


# -- the search -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One measured run (quantize must break a 1e-7 bound) and its immediate rerun from the record."""
    model, x, held = mlp()
    folder = tmp_path_factory.mktemp("tuned")
    kw = dict(backends=["torch", "onnxruntime"], variants={"torch": [{}], **ORT_ONE}, passes=["quantize"],
              max_error=1e-7, held_out_inputs=held, record_dir=folder, repeat=10, progress=False)
    t0 = time.perf_counter()
    first = ptool.autotune(model, (x,), **kw)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = ptool.autotune(model, (x,), **kw)
    second_s = time.perf_counter() - t0
    return model, x, held, folder, first, first_s, second, second_s, kw


def test_table_holds_every_candidate_with_measured_figures(tuned):
    model, x, held, _, first, *_ = tuned
    labels = {r.label: r for r in first.table}
    assert set(labels) == {"exact | torch", "exact | onnxruntime", "exact | onnxruntime[intra_op_threads=1]",
                           "quantize | (any backend)"}
    for label in ("exact | torch", "exact | onnxruntime", "exact | onnxruntime[intra_op_threads=1]"):
        r = labels[label]
        assert r.status == Status.OK and r.exact
        assert r.error <= 1e-7 and r.cosine > 1 - 1e-7
        assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms and r.runs >= 3
        assert r.build_s > 0
    assert first.status == "complete" and not first.reused


def test_approximate_pass_past_max_error_is_excluded_with_the_reason(tuned):
    first = tuned[4]
    (row,) = [r for r in first.table if r.label.startswith("quantize")]
    assert row.status == Status.EXCLUDED
    assert "max_error 1e-07" in row.reason and "1-cosine" in row.reason
    assert row.error > 1e-7 and f"1-cosine {row.error:.2e}" in row.reason
    assert row.timing == "eager torch" and row.runs == 3  # a short timing, only to place it on the plot
    assert "quantize" not in first.config.passes


def test_winner_is_the_fastest_valid_candidate_and_runs(tuned):
    model, x, held, _, first, *_ = tuned
    ok = [r for r in first.table if r.status == Status.OK]
    assert first.winner.median_ms <= min(r.median_ms for r in ok) * (1 + TIE)  # ties go to the lower error
    assert first.config.to_dict() == first.winner.config
    with torch.no_grad():
        ref = model(held[0][0])
    torch.testing.assert_close(first(held[0][0]), ref, rtol=1e-5, atol=1e-6)


def test_record_is_saved_with_table_fingerprint_and_plot(tuned):
    _, _, _, folder, first, *_ = tuned
    data = json.loads((folder / "tuning_record.json").read_text())
    assert data["key"] == first.key and data["status"] == "complete"
    assert data["fingerprint"] == device_fingerprint().to_dict()
    assert data["winner"] == first.config.to_dict()
    assert [r["label"] for r in data["rows"]] == [r.label for r in first.table]
    png = (folder / "latency_vs_fidelity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 200
    assert "quantize | (any backend)" in (folder / "table.txt").read_text()


def test_second_run_reuses_the_record_in_under_a_tenth_of_the_time(tuned):
    *_, first, first_s, second, second_s, _ = tuned
    assert second.reused and second.key == first.key
    assert [r.to_dict() for r in second.table] == [r.to_dict() for r in first.table]
    assert second_s < 0.1 * first_s, (first_s, second_s)


def test_force_or_other_settings_measure_again(tuned):
    model, x, held, folder, first, *_, kw = tuned
    again = ptool.autotune(model, (x,), **{**kw, "variants": {"torch": [{}]}, "backends": ["torch"],
                                           "passes": []})
    assert not again.reused and again.key != first.key
    assert [r.label for r in again.table] == ["exact | torch"]


def test_budget_stops_starting_candidates(tmp_path):
    model, x, held = mlp()
    result = ptool.autotune(model, (x,), backends=["onnxruntime"], variants=ORT_ONE, passes=[],
                            held_out_inputs=held, record_dir=tmp_path, budget_s=1e-6, progress=False)
    assert result.status == "budget"
    assert [r.status for r in result.table] == [Status.NOT_MEASURED, Status.NOT_MEASURED]
    assert all("budget" in r.reason for r in result.table)
    assert result.config is None
    again = ptool.autotune(model, (x,), backends=["onnxruntime"], variants=ORT_ONE, passes=[],
                           held_out_inputs=held, record_dir=tmp_path, budget_s=1e-6, progress=False)
    assert again.reused and again.status == "budget"  # the same budget answers from the record
    more = ptool.autotune(model, (x,), backends=["onnxruntime"], variants=ORT_ONE, passes=[],
                          held_out_inputs=held, record_dir=tmp_path, budget_s=600, progress=False)
    assert not more.reused and more.status == "complete"  # a bigger one goes on measuring


def test_a_resumed_search_measures_no_finished_row_again(tmp_path):
    """Ctrl-C once every row is finished, the approximate pass's excluded row included: the rerun takes
    every row from the record as it is (that row used to be checked and timed again)."""
    from ptool.tune.tuner import TuningInterrupted

    model, x, held = mlp()
    kw = dict(backends=["onnxruntime"], variants={"onnxruntime": [{}]}, passes=["quantize"], max_error=1e-7,
              held_out_inputs=held, record_dir=tmp_path, repeat=3)

    def stop_at_the_end(done, total, label):
        if label == "done":
            raise KeyboardInterrupt

    with pytest.raises(TuningInterrupted) as stopped:
        ptool.autotune(model, (x,), progress=stop_at_the_end, **kw)
    first = stopped.value.result
    assert first.status == "interrupted" and [r.status for r in first.table] == [Status.OK, Status.EXCLUDED]
    assert first.table[1].label == "quantize | (any backend)" and first.table[1].median_ms > 0
    checks = []
    again = ptool.autotune(model, (x,), progress=lambda done, total, label: checks.append(label), **kw)
    assert again.status == "complete" and not any(label.startswith("checking") for label in checks)
    assert [r.to_dict() for r in again.table] == [r.to_dict() for r in first.table]  # timings included
    assert "2 rows reused from an unfinished record of the same run" in again.notes


def test_a_tie_within_noise_goes_to_the_lower_error_then_the_simpler_config():
    def row(label, ms, err, passes=("dce",), options=None):
        r = Row(label, {"passes": list(passes), "backend": "torch", "options": options or {}}, True, Status.OK, "")
        r.median_ms, r.error = ms, err
        return r

    rows = [row("approx fast", 10.0, 1e-3, passes=("dce", "quantize")), row("exact", 10.1, 1e-15),
            row("exact threads", 10.05, 2e-15, options={"intra_op_threads": 2}), row("slow", 12.0, 0.0)]
    _mark_winner(rows)
    assert [r.label for r in rows if r.winner] == ["exact"]  # within 2%: least error, then fewest knobs
    rows = [row("approx fast", 9.0, 1e-3, passes=("dce", "quantize")), row("exact", 10.1, 1e-15)]
    _mark_winner(rows)
    assert [r.label for r in rows if r.winner] == ["approx fast"]  # 11% faster: no tie


def test_pareto_front_keeps_rows_no_other_beats_on_both_axes():
    def row(label, ms, err, status=Status.OK):
        return Row(label, {}, True, status, median_ms=ms, error=err)

    rows = [row("a", 1.0, 1e-3), row("b", 2.0, 1e-6), row("c", 3.0, 1e-4), row("d", 0.5, 0.5, Status.EXCLUDED)]
    assert [r.label for r in pareto_front(rows)] == ["a", "b"]


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tpu"}, "unknown device 'tpu' (allowed: cpu, cuda, cuda:N)"),
    ({"max_error": -1}, "max_error must be a finite number >= 0"),
    ({"backends": ["onnxrutime"]}, "did you mean 'onnxruntime'"),
    ({"budget_s": 0}, "budget_s must be > 0"),
    ({"variants": {"onnxruntime": [{"intra_op_thread": 2}]}, "backends": ["onnxruntime"]},
     "has no option 'intra_op_thread'"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message, tmp_path):
    model, x, _ = mlp()
    with pytest.raises(UsageError) as e:
        ptool.autotune(model, (x,), record_dir=tmp_path, progress=False, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_pass_is_a_pass_error(tmp_path):
    model, x, _ = mlp()
    with pytest.raises(PassError, match="quantise"):
        ptool.autotune(model, (x,), passes=["quantise"], record_dir=tmp_path, progress=False)


def test_backends_declare_their_variants():
    from ptool.tune.space import backend_variants

    fp = device_fingerprint()
    assert backend_variants("tvm", fp) == [{}]
    assert backend_variants("tvm", fp, tvm_trials=16) == [{}, {"tune_trials": 16}]
    ort = backend_variants("onnxruntime", fp)
    assert ort[0] == {} and {"graph_optimization_level": "extended"} in ort
    assert ({"intra_op_threads": fp.cores} in ort) == (fp.cores > 1)
    assert backend_variants("torch", fp)[0] == {}


# -- the precision dimension ------------------------------------------------------------------------


def _masked(fp: DeviceFingerprint, *drop: str) -> DeviceFingerprint:
    """This machine's fingerprint with some ISA flags taken away (a CPU without them)."""
    return DeviceFingerprint.from_dict({**fp.to_dict(), "isa": [f for f in fp.isa if f not in drop]})


def test_precision_dimension_combines_integer_matmuls_with_each_usable_format():
    from ptool.tune.space import precision_candidates

    rich = DeviceFingerprint.from_dict({**device_fingerprint().to_dict(),
                                        "isa": ["avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16"]})
    specs = ["quantize:activations=per-token", "quantize:mode=int4-weight", "precision:dtype=bf16",
             "precision:dtype=fp16"]
    candidates, left_out = precision_candidates(specs, rich)
    assert left_out == []
    assert ("quantize:activations=per-token", "precision:dtype=bf16") in candidates
    assert ("quantize:activations=per-token", "precision:dtype=fp16") in candidates
    assert not any(c[0] == "quantize:mode=int4-weight" and len(c) > 1 for c in candidates)  # float matmuls
    assert len(candidates) == 4 + 2


def test_formats_the_cpu_cannot_run_fast_are_left_out_with_the_reason():
    from ptool.tune.space import precision_candidates

    plain = _masked(device_fingerprint(), "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16",
                    "avx512_vnni", "avx_vnni", "amx_int8")
    candidates, left_out = precision_candidates(["quantize", "precision:dtype=bf16", "precision:dtype=fp16"], plain)
    assert candidates == []
    reasons = dict(left_out)
    assert reasons[("precision:dtype=bf16",)] == "bf16 left out: this CPU has neither avx512_bf16 nor amx_bf16"
    assert reasons[("quantize",)].startswith("int8 left out: this CPU has none of")
    assert "fp16 left out" in reasons[("precision:dtype=fp16",)]


def test_autotune_on_a_cpu_without_bf16_shows_the_reason_and_the_pass_still_works(monkeypatch, tmp_path):
    from ptool.tune import tuner

    model, x, held = mlp()
    masked = _masked(device_fingerprint(), "avx512_bf16", "amx_bf16")
    monkeypatch.setattr(tuner, "device_fingerprint", lambda device="cpu": masked)
    best = ptool.autotune(model, (x,), backends=["torch"], variants={"torch": [{}]},
                          passes=["precision:dtype=bf16"], max_error=0.01, held_out_inputs=held,
                          record_dir=tmp_path, repeat=3, progress=False)
    row = next(r for r in best.table if "precision" in r.label)
    assert row.status == Status.EXCLUDED
    assert row.reason == "bf16 left out: this CPU has neither avx512_bf16 nor amx_bf16"
    assert best.config.passes == tuple(ptool.passes.pipelines.default_pipeline())
    # the pass itself does not depend on the CPU: bf16 arithmetic is exact to its rounding anywhere
    m2 = ptool.transform(model, ["precision:dtype=bf16"], (x,))
    with torch.no_grad():
        assert ptool.verify.compare(model(held[0][0]), m2(held[0][0])).cosine >= 0.999


def test_autotune_measures_int8_with_bf16_as_one_candidate(tmp_path):
    model, x, held = mlp()
    rich = DeviceFingerprint.from_dict({**device_fingerprint().to_dict(), "isa": ["avx512_vnni", "avx512_bf16"]})
    from ptool.tune import tuner

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuner, "device_fingerprint", lambda device="cpu": rich)
        best = ptool.autotune(model, (x,), backends=["torch"], variants={"torch": [{}]},
                              passes=["quantize:activations=per-token", "precision:dtype=bf16"], max_error=0.05,
                              held_out_inputs=held, record_dir=tmp_path, repeat=3, progress=False)
    labels = [r.label for r in best.table]
    assert "quantize:activations=per-token + precision | torch" in labels  # bf16 is the default dtype
    row = next(r for r in best.table if r.label.startswith("quantize:activations=per-token + precision"))
    assert row.status == Status.OK and row.error < 0.05 and row.median_ms > 0


ORT_BF16 = ("bf16 left out on onnxruntime: its CPU provider has no bf16 kernels for Add, Mul, MatMul, Gemm, "
            "Conv, Softmax, Gelu (it would run in float32, no faster than float32)")


def test_backends_leave_out_the_formats_they_have_no_kernels_for():
    from ptool.tune.space import backend_left_out

    assert backend_left_out("onnxruntime", ["precision:dtype=bf16"], {}) == ORT_BF16
    assert backend_left_out("onnxruntime", ["quantize:activations=per-token", "precision"],
                            {"intra_op_threads": 2}) == ORT_BF16  # bf16 is the default dtype
    assert backend_left_out("onnxruntime", ["precision:dtype=fp16"], {}) is None  # ORT runs fp16 natively
    assert backend_left_out("onnxruntime", ["quantize:activations=per-token"], {}) is None
    assert backend_left_out("onnxruntime", ["precision:dtype=bf16"], {"provider": "cuda"}) is None
    assert backend_left_out("torch", ["precision:dtype=bf16"], {}) is None
    assert backend_left_out("tvm", ["precision:dtype=bf16"], {}) is None


def test_autotune_never_builds_bf16_on_onnxruntime_and_says_why(tmp_path):
    from ptool.tune import tuner

    model, x, held = mlp()
    rich = DeviceFingerprint.from_dict({**device_fingerprint().to_dict(), "isa": ["avx512_bf16"]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuner, "device_fingerprint", lambda device="cpu": rich)
        best = ptool.autotune(model, (x,), backends=["torch", "onnxruntime"],
                              variants={"torch": [{}], "onnxruntime": [{}]}, passes=["precision:dtype=bf16"],
                              max_error=0.01, held_out_inputs=held, record_dir=tmp_path, repeat=3, progress=False)
    rows = {r.label: r for r in best.table}
    ort_row = rows["precision | onnxruntime"]  # bf16 is the default: the spec prints bare
    assert ort_row.status == Status.EXCLUDED and ort_row.reason == ORT_BF16
    assert ort_row.build_s is None and ort_row.median_ms is None  # never built nor timed
    assert rows["precision | torch"].status == Status.OK  # the format itself runs elsewhere
    assert ORT_BF16 in str(best.table)


def test_reduced_precision_candidates_also_try_inductor_freezing_on_torch():
    from ptool.tune.space import approximate_variants

    frozen, aot = {"compile": True, "freezing": True}, {"compile": True, "freezing": True, "aot": True}
    declared = [{}, {"compile": True}, frozen, aot]
    assert approximate_variants("torch", declared, {}) == [{}, frozen, aot]
    assert approximate_variants("torch", declared, frozen) == [frozen, aot]
    assert approximate_variants("torch", declared[:3], frozen) == [frozen]  # only declared variants run
    assert approximate_variants("torch", [{}], {}) == [{}]  # the user's own variant list is kept
    assert approximate_variants("onnxruntime", [{}, {"intra_op_threads": 2}], {"intra_op_threads": 2}) == [
        {"intra_op_threads": 2}]


def test_the_table_prints_as_a_table_not_as_row_objects(tuned):
    first = tuned[4]
    text = str(first.table)
    assert repr(first.table) == text and "Row(" not in text
    lines = text.splitlines()
    assert "candidate" in lines[0] and "median ms" in lines[0]
    assert sum("exact | onnxruntime" in line for line in lines) == 2  # one line per candidate
    assert isinstance(first.table, list) and len(first.table) == 4 and first.table[0].label  # still a list of rows


def test_mixed_precision_search_is_a_candidate_on_every_backend_with_its_fidelity(tmp_path):
    """quantize:mode=auto joins the search on each backend; without calibration data it calibrates on the
    example call (noted), and its rows carry the fidelity the same transform gives outside the tuner."""
    model, x, held = mlp()
    specs = ["quantize:mode=auto,budget=0.5", "quantize:mode=auto,budget=0.25"]
    result = ptool.autotune(model, (x,), backends=["torch", "onnxruntime"], variants={"torch": [{}], "onnxruntime": [{}]},
                            passes=specs, max_error=0.05, held_out_inputs=held, record_dir=tmp_path, repeat=3,
                            progress=False)
    assert any("calibrate on the example call" in n and specs[0] in n for n in result.notes)
    rows = {r.label: r for r in result.table}
    for spec in specs:
        m2 = ptool.transform(model, [spec], (x,), calibration=[(x,)])
        with torch.no_grad():
            cos = min(float(nn.functional.cosine_similarity(m2(*h).flatten(), model(*h).flatten(), dim=0)) for h in held)
        assert 0 < 1 - cos < 0.05  # quantized: not exact, within the bound
        for backend in ("torch", "onnxruntime"):
            row = rows[f"{spec} | {backend}"]
            assert row.status == Status.OK and row.median_ms > 0
            assert row.cosine == pytest.approx(cos, abs=2e-4)  # ONNX Runtime's int kernels round a little differently
