"""int4 weight-only quantization of a small trained decoder: held-out perplexity of RTN, GPTQ and AWQ.

Writes the "Weight-only int4" section of ``BENCHMARKS.md`` (key ``weight-quant``).

Model: the byte-level Llama-style decoder of ``tools/train_decoder.py`` (4 layers, hidden 128,
grouped-query attention, RoPE, SwiGLU; trained on the Python help texts, reused from
``~/.cache/ptool/decoder/``). Perplexity: ``exp`` of the mean next-byte NLL over the held-out
topics, cut into windows of 128 bytes (batch 8). Calibration (GPTQ, AWQ, and ONNX Runtime's GPTQ):
64 windows of 128 bytes drawn (seed 0) from the training text, 8 calls of batch 8; never held-out text.

Candidates, every one at int4 with groups (blocks) of 32 and of 128 inputs, asymmetric, on every
Linear including the output head (embeddings stay float):

- ptool ``quantize:mode=int4-weight,method=rtn|gptq|awq`` on the torch model, exported to ONNX
  (``com.microsoft.MatMulNBits``) and run by ONNX Runtime; also run in torch (``linear_int4``),
  the column "torch" (the two must agree);
- ONNX Runtime's ``MatMulNBitsQuantizer`` on the fp32 ONNX export of the same model: its default
  algorithm (round to nearest, ``DefaultWeightOnlyQuantConfig``), GPTQ
  (``GPTQWeightOnlyQuantConfig``, Intel Neural Compressor's, with the same calibration windows)
  and HQQ (``HQQWeightOnlyQuantConfig``, no data).

    .venv/bin/python tools/bench_weightquant.py [--no-write]
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

import train_decoder as td  # noqa: E402
from _sections import write_section  # noqa: E402

import ptool  # noqa: E402

BATCH = td.EVAL_BATCH
#: Why ORT's GPTQ rows match its RTN rows, as read in onnxruntime 1.32's bundled copy of Intel Neural
#: Compressor (``quantization/neural_compressor/weight_only.py``, ``gptq``): the error of a quantized
#: row is fed to the rows after it through ``Hinv1[i:, i]`` and ``Hinv[i2:, i1:i2]``, the lower half of
#: the upper-triangular factor ``cholesky(inv(H)).T``, which is zero, so nothing is fed forward.
GPTQ_NOTE = (" (its bundled GPTQ feeds each row's error forward through the lower half of an upper-triangular "
             "factor of the inverse Hessian, which is zero, so no rounding error is fed forward).")
GROUPS = (32, 128)
METHODS = ("rtn", "gptq", "awq")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def session(path: pathlib.Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_runner(path: pathlib.Path):
    sess = session(path)
    name = sess.get_inputs()[0].name
    return lambda ids: torch.from_numpy(sess.run(None, {name: ids.numpy()})[0])


class _Reader:
    """ORT calibration reader over the calibration batches (a fresh copy is iterated per use)."""

    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.name, self.batches, self.i = name, batches, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1].numpy()}

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def ort_quantized(fp32: pathlib.Path, folder: pathlib.Path, algorithm: str, group: int, calib) -> pathlib.Path:
    """ONNX Runtime's MatMulNBitsQuantizer on the fp32 file, as its documentation shows."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    config = None
    if algorithm == "gptq":
        name = session(fp32).get_inputs()[0].name
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(name, calib), percdamp=0.01,
                                               block_size=128, actorder=False)
    elif algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=group, bits=4)
    quantizer = mnq.MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=group, is_symmetric=False,
                                         algo_config=config)
    quantizer.process()
    path = folder / f"ort_{algorithm}_{group}.onnx"
    quantizer.model.save_model_to_file(str(path))
    return path


def same_levels(a: pathlib.Path, b: pathlib.Path) -> tuple[int, int]:
    """How many MatMulNBits nodes of ``b`` store the same levels, zero points and scales (rtol 1e-6) as in ``a``."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def stored(path):
        model = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.name: [inits[i] for i in n.input[1:4]] for n in model.graph.node if n.op_type == "MatMulNBits"}

    left, right = stored(a), stored(b)
    same = sum(np.array_equal(x[0], y[0]) and np.array_equal(x[2], y[2]) and np.allclose(x[1], y[1], rtol=1e-6)
               for name, x in left.items() if (y := right.get(name)) is not None)
    return same, len(right)


def op_count(path: pathlib.Path, op_type: str) -> int:
    import onnx

    return sum(n.op_type == op_type for n in onnx.load(str(path)).graph.node)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", type=int, default=64, help="calibration windows (multiple of 8)")
    p.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, meta = td.load()
    net = td.Logits(model).eval()
    train, _, heldout = td.evaluation_split(BATCH)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, train.numel() - td.SEQ, (a.calibration,), generator=gen).tolist()
    calib_windows = torch.stack([train[s:s + td.SEQ] for s in starts])
    calib = list(calib_windows.split(BATCH))
    example = heldout[:BATCH]
    rows: dict[str, dict] = {}

    def add(label: str, group: int | None, ppl_ort: float | None, ppl_torch: float | None = None, **extra) -> None:
        rows[label] = {"group": group, "ppl": ppl_ort if ppl_ort is not None else ppl_torch, "ppl_ort": ppl_ort,
                       "ppl_torch": ppl_torch, **extra}
        log(f"{label}: ppl {rows[label]['ppl']:.4f}" + (f" (torch {ppl_torch:.4f})" if ppl_torch else ""))

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        fp32 = ptool.export_onnx(net, folder / "fp32.onnx", example_inputs=(example,))
        add("fp32", None, td.perplexity(ort_runner(fp32), heldout, BATCH), td.perplexity(net, heldout, BATCH))
        for group in GROUPS:
            for method in METHODS:
                spec = f"quantize:mode=int4-weight,group_size={group},embeddings=false,method={method}"
                start = time.perf_counter()
                m2 = ptool.transform(net, [spec], (example,), calibration=[(c,) for c in calib])
                seconds = time.perf_counter() - start
                path = ptool.export_onnx(m2, folder / f"ptool_{method}_{group}.onnx", example_inputs=(example,))
                notes = m2.report.records[-1].notes
                extra = {"spec": spec, "transform_s": seconds, "matmulnbits": op_count(path, "MatMulNBits")}
                if method == "awq":
                    hows = [n["how"].split(" (")[0] for n in notes["awq"].values()]
                    extra["awq_folds"] = {h: hows.count(h) for h in sorted(set(hows))}
                    extra["awq_scale"] = {k: (v.get("form"), v.get("alpha")) for k, v in notes["awq"].items()}
                layer_notes = notes.get(method, {})
                if layer_notes:
                    extra["mean_layer_error"] = sum(n["error"] for n in layer_notes.values()) / len(layer_notes)
                    extra["mean_layer_rtn_error"] = sum(n["rtn_error"] for n in layer_notes.values()) / len(layer_notes)
                add(f"ptool {method.upper()}", group, td.perplexity(ort_runner(path), heldout, BATCH),
                    td.perplexity(m2, heldout, BATCH), **extra)
            ort_files = {}
            for algorithm in ("default", "gptq", "hqq"):
                start = time.perf_counter()
                try:
                    path = ort_quantized(fp32, folder, algorithm, group, calib)
                except Exception as e:  # an algorithm this ORT build cannot run: say so in the table
                    log(f"ORT {algorithm}: {type(e).__name__}: {e}")
                    rows[f"ORT MatMulNBitsQuantizer {algorithm}"] = {"group": group, "error": f"{type(e).__name__}: {e}"}
                    continue
                ort_files[algorithm] = path
                extra = {}
                if algorithm != "default" and "default" in ort_files:
                    extra["same_levels_as_default"] = same_levels(ort_files["default"], path)
                add(f"ORT MatMulNBitsQuantizer {algorithm}", group, td.perplexity(ort_runner(path), heldout, BATCH),
                    transform_s=time.perf_counter() - start, matmulnbits=op_count(path, "MatMulNBits"), **extra)
            # one table row per (label, group)
            for label in [k for k in rows if "group" in rows[k] and rows[k]["group"] == group and "@" not in k]:
                rows[f"{label} @{group}"] = rows.pop(label)
    import onnxruntime

    data = {"rows": rows, "model": meta, "calibration_windows": a.calibration, "heldout_windows": heldout.shape[0],
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    md = markdown(data)
    if a.no_write:
        print(md)
    else:
        print(write_section("weight-quant", md, data))


def verdict(rows: dict) -> list[str]:
    """Acceptance: ptool's GPTQ and AWQ each closer to the fp32 perplexity than ptool's RTN, per group size."""
    base = rows["fp32"]["ppl"]
    lines = []
    for group in GROUPS:
        rtn = rows[f"ptool RTN @{group}"]["ppl"] - base
        for method in ("GPTQ", "AWQ"):
            gap = rows[f"ptool {method} @{group}"]["ppl"] - base
            lines.append(f"group {group}: {method} {'closer to' if gap < rtn else 'NOT closer to'} fp32 than RTN "
                         f"(+{gap:.4f} vs +{rtn:.4f})")
    return lines


def markdown(data: dict) -> str:
    rows, meta = data["rows"], data["model"]
    base = rows["fp32"]["ppl"]
    recipe = meta["recipe"]
    lines = [
        "## Weight-only int4 on a small trained decoder (`tools/bench_weightquant.py`)", "",
        f"Byte-level Llama-style decoder from `tools/train_decoder.py` ({recipe['layers']} layers, hidden "
        f"{recipe['hidden']}, MLP {recipe['intermediate']}, {recipe['heads']}/{recipe['kv_heads']} query/KV heads, "
        f"{meta['parameters'] / 1e6:.2f} M parameters, {recipe['steps']} steps on the Python help texts, "
        f"{meta['train_seconds'] / 60:.0f} min). Perplexity per byte over {data['heldout_windows']} held-out windows of "
        f"{recipe['seq']} bytes (topics never trained on). Every Linear (the output head included) int4, asymmetric, "
        f"groups of 32 or 128 inputs; embeddings float. GPTQ / AWQ / ORT GPTQ calibrate on "
        f"{data['calibration_windows']} training windows. 'ppl' is ONNX Runtime {data['onnxruntime']} running "
        "MatMulNBits; 'torch' the same ptool model in torch (`linear_int4`).", "",
        "| candidate | group | perplexity | vs fp32 | torch | transform s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        name = label.split(" @")[0]
        group = r.get("group") or "-"
        if "error" in r:
            lines.append(f"| {name} | {group} | not run: {r['error'][:80]} | | | |")
            continue
        delta = "" if label == "fp32" else f"+{r['ppl'] - base:.4f}"
        torch_ppl = f"{r['ppl_torch']:.4f}" if r.get("ppl_torch") else "-"
        seconds = f"{r['transform_s']:.1f}" if "transform_s" in r else "-"
        lines.append(f"| {name} | {group} | {r['ppl']:.4f} | {delta} | {torch_ppl} | {seconds} |")
    lines += ["", "Acceptance (issue 25): " + "; ".join(verdict(rows)) + "."]
    for label, r in rows.items():
        if "awq_folds" in r:
            folds = ", ".join(f"{k} {v}" for k, v in r["awq_folds"].items())
            forms = [form for form, _ in r["awq_scale"].values() if form]
            lines.append(f"- {label}: where AWQ put 1/s: {folds}; scale form mean|x|^a on {forms.count('x')} sites, "
                         f"mean|x|^a / mean|w|^(1-a) on {forms.count('x/w')}.")
        if "same_levels_as_default" in r and "gptq" in label:
            same, total = r["same_levels_as_default"]
            lines.append(f"- {label}: stores the same levels, zero points and scales as ORT's default on {same} of "
                         f"{total} layers" + (GPTQ_NOTE if same else "."))
        if "mean_layer_error" in r:
            lines.append(f"- {label}: mean relative layer-output error on the calibration data "
                         f"{r['mean_layer_error']:.2e} (RTN {r['mean_layer_rtn_error']:.2e}).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
