"""Mixed-precision weight search on all-MiniLM-L6-v2 (real weights): ``quantize:mode=auto`` at several budgets
against uniform int8 and uniform int4.

Writes the "Mixed precision" section of ``BENCHMARKS.md`` (key ``mixed-precision``).

Protocol: the sentence embedder (MiniLM + mean pooling + L2 norm), batches of 4 sentences padded to
128 tokens. Fidelity: mean cosine of the embeddings against the fp32 model over the 64 held-out
sentences shipped with ptool (``tools/_minilm.py``), for the transformed torch model and for its
ONNX Runtime session. Calibration (the sensitivity probes of ``mode=auto``): 4 packed batches of
4 x 128 tokens of the Python reference manual (never the held-out sentences). Bytes: every
parameter and buffer of the transformed model (``x fp32`` is over the fp32 model's), and the ONNX
file's initializers. Latency: the ORT sessions (2 intra-op threads) timed round-robin in one run on
one held-out batch, median; ratio to the fp32 session of the same run.

    .venv/bin/python tools/bench_mixedprec.py [--budgets 0.18 0.25 0.35] [--repeat 30] [--plot out/mp.png]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _minilm import calibration_batches, heldout_batches, log, mean_cosine  # noqa: E402
from _sections import write_section  # noqa: E402

import ptool  # noqa: E402
from ptool.benchmark import measure_interleaved  # noqa: E402
from ptool.default_model import load_embedder  # noqa: E402
from ptool.passes.quant.mixed import stored_bytes  # noqa: E402

SEQ, BATCH, CALIB = 128, 4, 4
KEY = "mixed-precision"


def uniform() -> dict[str, str]:
    return {"uniform int8 (dynamic, per-channel; embeddings int8)": "quantize",
            "uniform int4 weight-only g32 (embeddings int4)": "quantize:mode=int4-weight",
            "uniform int4 weight-only g128 (embeddings int4)": "quantize:mode=int4-weight,group_size=128"}


class OrtRunner:
    def __init__(self, path: pathlib.Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.names[0]: ids.numpy(), self.names[1]: mask.numpy()})[0])


def onnx_bytes(path: pathlib.Path) -> int:
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budgets", type=float, nargs="+", default=[0.18, 0.25, 0.35])
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--plot", type=pathlib.Path, default=ROOT / "out" / "mixed_precision_front.png")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    model = load_embedder().eval()
    heldout = heldout_batches(SEQ, BATCH)
    calib = calibration_batches(SEQ, BATCH, CALIB, form="packed")
    fp32_bytes = stored_bytes(model)
    specs = dict(uniform())
    for b in a.budgets:
        specs[f"mode=auto, budget {b:g}"] = f"quantize:mode=auto,budget={b:g}"
    rows: dict[str, dict] = {"fp32": {"spec": "-", "bytes": fp32_bytes, "x_fp32": 1.0, "cosine": 1.0}}
    runners: dict[str, OrtRunner] = {}
    notes = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        path = ptool.export_onnx(model, folder / "fp32.onnx", example_inputs=heldout[0])
        runners["fp32"] = OrtRunner(path)
        rows["fp32"].update(onnx_bytes=onnx_bytes(path), ort_cosine=mean_cosine(model, runners["fp32"], heldout))
        for label, spec in specs.items():
            log(f"{label}: {spec}")
            start = time.perf_counter()
            m2 = ptool.transform(model, [spec], heldout[0], calibration=calib if "auto" in spec else None)
            seconds = time.perf_counter() - start
            path = ptool.export_onnx(m2, folder / f"c{len(runners)}.onnx", example_inputs=heldout[0])
            runners[label] = OrtRunner(path)
            size = stored_bytes(m2)
            rows[label] = {"spec": spec, "bytes": size, "x_fp32": size / fp32_bytes, "transform_s": seconds,
                           "cosine": mean_cosine(model, m2, heldout), "onnx_bytes": onnx_bytes(path),
                           "ort_cosine": mean_cosine(model, runners[label], heldout)}
            record = m2.report.records[-1]
            if "mixed_precision" in record.notes:
                notes[label] = record.notes["mixed_precision"]
                rows[label]["predicted_error"] = notes[label]["predicted_error"]
                rows[label]["measured_error"] = notes[label]["measured_error"]
            log(f"  cosine {rows[label]['cosine']:.5f} (ORT {rows[label]['ort_cosine']:.5f}), "
                f"{size / 1e6:.2f} MB = {rows[label]['x_fp32']:.4f}x, {seconds:.0f} s")
        log("timing")
        timings = measure_interleaved(runners, heldout[0], repeat=a.repeat, warmup=3)
    base = timings["fp32"].median_ms
    for label, t in timings.items():
        rows[label].update(ort_ms=t.median_ms, vs_fp32=t.median_ms / base)
    main_label = next((k for k in notes if "0.25" in k), next(iter(notes), None))
    if main_label and a.plot:
        try:
            from ptool.tune.plot import plot_size_error

            plot_size_error(notes[main_label]["front"], a.plot, chosen=notes[main_label],
                            title=f"quantize:mode=auto on all-MiniLM-L6-v2 ({main_label})")
            log(f"plot: {a.plot}")
        except Exception as e:  # noqa: BLE001 - the tables matter more than the picture
            log(f"no plot: {type(e).__name__}: {e}")
    md = markdown(rows, notes, main_label)
    data = {"rows": rows, "auto": notes, "seq": SEQ, "batch": BATCH, "calibration_batches": CALIB}
    print(md if a.no_write else write_section(KEY, md, data))


def markdown(rows: dict, notes: dict, main_label: str | None) -> str:
    lines = ["## Mixed precision on all-MiniLM-L6-v2 (`tools/bench_mixedprec.py`)", "",
             "`quantize:mode=auto,budget=B`: float / int8 / int4 (g32) per layer, embeddings included, chosen "
             "from each layer's measured effect on the outputs (4 packed calibration batches of 4 x 128 tokens of "
             "the Python manual) so that every stored tensor fits B x the fp32 weight bytes. Cosine: mean over "
             "the 64 held-out sentences vs fp32 (batch 4, 128 tokens), torch and ONNX Runtime. ORT ms: median of "
             "one round-robin run (batch 4 x 128, 2 threads, shared machine); 'x fp32' columns are ratios to fp32.",
             "",
             "| candidate | bytes (MB) | x fp32 bytes | ONNX MB | cosine (torch) | cosine (ORT) | ORT ms | x fp32 ms "
             "| predicted / measured error (calib.) | transform s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        err = (f"{r['predicted_error']:.2e} / {r['measured_error']:.2e}" if "predicted_error" in r else "-")
        lines.append(f"| {label} | {r['bytes'] / 1e6:.2f} | {r['x_fp32']:.4f} | {r['onnx_bytes'] / 1e6:.2f} | "
                     f"{r['cosine']:.5f} | {r['ort_cosine']:.5f} | {r.get('ort_ms', float('nan')):.1f} | "
                     f"{r.get('vs_fp32', float('nan')):.2f} | {err} | {r.get('transform_s', 0):.0f} |")
    autos = {k: r for k, r in rows.items() if "auto" in r["spec"]}
    int8 = rows.get("uniform int8 (dynamic, per-channel; embeddings int8)")
    int4 = rows.get("uniform int4 weight-only g32 (embeddings int4)")
    if main_label and int8 and int4:
        r = rows[main_label]
        verdict = "met" if r["cosine"] > max(int8["cosine"], int4["cosine"]) and r["x_fp32"] <= 0.25 else "NOT met"
        lines += ["", f"Acceptance (issue 25): {main_label} at {r['x_fp32']:.4f}x the fp32 bytes, held-out cosine "
                      f"{r['cosine']:.5f} vs uniform int8 {int8['cosine']:.5f} ({int8['x_fp32']:.4f}x) and uniform "
                      f"int4 g32 {int4['cosine']:.5f} ({int4['x_fp32']:.4f}x): {verdict}."]
    for label in autos:
        counts: dict[str, int] = {}
        for layer in notes[label]["layers"]:
            counts[layer["choice"]] = counts.get(layer["choice"], 0) + 1
        lines.append(f"- {label}: " + ", ".join(f"{n} {c}" for c, n in sorted(counts.items())) + " layers.")
    if main_label:
        n = notes[main_label]
        lines += ["", f"Per-layer choice of {main_label} (error: relative output MSE on the calibration data with "
                      "only that layer quantized; for unit embeddings 2 (1 - cosine)):", "",
                  "| layer | kind | params | choice | bytes | error int8 | error int4 |",
                  "|---|---|---:|---|---:|---:|---:|"]
        for layer in n["layers"]:
            e = layer["errors"]
            lines.append(f"| {layer['layer']} | {layer['kind']} | {layer['params']} | {layer['choice']} | "
                         f"{layer['bytes']} | {e.get('int8', float('nan')):.2e} | {e.get('int4', float('nan')):.2e} |")
        lines += ["", f"Pareto front of {main_label}'s search (predicted: sum of the per-layer errors; measured: "
                      "all its layers quantized together, on the calibration data):", "",
                  "| x fp32 bytes | predicted | measured | layers |", "|---:|---:|---:|---|"]
        for pt in n["front"]:
            measured = f"{pt['measured_error']:.2e}" if pt["measured_error"] is not None else "-"
            layers = " ".join(f"{c}:{k}" for c, k in sorted(pt["choices"].items()))
            lines.append(f"| {pt['fraction']:.4f} | {pt['predicted_error']:.2e} | {measured} | {layers} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
