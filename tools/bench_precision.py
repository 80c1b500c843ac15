"""Tuned for the target: reduced precision and integer kernels against the peers a user would try first.

Writes the "Precision and fast kernels" section of ``BENCHMARKS.md`` (key ``precision``).

Per model (batch 1), every candidate is built, checked for fidelity, then all are timed side by side
(round-robin, one untimed settling call before each timed one, medians):

- baseline: eager torch, float32;
- peers, as a user would run them: ``model.to(torch.bfloat16)`` in eager torch; ONNX Runtime
  ``quantize_dynamic`` (per-channel, opset 23, ``op_types_to_quantize=[MatMul, Gather]``, 2 threads;
  thread spinning off in the table, ORT's default spinning in the head-to-head);
  ``torch.compile`` (defaults);
- ptool: ``precision`` (bf16 / fp16) and ``quantize`` (int8 on ``torch._int_mm``), each after the
  exact cleanup the tuner runs first (``dce, cse, constant-fold, fold-bn``), on torch eager,
  ``torch.compile`` with Inductor freezing, AOTInductor (ahead of time, with freezing), ONNX Runtime
  and TVM; and, for MiniLM with ``--tune``,
  the winner of ``ptool.autotune(max_error=0.005)``.

Fidelity: all-MiniLM-L6-v2 (real weights) as the mean embedding cosine over the 64 held-out
sentences (batch 1, 128 tokens); BERT-base and ViT-B/16 (random weights from their configs) as the
output cosine against float32 on 4 random inputs. Distance to the physical limit: the graph's
matmul-class FLOPs (``ptool.ir.flops``) over the peak this CPU reaches on one large GEMM in the
candidate's number format (float32 / bf16 ``torch.mm``, int8 ``torch._int_mm``, 2048^3, both cores),
against the measured latency.

    .venv/bin/python tools/bench_precision.py [--models minilm,bert128,bert512,vit] [--tune] [--repeat 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile workers left spinning beside the timing

import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from _minilm import heldout_batches, log  # noqa: E402
from _sections import write_section  # noqa: E402

import ptool  # noqa: E402
from ptool.benchmark import measure_blocks, measure_interleaved  # noqa: E402
from ptool.ir.flops import estimate_flops  # noqa: E402
from ptool.passes.pipelines import default_pipeline  # noqa: E402
from ptool.tune.fingerprint import device_fingerprint  # noqa: E402

MAX_ERROR = 0.005
COMPILED = {"compile": True, "freezing": True}
AOT = {"compile": True, "freezing": True, "aot": True}

#: ptool candidates: label -> (passes, backend, backend options)
PTOOL = {
    "ptool precision bf16 | torch": (["precision:dtype=bf16"], "torch", {}),
    "ptool precision bf16 | torch.compile+freezing": (["precision:dtype=bf16"], "torch", COMPILED),
    "ptool int8 per-token | torch.compile+freezing": (["quantize:activations=per-token"], "torch", COMPILED),
    "ptool int8 per-token | AOTInductor+freezing": (["quantize:activations=per-token"], "torch", AOT),
    "ptool int8 per-token + int8 attention | AOTInductor+freezing": (
        ["quantize:activations=per-token,attention=int8"], "torch", AOT),
    "ptool int8 per-token + bf16 attention | AOTInductor+freezing": (
        ["quantize:activations=per-token,attention=bf16"], "torch", AOT),
    "ptool precision bf16 | AOTInductor+freezing": (["precision:dtype=bf16"], "torch", AOT),
    "ptool int8 per-token + bf16 | torch.compile+freezing": (
        ["quantize:activations=per-token", "precision:dtype=bf16"], "torch", COMPILED),
    "ptool int8 per-token | torch": (["quantize:activations=per-token"], "torch", {}),
    "ptool int8 per-tensor | AOTInductor+freezing": (["quantize"], "torch", AOT),
    "ptool int8 per-token + bf16 | AOTInductor+freezing": (
        ["quantize:activations=per-token", "precision:dtype=bf16"], "torch", AOT),
    "ptool precision fp16 | onnxruntime": (["precision:dtype=fp16"], "onnxruntime", {"intra_op_threads": 2}),
    "ptool precision bf16 | onnxruntime": (["precision:dtype=bf16"], "onnxruntime", {"intra_op_threads": 2}),
    "ptool precision bf16 | tvm": (["precision:dtype=bf16"], "tvm", {}),
}


@dataclass
class Case:
    """One model at one shape: the float32 module, its example call, its fidelity measure."""

    name: str
    model: torch.nn.Module
    args: tuple
    fidelity: Callable[[Callable], float]
    notes: list[str] = field(default_factory=list)


class _LastHidden(torch.nn.Module):
    """A Hugging Face encoder returning its last hidden state as one float tensor."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args).last_hidden_state


def _output_cosine(reference: torch.nn.Module, inputs: list[tuple]) -> Callable[[Callable], float]:
    with torch.no_grad():
        want = [reference(*a).float() for a in inputs]

    def fidelity(fn: Callable) -> float:
        with torch.no_grad():
            got = [fn(*a).float() for a in inputs]
        return min(float(torch.nn.functional.cosine_similarity(w.flatten(), g.flatten(), dim=0))
                   for w, g in zip(want, got))

    return fidelity


def minilm_case() -> Case:
    from ptool.default_model import default_model

    d = default_model()
    held = heldout_batches(128, 1)
    with torch.no_grad():
        want = [d.module(*a) for a in held]

    def fidelity(fn: Callable) -> float:
        with torch.no_grad():
            got = [fn(*a).float() for a in held]
        return float(torch.cat([torch.nn.functional.cosine_similarity(w, g, dim=-1)
                                for w, g in zip(want, got)]).mean())

    return Case("all-MiniLM-L6-v2, seq 128 (real weights)", d.module, tuple(d.example_inputs), fidelity)


def bert_case(seq: int) -> Case:
    import transformers

    torch.manual_seed(0)
    model = _LastHidden(transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False)).eval()
    inputs = [(torch.randint(1000, 30000, (1, seq)), torch.ones(1, seq, dtype=torch.long)) for _ in range(5)]
    return Case(f"BERT-base, seq {seq} (random weights)", model, inputs[0], _output_cosine(model, inputs[1:]))


def vit_case() -> Case:
    import transformers

    torch.manual_seed(0)
    model = _LastHidden(transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=False)).eval()
    inputs = [(torch.randn(1, 3, 224, 224),) for _ in range(5)]
    return Case("ViT-B/16, 224 px (random weights)", model, inputs[0], _output_cosine(model, inputs[1:]))


CASES = {"minilm": minilm_case, "bert128": lambda: bert_case(128), "bert512": lambda: bert_case(512),
         "vit": vit_case}


# ---------------------------------------------------------------------------------------------- peers


def _no_grad(fn: Callable) -> Callable:
    def run(*args):
        with torch.no_grad():
            return fn(*args)

    return run


def ort_quantize_dynamic(case: Case, folder: pathlib.Path, *, spinning: bool = False) -> Callable:
    """ONNX Runtime's own dynamic quantizer on the float32 export, as its docs show it.

    ``spinning``: ORT's default thread spinning (its workers busy-wait after a run: 7-10% faster
    here, BERT-base seq 128 49.0 vs 52.8 ms). Off in the round-robin table, where the spinning
    would slow every other candidate; on in the head-to-head, which times in blocks."""
    int8 = folder / "int8.onnx"
    if not int8.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = ptool.export_onnx(case.model, folder / "fp32.onnx", case.args, opset=23)
        quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gather"])
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(int8), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args):
        return torch.from_numpy(session.run(None, {n: a.numpy() for n, a in zip(names, args)})[0])

    return run


BASELINE = "baseline: torch eager fp32"
ORT_PEER = "peer: ORT quantize_dynamic per-channel, opset 23"


def peers(case: Case, folder: pathlib.Path, *, ort_spinning: bool = False) -> dict[str, Callable]:
    bf16 = copy.deepcopy(case.model).to(torch.bfloat16)
    compiled = torch.compile(case.model)
    _no_grad(compiled)(*case.args)
    return {
        "peer: model.to(torch.bfloat16) | eager": _no_grad(bf16),
        ORT_PEER: ort_quantize_dynamic(case, folder, spinning=ort_spinning),
        "peer: torch.compile": _no_grad(compiled),
    }


# ---------------------------------------------------------------------------------------------- limits


def gemm_peaks(size: int = 2048) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) this CPU reaches on one large GEMM per number format, median of 5."""
    import statistics

    peaks = {}
    a32, b32 = torch.randn(size, size), torch.randn(size, size)
    a8, b8 = torch.randint(-127, 127, (size, size), dtype=torch.int8), torch.randint(-127, 127, (size, size),
                                                                                    dtype=torch.int8)
    ops = {"fp32": lambda: a32 @ b32, "bf16": (lambda a, b: lambda: a @ b)(a32.bfloat16(), b32.bfloat16()),
           "int8": lambda: torch._int_mm(a8, b8)}
    for name, op in ops.items():
        op()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
        peaks[name] = 2 * size ** 3 / statistics.median(times) / 1e9
    return peaks


def number_format(passes: list[str]) -> str:
    """The unit a candidate's matmuls run on (fp16 has none on this CPU class: it runs as float32)."""
    if any(p.startswith("quantize") and "int4" not in p for p in passes):
        return "int8"
    if any(p.startswith("precision") and "fp16" not in p for p in passes):
        return "bf16"
    return "fp32"


# ---------------------------------------------------------------------------------------------- run


def run_case(case: Case, *, repeat: int, tune: bool, tune_dir: pathlib.Path) -> dict:
    rows: dict[str, dict] = {}
    runs: dict[str, Callable] = {BASELINE: _no_grad(case.model)}
    flops: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, fn in peers(case, pathlib.Path(tmp)).items():
            runs[label] = fn
        for label, (approximate, backend, options) in PTOOL.items():
            passes = default_pipeline() + approximate
            log(f"  building {label}")
            t0 = time.perf_counter()
            try:
                m2 = ptool.transform(case.model, passes, case.args)
                runs[label] = ptool.compile(m2, backend=backend, **options)
                flops[label] = estimate_flops(m2.graph_module).total
                rows[label] = {"passes": passes, "backend": backend, "options": options,
                               "build_s": round(time.perf_counter() - t0, 1)}
            except Exception as e:  # a backend that cannot take the format: its row says why
                rows[label] = {"passes": passes, "backend": backend, "options": options,
                               "failed": f"{type(e).__name__}: {ptool.errors.first_line(e)}"[:200]}
                log(f"    failed: {rows[label]['failed']}")
        if tune:
            log("  ptool.autotune(max_error=0.005)")
            best = ptool.autotune(case.model, case.args, max_error=MAX_ERROR, backends=["torch", "onnxruntime"],
                                  held_out_inputs=heldout_batches(128, 1)[:8], record_dir=tune_dir, progress=False)
            label = f"ptool tune winner: {best.config}"
            runs[label] = best.compiled
            rows[label] = {"passes": list(best.config.passes), "backend": best.config.backend,
                           "options": best.config.options_dict, "tune_seconds": round(best.seconds, 1),
                           "candidates": len(best.table)}
            m2 = ptool.transform(case.model, list(best.config.passes), case.args)
            flops[label] = estimate_flops(m2.graph_module).total
        for label, fn in runs.items():
            rows.setdefault(label, {})["cosine"] = case.fidelity(fn)
        log(f"  timing {len(runs)} candidates side by side")
        timings = measure_interleaved(runs, case.args, warmup=2, settle=1, repeat=repeat)
        base = timings[BASELINE].median_ms
        peer_best = min(t.median_ms for k, t in timings.items() if k.startswith("peer"))
        for label, t in timings.items():
            row = rows[label]
            row.update(median_ms=round(t.median_ms, 2), spread=round(t.spread, 2),
                       vs_eager=round(base / t.median_ms, 2), vs_best_peer=round(peer_best / t.median_ms, 2))
            if label in flops:
                row["gflops"] = round(flops[label] / 1e9, 2)
                row["format"] = number_format(row["passes"])
        best = _best(timings)
        table_peers = {k: fn for k, fn in runs.items() if k.startswith(("peer", "baseline"))}
        spinning_ort = {ORT_PEER: ort_quantize_dynamic(case, pathlib.Path(tmp), spinning=True)}
        head_to_head = _head_to_head({**table_peers, **spinning_ort, best: runs[best]}, best, case, repeat)
    return {"rows": rows, "baseline_ms": base, "best_peer_ms": peer_best, "head_to_head": head_to_head}


def _best(timings: dict) -> str:
    """The tuned winner, else the fastest ptool candidate."""
    ours = [k for k in timings if not k.startswith(("peer", "baseline"))]
    winners = [k for k in ours if k.startswith("ptool tune winner")]
    return winners[0] if winners else min(ours, key=lambda k: timings[k].median_ms)


def _head_to_head(subset: dict[str, Callable], best: str, case: Case, repeat: int) -> dict:
    """ptool's ``best`` timed again beside the baseline and the peers only (``subset`` holds all of them), in blocks.

    Each runtime as it would run alone: ONNX Runtime with its default thread spinning (7-10% faster
    than without), every candidate timed in whole turns (:func:`ptool.benchmark.measure_blocks`:
    per round 3 untimed calls, then ``repeat // 4`` timed ones) so no runtime's spinning threads
    are still busy during another's timed calls. This is the comparison to quote.
    """
    log(f"  head to head (blocks): {best} vs the peers")
    again = measure_blocks(subset, case.args, rounds=4, warmup=3, repeat=max(repeat // 4, 3))
    ms = {k: round(t.median_ms, 2) for k, t in again.items()}
    peer = min(v for k, v in ms.items() if k.startswith("peer"))
    fastest_peer = min((k for k in ms if k.startswith("peer")), key=ms.get)
    return {"candidate": best, "ms": ms, "vs_eager": round(ms[BASELINE] / ms[best], 2),
            "vs_best_peer": round(peer / ms[best], 2), "best_peer": fastest_peer, "timing": "blocks, ORT spinning",
            "measured": _today()}


def _today() -> str:
    import datetime

    return datetime.date.today().isoformat()


def head_to_head_only(case: Case, previous: dict, repeat: int) -> dict:
    """Re-run only the head-to-head of a model, with the candidate (passes, backend, options) of its last run."""
    label = previous["head_to_head"]["candidate"]
    row = previous["rows"][label]
    log(f"  building {label}")
    m2 = ptool.transform(case.model, row["passes"], case.args)
    fn = ptool.compile(m2, backend=row["backend"], **row["options"])
    with tempfile.TemporaryDirectory() as tmp:
        subset = {BASELINE: _no_grad(case.model), **peers(case, pathlib.Path(tmp), ort_spinning=True),
                  label: fn}
        return {**previous, "head_to_head": _head_to_head(subset, label, case, repeat)}


def render(results: dict, peaks: dict[str, float], fingerprint: str) -> str:
    out = [
        "## Precision and fast kernels (`tools/bench_precision.py`)",
        "",
        f"Device: {fingerprint}. Batch 1, 2 threads, every candidate of a model timed side by side in one run "
        "(round-robin, medians; ONNX Runtime with thread spinning off, which would slow the next candidate). "
        "*vs eager* = float32 eager time / candidate time; *vs best peer* = the fastest "
        "of `model.to(torch.bfloat16)`, ORT `quantize_dynamic` and `torch.compile` / candidate time. Cosine: "
        "MiniLM = mean embedding cosine on the 64 held-out sentences; the others = output cosine on 4 random "
        "inputs (worst). Each table carries the day it was measured and the GEMM peaks (2048^3, both cores) "
        "measured with it, which its *limit* column uses: this shared VM's speed moves from day to day, so "
        "compare ratios within a table.",
        "",
    ]
    for name, result in results.items():
        table_peaks = result.get("gemm_peaks", peaks)
        measured = f"measured {result['measured']}, " if "measured" in result else ""
        out += [f"### {name}", "", f"Table {measured}GEMM peaks "
                + ", ".join(f"{k} {v:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in table_peaks.items()) + ".",
                "", "| candidate | median ms | vs eager | vs best peer | cosine | limit | notes |",
                "|---|---:|---:|---:|---:|---:|---|"]
        rows = sorted(result["rows"].items(), key=lambda kv: kv[1].get("median_ms", 1e9))
        for label, row in rows:
            if "failed" in row:
                out.append(f"| {label} | – | – | – | – | – | failed: {row['failed']} |")
                continue
            limit = ""
            if "gflops" in row:
                ideal_ms = row["gflops"] / table_peaks[row["format"]] * 1e3
                limit = f"{ideal_ms:.1f} ms ({100 * ideal_ms / row['median_ms']:.0f}%)"
            notes = []
            if "build_s" in row:
                notes.append(f"build {row['build_s']} s")
            if "tune_seconds" in row:
                notes.append(f"tuned in {row['tune_seconds']} s over {row['candidates']} rows")
            out.append(f"| {label} | {row['median_ms']:.2f} | {row['vs_eager']:.2f}x | {row['vs_best_peer']:.2f}x | "
                       f"{row['cosine']:.5f} | {limit} | {', '.join(notes)} |")
        out.append("")
        h2h = result.get("head_to_head")
        if h2h:
            times = "; ".join(f"{k.removeprefix('peer: ')} {v:.2f} ms" for k, v in h2h["ms"].items())
            when = f", measured {h2h['measured']}" if "measured" in h2h else ""
            out += [f"Head to head (the tune winner, else the fastest ptool row, timed again beside the baseline and the peers only, in blocks, ONNX Runtime with its default thread spinning{when}): "
                    f"**{h2h['vs_best_peer']:.2f}x** the fastest peer ({h2h['best_peer'].removeprefix('peer: ')}), "
                    f"{h2h['vs_eager']:.2f}x eager float32 — {times}.", ""]
    out.append("*limit*: the graph's matmul-class FLOPs over the GEMM peak of the candidate's number format "
               "(int8 when `quantize` ran, bf16 for `precision:dtype=bf16`, float32 otherwise: fp16 has no "
               "arithmetic units on this CPU class), and that time as a share of the measured one. The peaks are "
               "torch's own GEMM kernels at 2048^3, not the silicon's: above 100% (ONNX Runtime's fp16 rows) "
               "means ONNX Runtime's MLAS GEMM beats torch's float32 GEMM here.")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert128,bert512,vit")
    parser.add_argument("--tune", action="store_true", help="also run ptool.autotune on MiniLM")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--head-to-head-only", action="store_true",
                        help="re-time only each model's head-to-head, with the candidate of its last run")
    args = parser.parse_args()
    torch.manual_seed(0)
    fp = device_fingerprint()
    log(f"device: {fp}")
    peaks = gemm_peaks()
    log("GEMM peaks: " + json.dumps({k: round(v) for k, v in peaks.items()}))
    previous = {}
    json_path = ROOT / "BENCHMARKS.json"
    if json_path.exists():
        previous = json.loads(json_path.read_text()).get("precision", {}).get("models", {})
    results = {}
    for key in args.models.split(","):
        case = CASES[key]()
        log(f"{case.name}")
        if args.head_to_head_only:
            if case.name not in previous:
                raise SystemExit(f"--head-to-head-only: no earlier run of {case.name} in BENCHMARKS.json")
            results[case.name] = head_to_head_only(case, previous[case.name], args.repeat)
            continue
        with tempfile.TemporaryDirectory() as tune_dir:
            results[case.name] = {**run_case(case, repeat=args.repeat, tune=args.tune and key == "minilm",
                                             tune_dir=pathlib.Path(tune_dir)), "gemm_peaks": peaks, "measured": _today()}
        del case
    merged = {**previous, **results}  # a run of some models keeps the others' last figures
    section = render(merged, peaks, str(fp))
    write_section("precision", section, {"fingerprint": fp.to_dict(), "gemm_peaks": peaks, "models": merged})
    print(section)


if __name__ == "__main__":
    main()
