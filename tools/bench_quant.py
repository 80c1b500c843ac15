"""Quantization on all-MiniLM-L6-v2 (real weights): ptool's pipelines against ONNX Runtime's and torch's own.

Writes the "Quantization" section of ``BENCHMARKS.md`` (key ``quantization``).

Protocol: the sentence embedder (MiniLM + mean pooling + L2 norm), batch 1, 128 tokens (one
sentence, padded). Fidelity: mean cosine of the embeddings against the fp32 model over the 64
held-out sentences shipped with ptool, each run through the candidate's own ONNX Runtime session
(or torch, for the torch rows). Calibration (static modes): 32 sentences of the Python reference
manual, never the held-out ones. Latency: every ORT session (2 intra-op threads, spinning off)
timed round-robin in one run at batch 1, median of the calls; ratios are against the fp32 ORT
session of the same run. Weight bytes: the initializers of the ONNX file (fp32 = 4 bytes each).

Baselines, as a user would run them on the fp32 ONNX file: ``quantize_dynamic`` (defaults, then
``per_channel=True``), ``quantize_static`` (QDQ, per-channel, MinMax), ORT's
``MatMulNBitsQuantizer`` (int4, block 32) and torch's ``quantize_dynamic`` (qint8 Linear).

    .venv/bin/python tools/bench_quant.py [--opset 18] [--repeat 100]
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

from _sections import write_section  # noqa: E402

import ptool  # noqa: E402
from ptool.benchmark import measure_interleaved  # noqa: E402
from ptool.default_model import encode, load_embedder, reference_sentences  # noqa: E402
from ptool.frontends.huggingface import sample_sentences  # noqa: E402

SEQ = 128

#: ptool pipelines: label -> pass specs (calibrated with the manual's sentences)
PIPELINES = {
    "ptool smooth-quant (alpha 0.7) + int8 dynamic": ["smooth-quant:alpha=0.7", "quantize"],
    # smoothing only where the norm outputs are read (q/k/v, fc1) and v->o (free): 12 online muls
    # instead of 19, so no slower than ORT's own dynamic quantization
    "ptool smooth-quant on norm readers (alpha 0.7) + int8 dynamic": [
        "smooth-quant:alpha=0.7,layers=query+key+value+intermediate.dense+attention.output.dense", "quantize"],
    "ptool int8 dynamic (per-channel)": ["quantize"],
    "ptool int8 dynamic, 3 most sensitive layers float": ["quantize:keep_float=3"],
    "ptool int8 static (per-channel, mse)": ["quantize:mode=int8-static,observer=mse"],
    "ptool smooth-quant (alpha 0.7) + int8 static (mse)": ["smooth-quant:alpha=0.7",
                                                          "quantize:mode=int8-static,observer=mse"],
    "ptool int4 weight-only (group 32)": ["quantize:mode=int4-weight"],
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def session(path: pathlib.Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtRunner:
    """``runner(ids, mask) -> embedding`` over an ORT session (numpy in, torch out)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.session = session(path)
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feed = {self.names[0]: ids.numpy(), self.names[1]: mask.numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def weight_bytes(path: pathlib.Path) -> int:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def mean_cosine(reference: list[torch.Tensor], run, sentences) -> float:
    with torch.no_grad():
        got = [run(ids, mask) for ids, mask in sentences]
    return float(torch.cat([torch.nn.functional.cosine_similarity(r, g, dim=-1) for r, g in zip(reference, got)]).mean())


class _Reader:
    """ORT calibration reader over (ids, mask) pairs."""

    def __init__(self, names, batches):
        self.names, self.items = names, iter(batches)

    def get_next(self):
        item = next(self.items, None)
        return None if item is None else {self.names[0]: item[0].numpy(), self.names[1]: item[1].numpy()}


def baselines(fp32: pathlib.Path, folder: pathlib.Path, calib) -> dict[str, pathlib.Path]:
    """ONNX Runtime's own quantizers applied to the fp32 file, as documented (plus the opset-23 op list)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = {}
    for label, per_channel in (("ORT quantize_dynamic (defaults)", False), ("ORT quantize_dynamic (per_channel)", True)):
        path = folder / f"ort_dynamic_{per_channel}.onnx"
        quantize_dynamic(fp32, path, per_channel=per_channel, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gather"])  # its defaults skip opset-23 graphs
        out[label] = path
    path = folder / "ort_static.onnx"
    names = [i.name for i in session(fp32).get_inputs()]
    quantize_static(fp32, path, _Reader(names, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax)
    out["ORT quantize_static (QDQ, per-channel, MinMax)"] = path
    import onnx

    path = folder / "ort_int4.onnx"
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=False)
    quantizer.process()
    quantizer.model.save_model_to_file(str(path))
    out["ORT MatMulNBitsQuantizer (int4, block 32)"] = path
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--opset", type=int, default=23, help="ONNX opset of every export (23: the standard Attention op)")
    p.add_argument("--repeat", type=int, default=300)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    model = load_embedder()
    ids, mask = encode(sample_sentences(), SEQ)
    heldout = [(ids[i:i + 1], mask[i:i + 1]) for i in range(len(ids))]
    cids, cmask = encode(reference_sentences()[:32], SEQ)
    calib = [(cids[i:i + 1], cmask[i:i + 1]) for i in range(len(cids))]
    with torch.no_grad():
        reference = [model(*x) for x in heldout]
    rows: dict[str, dict] = {}
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        fp32 = ptool.export_onnx(model, folder / "fp32.onnx", example_inputs=heldout[0], opset=a.opset)
        files = {"ORT fp32": fp32}
        log("ORT baselines")
        files.update(baselines(fp32, folder, calib))
        for label, passes in PIPELINES.items():
            log(f"{label}: {passes}")
            start = time.perf_counter()
            m2 = ptool.transform(model, passes, heldout[0], calibration=calib)
            seconds = time.perf_counter() - start
            path = ptool.export_onnx(m2, folder / f"ptool_{len(files)}.onnx", example_inputs=heldout[0], opset=a.opset)
            files[label] = path
            skipped = [s for r in m2.report.records for s in r.skipped if s.reason.startswith("kept float")]
            rows[label] = {"passes": passes, "transform_s": seconds,
                           "kept_float": [f"{s.site}: {s.reason}" for s in skipped]}
        for label, path in files.items():
            runners[label] = OrtRunner(path)
            row = rows.setdefault(label, {})
            row["cosine"] = mean_cosine(reference, runners[label], heldout)
            row["weight_bytes"] = weight_bytes(path)
            log(f"{label}: cosine {row['cosine']:.4f}, {row['weight_bytes'] / 1e6:.1f} MB")
        torch_dyn = torch.ao.quantization.quantize_dynamic(load_embedder(), {torch.nn.Linear}, dtype=torch.qint8)
        rows["torch fp32 (eager)"] = {"cosine": 1.0}
        rows["torch quantize_dynamic (qint8 Linear)"] = {"cosine": mean_cosine(reference, torch_dyn, heldout)}
        log("timing")
        candidates = {**runners, "torch fp32 (eager)": model, "torch quantize_dynamic (qint8 Linear)": torch_dyn}
        timings = measure_interleaved(candidates, heldout[0], repeat=a.repeat, warmup=10)
    base = timings["ORT fp32"].median_ms
    fp32_bytes = rows["ORT fp32"]["weight_bytes"]
    for label, t in timings.items():
        rows[label].update({"median_ms": t.median_ms, "spread": t.spread, "vs_ort_fp32": t.median_ms / base})
        if "weight_bytes" in rows[label]:
            rows[label]["bytes_vs_fp32"] = rows[label]["weight_bytes"] / fp32_bytes
    md = markdown(rows, a)
    if a.no_write:
        print(md)
    else:
        print(write_section("quantization", md, {"rows": rows, "opset": a.opset}))


def markdown(rows: dict, a) -> str:
    lines = ["## Quantization on all-MiniLM-L6-v2 (`tools/bench_quant.py`)", "",
             "Sentence embedder, batch 1, 128 tokens. Cosine: mean over the 64 held-out sentences vs fp32. "
             "Latency: one round-robin run of every candidate (2 threads), median; 'x ORT fp32' is the ratio to "
             f"the fp32 ONNX Runtime session of the same run. Export opset: {a.opset or 'exporter default'}.", "",
             "| candidate | cosine vs fp32 | median ms | x ORT fp32 | weight MB | x fp32 bytes |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        mb = f"{r['weight_bytes'] / 1e6:.1f}" if "weight_bytes" in r else "-"
        ratio = f"{r['bytes_vs_fp32']:.3f}" if "bytes_vs_fp32" in r else "-"
        lines.append(f"| {label} | {r['cosine']:.4f} | {r.get('median_ms', float('nan')):.2f} | "
                     f"{r.get('vs_ort_fp32', float('nan')):.2f} | {mb} | {ratio} |")
    kept = {label: r["kept_float"] for label, r in rows.items() if r.get("kept_float")}
    if kept:
        lines += ["", "Layers kept in float:"]
        lines += [f"- {label}: " + "; ".join(v) for label, v in kept.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
