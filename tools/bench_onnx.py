"""ONNX models as ptool's input: real trained models from PyPI packages and MiniLM exported to ONNX.

Per model (``tools/onnx_zoo.py``; batch 1, 2 threads, every candidate of a model timed side by side):

1. The CLI as a user runs it, with the model's inputs on the command line: ``ptool inspect``,
   ``ptool convert -p dce,cse,constant-fold,fold-bn --verify``, ``ptool bench`` and ``ptool tune
   --backend onnxruntime -p quantize`` (exit codes).
2. Latency and fidelity (output cosine and max relative error vs the original under ONNX Runtime,
   worst over the example and 3 perturbed inputs) of: the original; ptool's exact pipeline; ptool
   ``quantize`` as ONNX (int8 dynamic, where the model has MatMul / Gemm weights; int8 static QDQ
   around Conv / MatMul / Gemm, calibrated on the batches ORT's ``quantize_static`` gets); the original
   built by TVM through Relax's ONNX frontend (``ptool.compile(..., backend="tvm")``); ONNX
   Runtime's ``quantize_dynamic`` (per-channel) and ``quantize_static`` (QDQ, per-channel,
   calibrated on 8 perturbed inputs).
3. For all-MiniLM-L6-v2 exported at opset 23: the held-out mean embedding cosine (64 sentences)
   of ptool ``quantize`` applied to the ONNX file against ``quantize_dynamic`` per-channel.

Writes the ``onnx-models`` section of BENCHMARKS.md.

    .venv/bin/python tools/bench_onnx.py [--models magika,ocr-det,...] [--repeat 20]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _minilm import heldout_batches, log  # noqa: E402
from _sections import update_section  # noqa: E402
from onnx_zoo import ZOO, ZooModel, fetch  # noqa: E402

import ptool  # noqa: E402
from ptool.benchmark import measure_interleaved  # noqa: E402
from ptool.tune.fingerprint import DeviceFingerprint, device_fingerprint  # noqa: E402

EXACT = ["dce", "cse", "constant-fold", "fold-bn"]


def _session(path: pathlib.Path) -> Callable:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 4
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def _cli(argv: list[str]) -> str:
    """Run ``ptool`` in this process; 'ok' or its one-line error."""
    from ptool.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("ptool: error")]
    return "ok" if code == 0 else (lines[0] if lines else f"exit {code}")


def _perturbed(feeds: dict, count: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        out.append({k: (v + rng.standard_normal(v.shape).astype(v.dtype) * 0.1 * (np.abs(v).mean() + 1e-3)
                        if v.dtype.kind == "f" else v) for k, v in feeds.items()})
    return out


def _tvm_runner(compiled: Callable) -> Callable:
    def run(feeds: dict) -> list:
        out = compiled(*[torch.from_numpy(v) for v in feeds.values()])
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
    return run


def _max_errors(want: list, got: list) -> tuple[float, float]:
    """``(max |got - want|, max |got - want| / max |want|)`` over the float outputs and calls."""
    worst_abs = worst_rel = 0.0
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype.kind == "f" and a.size:
                err = float(np.abs(b.astype(np.float64) - a).max())
                worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, err / (float(np.abs(a).max()) or 1.0))
    return float(f"{worst_abs:.3g}"), float(f"{worst_rel:.3g}")


def _cosine(want: list, got: list) -> float:
    """Worst cosine of the first float output over the calls (a label output says little)."""
    index = next((i for i, o in enumerate(want[0]) if np.asarray(o).dtype.kind == "f"), 0)
    worst = 1.0
    for w, g in zip(want, got):
        w, g = np.asarray(w[index], np.float64).ravel(), np.asarray(g[index], np.float64).ravel()
        denom = np.linalg.norm(w) * np.linalg.norm(g)
        worst = min(worst, float(w @ g / denom) if denom else float(np.array_equal(w, g)))
    return worst


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feeds: list[dict]) -> None:
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def run_model(model: ZooModel, folder: pathlib.Path, repeat: int) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from ptool.cli._model import resolve_model

    path = model.path(folder)
    inputs = model.cli_inputs(folder)
    row: dict = {"task": model.task, "package": model.package}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        figures = json.loads(_capture_json(["inspect", str(path), *inputs, "--json"]))
        row.update(nodes=figures["nodes"], parameters=figures["parameters"], gflops=round(figures["flops"] / 1e9, 3))
        row["cli"] = {
            "inspect": "ok",
            "convert --verify": _cli(["convert", str(path), *inputs, "-p", ",".join(EXACT), "-o", str(tmp / "c.onnx"),
                                      "--verify"]),
            "bench": _cli(["bench", str(path), *inputs, "--repeat", "5", "--warmup", "1"]),
            "tune": _cli(["tune", str(path), *inputs, "--backend", "onnxruntime", "-p", "quantize", "--repeat", "3",
                          "--budget", "120", "-o", str(tmp / "tuned")]),
        }
        src = resolve_model(str(path), inputs=list(model.shapes), inputs_file=str(model.npz(folder) or "") or None)
        names = src.input_names()
        feeds = {n: (a.numpy() if isinstance(a, torch.Tensor) else a) for n, a in zip(names, src.args)}
        checks = [feeds, *_perturbed(feeds, 3)]
        files = {"original (ONNX Runtime)": path}
        notes: dict[str, str] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calibration = _perturbed(feeds, 8, seed=2)  # the same batches ORT's quantize_static gets
            for label, passes in (("ptool exact pipeline", EXACT), ("ptool quantize (int8 dynamic, as ONNX)",
                                                                      ["quantize"]),
                                  ("ptool quantize:mode=int8-static (QDQ, as ONNX)", ["quantize:mode=int8-static"])):
                t0 = time.perf_counter()
                try:
                    m2 = ptool.transform(str(path), passes, example_inputs=feeds, calibration=calibration)
                except Exception as e:
                    notes[label] = f"failed: {type(e).__name__}: {ptool.errors.first_line(e)[:160]}"
                    continue
                rewritten = sum(r.rewritten for r in m2.report)
                if passes[0].startswith("quantize") and not rewritten:
                    notes[label] = "no site rewritten: " + (m2.report[0].skipped[0].reason
                                                                   if m2.report[0].skipped else "none")
                    continue
                files[label] = m2.save(tmp / f"{len(files)}.onnx")
                notes[label] = f"{rewritten} sites, {time.perf_counter() - t0:.1f} s"
            try:
                quantize_dynamic(str(path), str(tmp / "ort_dyn.onnx"), per_channel=True, weight_type=QuantType.QInt8)
                files["peer: ORT quantize_dynamic per-channel"] = tmp / "ort_dyn.onnx"
            except Exception as e:
                notes["peer: ORT quantize_dynamic per-channel"] = f"failed: {ptool.errors.first_line(e)[:120]}"
            try:
                quantize_static(str(path), str(tmp / "ort_static.onnx"), _Reader(calibration),
                                quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                                activation_type=QuantType.QUInt8)
                files["peer: ORT quantize_static QDQ per-channel"] = tmp / "ort_static.onnx"
            except Exception as e:
                notes["peer: ORT quantize_static QDQ per-channel"] = f"failed: {ptool.errors.first_line(e)[:120]}"
        runs, cands = {}, {}
        tvm_label = "TVM (Relax ONNX frontend, ptool's schedules, untuned)"
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built = ptool.compile(ptool.transform(str(path), [], example_inputs=feeds), backend="tvm")
            runs[tvm_label] = _tvm_runner(built)
            notes[tvm_label] = f"build {time.perf_counter() - t0:.1f} s"
        except Exception as e:
            notes[tvm_label] = f"failed: {ptool.errors.first_line(e)[:160]}"
        for label, file in files.items():
            try:
                runs[label] = _session(file)
                runs[label](feeds)
            except Exception as e:
                notes[label] = f"failed to run: {ptool.errors.first_line(e)[:120]}"
                runs.pop(label, None)
        want = [runs["original (ONNX Runtime)"](f) for f in checks]
        for label, run in runs.items():
            got = [run(f) for f in checks]
            max_abs, max_rel = _max_errors(want, got)
            cands[label] = {"cosine": round(_cosine(want, got), 5), "max_rel_err": max_rel, "max_abs_err": max_abs,
                            "size_mib": round(pathlib.Path(files[label]).stat().st_size / 2**20, 2)
                            if label in files else None}
        timings = measure_interleaved(runs, (feeds,), warmup=2, settle=1, repeat=repeat)
        base = timings["original (ONNX Runtime)"].median_ms
        for label, t in timings.items():
            cands[label].update(median_ms=round(t.median_ms, 2), speedup=round(base / t.median_ms, 2))
        for label, note in notes.items():
            cands.setdefault(label, {})["note"] = note
        row["candidates"] = cands
    return row


def _capture_json(argv: list[str]) -> str:
    from ptool.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    if code:
        raise RuntimeError(f"ptool {' '.join(argv)} exited {code}")
    return out.getvalue()


def minilm(repeat: int) -> dict:
    """all-MiniLM-L6-v2 exported at opset 23, quantized as ONNX by ptool and by ONNX Runtime."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ptool.default_model import default_model

    d = default_model()
    held = heldout_batches(128, 1)
    with torch.no_grad():
        want = [d.module(*a) for a in held]
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = pathlib.Path(tmp)
        fp32 = ptool.export_onnx(d.module, tmp / "fp32.onnx", tuple(d.example_inputs), opset=23)
        quantize_dynamic(str(fp32), str(tmp / "ort.onnx"), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gather"])
        files = {"ONNX Runtime fp32": fp32, "peer: ORT quantize_dynamic per-channel": tmp / "ort.onnx"}
        example = {"input_ids": held[0][0].numpy(), "attention_mask": held[0][1].numpy()}
        for spec in ("quantize", "quantize:embeddings=false", "quantize:activations=per-token", "precision:dtype=fp16"):
            files[f"ptool {spec} (as ONNX)"] = ptool.transform(str(fp32), [spec], example_inputs=example).save(
                tmp / f"{spec.replace(':', '_')}.onnx")
        runs = {k: _session(v) for k, v in files.items()}
        for label, run in runs.items():
            got = [torch.from_numpy(run({"input_ids": a.numpy(), "attention_mask": b.numpy()})[0]) for a, b in held]
            rows[label] = {"cosine": round(float(torch.cat([torch.nn.functional.cosine_similarity(w, g, dim=-1)
                                                              for w, g in zip(want, got)]).mean()), 5)}
        timings = measure_interleaved(runs, (example,), warmup=3, settle=1, repeat=repeat)
    peer = timings["peer: ORT quantize_dynamic per-channel"].median_ms
    for label, t in timings.items():
        rows[label].update(median_ms=round(t.median_ms, 2), vs_peer=round(t.median_ms / peer, 3))
    return rows


def render(models: dict, minilm_rows: dict, fingerprint: str) -> str:
    lines = ["## ONNX models as input (`tools/bench_onnx.py`)", "",
             f"Device: {fingerprint}. Batch 1, 2 threads; the candidates of a model are timed side by side in one run "
             "(round-robin, medians). Cosine: the first float output vs the original model under ONNX Runtime; max rel "
             "err: max |out - ref| / max |ref| over the float outputs; both the worst of the example and 3 perturbed "
             "inputs. Models: trained ONNX files shipped in PyPI wheels "
             "(`tools/onnx_zoo.py`), run on the inputs given on the command line.", ""]
    if minilm_rows:
        lines += ["### all-MiniLM-L6-v2 exported to ONNX (opset 23), quantized as ONNX", "",
                  "| candidate | held-out cosine | median ms | latency vs ORT quantize_dynamic |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['cosine']:.5f} | {v['median_ms']:.2f} | {v['vs_peer']:.3f}x |"
                  for k, v in minilm_rows.items()]
        lines.append("")
    lines += ["### The CLI on each model", "",
              "| model | task | nodes | params | GFLOPs | inspect | convert --verify | bench | tune |",
              "|---|---|---:|---:|---:|---|---|---|---|"]
    for key, m in models.items():
        cli = m["cli"]
        lines.append(f"| {key} | {m['task']} | {m['nodes']} | {m['parameters']:,} | {m['gflops']} | {cli['inspect']} | "
                     f"{cli['convert --verify']} | {cli['bench']} | {cli.get('tune', '–')} |")
    lines.append("")
    for key, m in models.items():
        lines += [f"### {key} ({m['package']})", "",
                  "| candidate | median ms | speedup | cosine | max abs err | max rel err | MiB | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for label, c in m["candidates"].items():
            if "median_ms" in c:
                abs_err = f"{c['max_abs_err']:.2g}" if "max_abs_err" in c else "–"
                lines.append(f"| {label} | {c['median_ms']:.2f} | {c['speedup']:.2f}x | {c['cosine']:.5f} | {abs_err} | "
                             f"{c['max_rel_err']:.2g} | {c['size_mib'] or '–'} | {c.get('note', '')} |")
            else:
                lines.append(f"| {label} | – | – | – | – | – | – | {c.get('note', '')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(m.key for m in ZOO))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = fetch()
    wanted = args.models.split(",")
    models = {}
    for m in ZOO:
        if m.key in wanted:
            log(f"{m.key}")
            models[m.key] = run_model(m, folder, args.repeat)
    minilm_rows = {} if args.no_minilm else minilm(args.repeat * 3)
    fp = device_fingerprint()

    def merged(previous: dict) -> tuple[str, dict]:
        """The models run now replace their rows; the others (and MiniLM, when skipped) keep the last
        run's, if it was on this device."""
        same_device = "fingerprint" in previous and DeviceFingerprint.from_dict(previous["fingerprint"]).key == fp.key
        old_models = previous.get("models", {}) if same_device else {}
        all_models = {m.key: models.get(m.key, old_models.get(m.key)) for m in ZOO
                      if m.key in models or m.key in old_models}
        rows = minilm_rows or (previous.get("minilm", {}) if same_device else {})
        return render(all_models, rows, str(fp)), {"fingerprint": fp.to_dict(), "models": all_models, "minilm": rows}

    print(update_section("onnx-models", merged))


if __name__ == "__main__":
    main()
