"""TVM with MetaSchedule tuning vs torch eager and untuned TVM, on all-MiniLM-L6-v2 (seq 128).

Writes the "TVM with MetaSchedule tuning" section of ``BENCHMARKS.md`` (key ``tvm_tuned``).

Protocol: the MiniLM ``BertModel`` with its real weights on one tokenized sentence padded to 128
tokens, batch 1 (as ``tools/bench_tvm.py``). Steps, in one process:

1. build with ``tune_trials=N`` into ``--tuning-dir`` (first build: MetaSchedule tunes the heavy
   kernels, ptool's schedule of each is measured as the baseline; wall time recorded);
2. build again with the same options (the database is reused: no measuring; wall time recorded);
3. time torch eager, TVM untuned (ptool's schedules) and TVM tuned round-robin, medians.

A ``--tuning-dir`` that already holds the trials skips the tuning in step 1 (say so in the table):
tune once, then time on a quiet machine.

    .venv/bin/python tools/bench_tvm_tuned.py [--trials 256] [--tuning-dir DIR] [--repeat 20]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_tvm import hidden, log, minilm  # noqa: E402

KEY = "tvm_tuned"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=256, help="MetaSchedule trials in all")
    p.add_argument("--tuning-dir", default=str(ROOT / ".tvm-tuning" / "minilm"),
                   help="database folder (kept between runs)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    a = p.parse_args()

    import torch

    from _sections import write_section
    from ptool.backends import compile_module
    from ptool.benchmark import measure_interleaved
    from ptool.verify import compare

    load0 = os.getloadavg()[0]
    model, args = minilm()
    with torch.no_grad():
        ref = hidden(model(*args))
    tuned_opts = {"tune_trials": a.trials, "tuning_dir": a.tuning_dir}
    t0 = time.perf_counter()
    untuned = compile_module(model, "tvm", args)
    t_untuned = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = compile_module(model, "tvm", args, **tuned_opts)
    t_first = time.perf_counter() - t0
    log(f"first tuned build: {t_first:.1f} s ({first.info.get('tuning_seconds')} s tuning)")
    t0 = time.perf_counter()
    tuned = compile_module(model, "tvm", args, **tuned_opts)
    t_second = time.perf_counter() - t0
    log(f"second tuned build: {t_second:.1f} s (reused: {tuned.info.get('tuning_reused')})")
    candidates = {"torch eager": model, "TVM untuned (ptool schedules)": untuned,
                  f"TVM + MetaSchedule ({a.trials} trials)": tuned}
    with torch.no_grad():
        fidelity = {name: compare(ref, hidden(fn(*args))) for name, fn in candidates.items()}
        timings = measure_interleaved(candidates, args, warmup=3, repeat=a.repeat, settle=1)
    load1 = os.getloadavg()[0]

    info = first.info
    base = timings["torch eager"].median_ms
    lines = ["## TVM with MetaSchedule tuning (`tools/bench_tvm_tuned.py`)", "",
             f"all-MiniLM-L6-v2 (real weights), batch 1, seq 128, TVM 0.27 built for the host CPU. "
             f"MetaSchedule tunes the {info.get('tuned_kernels')} heavy kernels (matmul, batched matmul, "
             f"softmax, layer norm, GEMV) with {a.trials} trials in all; per kernel, the faster in the model of "
             "MetaSchedule's best and ptool's own schedule is kept. TVM runs one thread per core. Candidates "
             "timed round-robin in one run, each timed call after one untimed call of the same candidate; "
             "ratio = median / torch "
             f"eager median. Load average at start/end: {load0:.2f} / {load1:.2f}.", "",
             "| build | wall s |", "|---|---:|",
             f"| untuned (ptool schedules) | {t_untuned:.1f} |",
             (f"| MetaSchedule tuning when the database was made (earlier run) | {info['tuned_with_seconds']:.1f} |"
              if info.get("tuning_reused") else f"| first tuned build (tuning {info['tuning_seconds']:.1f} s) | {t_first:.1f} |"),
             *([f"| first tuned build of this run (database already there) | {t_first:.1f} |"]
               if info.get("tuning_reused") else []),
             f"| second tuned build (database reused) | {t_second:.1f} |", "",
             "| candidate | median ms | p10 ms | p90 ms | x torch eager | max abs err |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, t in timings.items():
        lines.append(f"| {name} | {t.median_ms:.2f} | {t.p10_ms:.2f} | {t.p90_ms:.2f} | "
                     f"{t.median_ms / base:.2f} | {fidelity[name].max_abs_error:.1e} |")
    kernels = info.get("kernels", [])
    if kernels:
        lines += ["", "Per kernel: timed alone by MetaSchedule's runner while tuning (µs per call) and inside the "
                  "model (VM instrument, ms per forward, all its calls); the model's timing decides which is kept:",
                  "", "| kernel | calls per forward | ptool alone µs | MetaSchedule alone µs | ptool in model ms "
                  "| MetaSchedule in model ms | kept |", "|---|---:|---:|---:|---:|---:|---|"]
        for k in kernels:
            fmt = lambda v, d: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
            lines.append(f"| `{k['kernel']}` | {k['calls']} | {fmt(k['ptool_us'], 1)} | {fmt(k['metaschedule_us'], 1)} "
                         f"| {fmt(k.get('ptool_model_ms'), 3)} | {fmt(k.get('metaschedule_model_ms'), 3)} "
                         f"| {k['chosen']} |")
    md = "\n".join(lines)
    data = {"trials": a.trials, "build_seconds": {"untuned": t_untuned, "first": t_first, "second": t_second},
            "tuning": {k: v for k, v in info.items() if "tun" in k or k == "kernels"},
            "timings": {n: t.to_dict() for n, t in timings.items()}}
    print(md if a.no_write else write_section(KEY, md, data))


if __name__ == "__main__":
    main()
