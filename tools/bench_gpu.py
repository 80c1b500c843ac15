"""The GPU path, checked and measured: every backend on ``device="cuda"`` through ``ptool.compile``.

Writes the "GPU backends" section of ``BENCHMARKS.md`` (key ``gpu_backends``). Without a CUDA
device it prints one line, ``no CUDA device: ...``, exits 2 and writes nothing.

Protocol: batch 1, seq 128, inputs on the GPU. MiniLM = ptool's sentence embedder with the real
all-MiniLM-L6-v2 weights, timed on the first held-out sentence, fidelity over 8 held-out ones;
BERT-base = ``BertModel(BertConfig())`` with seeded random weights, random token ids, full mask
(fidelity on that call and 3 more random ones). Candidates, each compiled by ``ptool.compile(...,
device="cuda")``: torch eager fp32 (the baseline), fp16 (``.half()``) and bf16 (``.to(bfloat16)``),
``torch.compile``, ONNX Runtime on its CUDA execution provider (and TensorRT's when the installed
build lists it), TVM for the GPU (dlight schedules). Each call is timed with
``torch.cuda.synchronize()`` inside (a GPU call returns before the work is done); median of up
to ``--repeat`` calls after 3 warm-ups (fewer for a slow candidate, ``--seconds`` each). Speedup =
eager fp32 median / candidate median; cosine of the output vs eager fp32 (float64 on the host).

Each candidate's build and fidelity check run under a timeout (``--timeout``, in a worker thread)
and the whole run under a budget (``--budget``): a failure, a timeout or an unmet budget is
recorded as that candidate's row, with the reason, and the run goes on. A timed-out build cannot
be stopped (it is in native code); it is left running in the background, and the rows after it
say so. Timing runs in the main thread, at most ``--seconds`` per candidate.

    .venv/bin/python tools/bench_gpu.py [--models minilm bert-base] [--device cuda] [--repeat 50]
                                        [--timeout 100] [--budget 270] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import gc
import pathlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ = 128
KEY = "gpu_backends"
WARMUP = 3


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def no_gpu_reason(device: str) -> str | None:
    """Why ``device`` cannot run here (None if it can), from ptool's own device check."""
    from ptool.backends.device import check_available, parse_device
    from ptool.errors import UsageError

    try:
        check_available(parse_device(device))
    except UsageError as e:
        return str(e).split(" is not available: ", 1)[-1].removesuffix("; allowed here: cpu")
    return None


# --------------------------------------------------------------------------------------------
# Models: (module on the host, timed call, fidelity calls, output -> the tensor compared)


def minilm():
    from _minilm import heldout_batches

    from ptool.default_model import load_embedder

    held = heldout_batches(SEQ, 1)[:8]
    return load_embedder(), held[0], held


def bert_base():
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig()).eval()
    gen = torch.Generator().manual_seed(0)
    calls = [(torch.randint(1000, 30000, (1, SEQ), generator=gen), torch.ones(1, SEQ, dtype=torch.int64))
             for _ in range(4)]
    return model, calls[0], calls


MODELS = {"minilm": ("all-MiniLM-L6-v2 sentence embedder (real weights; 6 layers, hidden 384)", minilm),
          "bert-base": ("BERT-base (BertConfig() defaults, random weights; 12 layers, hidden 768)", bert_base)}


def main_tensor(out: Any) -> Any:
    """The output compared: the embedding, or BERT's ``last_hidden_state``."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


# --------------------------------------------------------------------------------------------
# Candidates: name -> how to compile one on the device


def candidates(device: str) -> dict[str, Callable[[Any, tuple], Any]]:
    import torch

    import ptool

    def torch_as(dtype: Any) -> Callable[[Any, tuple], Any]:
        def build(model: Any, args: tuple) -> Any:
            cast = copy.deepcopy(model).to(device)  # moved first: the host keeps one fp32 copy only
            return ptool.compile(cast.to(dtype), "torch", args, device=device)
        return build

    chosen = {
        "torch eager fp32": lambda m, a: ptool.compile(m, "torch", a, device=device),
        "torch eager fp16": torch_as(torch.float16),
        "torch eager bf16": torch_as(torch.bfloat16),
        "torch.compile fp32": lambda m, a: ptool.compile(m, "torch", a, device=device, compile=True),
        "onnxruntime cuda": lambda m, a: ptool.compile(m, "onnxruntime", a, device=device),
        "tvm cuda": lambda m, a: ptool.compile(m, "tvm", a, device=device),
    }
    try:
        from ptool.backends.onnxruntime_backend import available_providers

        if "tensorrt" in available_providers():  # last: an engine build can take minutes
            chosen["onnxruntime tensorrt"] = lambda m, a: ptool.compile(m, "onnxruntime", a, device=device,
                                                                        provider="tensorrt")
    except ImportError:
        pass
    return chosen


# --------------------------------------------------------------------------------------------
# Running one candidate, guarded


def guarded(fn: Callable[[], Any], seconds: float) -> Any:
    """``fn()`` in a daemon thread; TimeoutError if it is not done in ``seconds`` (it keeps running:
    native code cannot be interrupted)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"not done after {seconds:.0f} s (left running in the background)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def one_line(err: BaseException) -> str:
    from ptool.errors import first_line

    return f"{type(err).__name__}: {first_line(err, 240)}"


def build_and_check(build: Callable, model: Any, args: tuple, fidelity_calls: list[tuple],
                    references: list[Any]) -> tuple[Any, dict[str, Any]]:
    """Compile, and compare with eager fp32 on ``fidelity_calls``: ``(compiled, row)``."""
    import torch

    from ptool.verify import compare

    t0 = time.perf_counter()
    fn = build(model, args)
    build_s = time.perf_counter() - t0
    with torch.no_grad():
        outs = [main_tensor(fn(*call)) for call in fidelity_calls]
    fid = compare([main_tensor(r) for r in references], outs)
    return fn, {"status": "ok", "build_s": round(build_s, 1), "cosine": fid.cosine,
                "max_abs_error": fid.max_abs_error, "out_dtype": str(outs[0].dtype).removeprefix("torch.")}


def time_candidate(fn: Callable, args: tuple, repeat: int, seconds: float) -> Any:
    """The :class:`~ptool.benchmark.Timing` of ``fn(*args)``, synchronized, in the calling (main)
    thread: a worker thread's OpenMP settings differ and made host-side work twice as slow."""
    import torch

    from ptool.benchmark import measure

    def call() -> Any:
        out = fn(*args)
        torch.cuda.synchronize()  # the work, not its launch
        return out

    with torch.no_grad():
        for _ in range(WARMUP):
            call()
        one = measure(call, warmup=0, repeat=1).median_ms / 1e3
        return measure(call, warmup=0, repeat=max(5, min(repeat, int(seconds / max(one, 1e-6)))))


def eager_outputs(build: Callable, model: Any, args: tuple, calls: list[tuple]) -> list[Any]:
    import torch

    fn = build(model, args)
    with torch.no_grad():
        return [fn(*call) for call in calls]


def bench_model(key: str, device: str, a: argparse.Namespace, deadline: float, stuck: list[str]) -> dict:
    import torch

    title, make = MODELS[key]
    model, args, fidelity_host = make()
    gpu = torch.device(device)
    args = tuple(t.to(gpu) for t in args)
    fidelity_calls = [tuple(t.to(gpu) for t in call) for call in fidelity_host]
    rows: dict[str, dict[str, Any]] = {}
    builds = candidates(device)
    try:  # the outputs every row is compared with
        references = guarded(lambda: eager_outputs(builds["torch eager fp32"], model, args, fidelity_calls),
                             min(a.timeout, max(1.0, deadline - time.perf_counter())))
    except Exception as e:
        reason = f"eager fp32 on {device}, the reference, failed: {one_line(e)}"
        return {"title": title, "rows": {name: {"status": "failed", "reason": reason} for name in builds}}
    for name, build in builds.items():
        if time.perf_counter() > deadline:
            rows[name] = {"status": "not run", "reason": f"the run's budget ({a.budget:.0f} s) was spent"}
            continue
        log(f"{key}: {name} ...")
        try:
            fn, row = guarded(lambda: build_and_check(build, model, args, fidelity_calls, references),
                              min(a.timeout, max(1.0, deadline - time.perf_counter())))
            row["timing"] = time_candidate(fn, args, a.repeat, a.seconds)
            del fn
        except TimeoutError as e:
            row = {"status": "timeout", "reason": str(e)}
            stuck.append(f"{key} / {name}")
        except Exception as e:  # any failure is this candidate's row; the run goes on
            row = {"status": "failed", "reason": one_line(e)}
        if stuck and row["status"] == "ok":
            row["note"] = f"measured while {', '.join(stuck)} was still building"
        rows[name] = row
        summary = f"{row['timing'].median_ms:.2f} ms" if row["status"] == "ok" else row["reason"]
        log(f"{key}: {name}: {row['status']} {summary}")
        gc.collect()
        torch.cuda.empty_cache()
    return {"title": title, "rows": rows}


# --------------------------------------------------------------------------------------------
# Report


def markdown(fingerprint: Any, results: dict, elapsed_s: float) -> str:
    lines = ["## GPU backends (`tools/bench_gpu.py`)", "",
             f"Device: {fingerprint}. Batch 1, seq 128, inputs on the GPU, every candidate compiled by "
             "`ptool.compile(..., device=\"cuda\")`; median of synchronized calls (`torch.cuda.synchronize()` "
             "inside the timed call). Speedup = torch eager fp32 median / candidate median; cosine of the "
             f"output vs eager fp32. Whole run {elapsed_s:.0f} s.", "",
             "| model | candidate | status | median ms | p10 ms | p90 ms | runs | speedup | cosine | build s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for key, r in results.items():
        base = r["rows"].get("torch eager fp32", {}).get("timing")
        for name, row in r["rows"].items():
            if row["status"] != "ok":
                lines.append(f"| {key} | {name} | {row['status']} | | | | | | | |")
                notes.append(f"- {key} / {name}: {row['reason']}")
                continue
            t = row["timing"]
            speedup = f"{base.median_ms / t.median_ms:.2f}x" if base else ""
            lines.append(f"| {key} | {name} | ok | {t.median_ms:.3f} | {t.p10_ms:.3f} | {t.p90_ms:.3f} | {t.runs} | "
                         f"{speedup} | {row['cosine']:.6f} | {row['build_s']:.1f} |")
            if "note" in row:
                notes.append(f"- {key} / {name}: {row['note']}")
    fast = ", ".join(f"{f} {'yes' if ok else 'no'} ({why})" for f, (ok, why) in
                     ((f, fingerprint.supports(f)) for f in ("bf16", "fp16", "int8")))
    lines += ["", f"Reduced precision on this GPU: {fast}."]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines)


def json_rows(results: dict) -> dict:
    out = {}
    for key, r in results.items():
        out[key] = {"title": r["title"], "rows": {
            name: {**{k: v for k, v in row.items() if k != "timing"},
                   **({"timing": row["timing"].to_dict()} if "timing" in row else {})}
            for name, row in r["rows"].items()}}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["minilm", "bert-base"])
    p.add_argument("--device", default="cuda", help="cuda or cuda:N")
    p.add_argument("--repeat", type=int, default=50, help="timed calls per candidate at most")
    p.add_argument("--seconds", type=float, default=3.0, help="timing seconds per candidate at most")
    p.add_argument("--timeout", type=float, default=100.0, help="seconds per candidate (build, check, timing)")
    p.add_argument("--budget", type=float, default=270.0, help="seconds for the whole run; later candidates are skipped")
    p.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    a = p.parse_args()
    started = time.perf_counter()

    reason = no_gpu_reason(a.device)
    if reason is not None:
        print(f"no CUDA device: {reason}", file=sys.stderr)
        return 2

    from _sections import write_section

    from ptool.tune.fingerprint import device_fingerprint

    fingerprint = device_fingerprint(a.device)
    print(f"fingerprint: {fingerprint}", flush=True)
    for feature in ("bf16", "fp16", "int8"):
        ok, why = fingerprint.supports(feature)
        print(f"  {feature}: {'yes' if ok else 'no'} - {why}", flush=True)
    deadline = started + a.budget
    stuck: list[str] = []
    results = {key: bench_model(key, a.device, a, deadline, stuck) for key in a.models}
    md = markdown(fingerprint, results, time.perf_counter() - started)
    data = {"fingerprint": fingerprint.to_dict(), "models": json_rows(results)}
    print(md if a.no_write else write_section(KEY, md, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
