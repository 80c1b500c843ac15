"""Where a compiled candidate's time goes: Inductor's per-kernel CPU profile of one ptool pipeline.

Builds one model of ``tools/bench_precision.py`` (``--model minilm|bert128|bert512|vit``), runs the
pipeline (after the tuner's exact cleanup), compiles it with ``torch.compile`` and Inductor freezing
with Inductor's kernel profiling on (``cpp.enable_kernel_profile``: each generated C++ kernel records
itself to the torch profiler), and prints every kernel's self time per forward, its calls per forward
and its share, slowest first, beside the forward's median latency. Library calls (oneDNN's int8
matmul, ``aten::bmm``) appear under their op names; generated kernels under their fused ops.

This is the tool behind the precision section's analysis: which non-GEMM kernels cost what next to
the integer matmuls. A development aid, not a benchmark: the profiler adds its own overhead, so
quote latencies from ``tools/bench_precision.py``.

    .venv/bin/python tools/profile_kernels.py --model vit \\
        --passes 'quantize:activations=per-token,attention=bf16' [--calls 10] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import statistics
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import ptool  # noqa: E402
from ptool.passes.pipelines import default_pipeline  # noqa: E402


def kernel_family(name: str) -> str:
    """A generated kernel's name without its graph prefix and index (``graph_0_cpp_fused_gelu_mul_5`` -> ``gelu_mul``)."""
    return re.sub(r"_\d+$", "", re.sub(r"^graph_\d+_cpp_fused_", "", name))


def kernel_table(events, calls: int) -> list[tuple[str, float, int]]:
    """``(kernel, self ms a forward, calls a forward)`` of every kernel family, slowest first."""
    ms: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in events:
        family = kernel_family(e.key)
        ms[family] += e.self_cpu_time_total / 1e3 / calls
        count[family] += e.count
    rows = sorted(ms.items(), key=lambda kv: -kv[1])
    return [(name, t, count[name] // calls) for name, t in rows]


def main() -> int:
    import bench_precision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(bench_precision.CASES), default="minilm")
    parser.add_argument("--passes", required=True, help="the pipeline after the exact cleanup, '|'-separated")
    parser.add_argument("--calls", type=int, default=10, help="profiled forwards (default 10)")
    parser.add_argument("--top", type=int, default=25, help="kernels listed (default 25)")
    args = parser.parse_args()
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    inductor_config.cpp.enable_kernel_profile = True
    case = bench_precision.CASES[args.model]()
    specs = [*default_pipeline(), *args.passes.split("|")]
    module = ptool.transform(case.model, specs, case.args)
    run = ptool.compile(module, backend="torch", example_inputs=case.args, compile=True, freezing=True)
    with torch.no_grad():
        for _ in range(3):
            run(*case.args)
        latencies = []
        for _ in range(args.calls):
            start = time.perf_counter()
            run(*case.args)
            latencies.append((time.perf_counter() - start) * 1e3)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.calls):
                run(*case.args)
    rows = kernel_table(prof.key_averages(), args.calls)
    total = sum(t for _, t, _ in rows)
    print(f"{case.name}: {' -> '.join(specs)}; torch.compile + freezing, median {statistics.median(latencies):.2f} "
          f"ms a forward unprofiled")
    print(f"profiled: {total:.2f} ms a forward in {len(rows)} kernels and calls; the {args.top} slowest:")
    print(f"{'self ms':>8}  {'share':>6}  {'calls':>5}  kernel (per forward)")
    for name, t, n in rows[:args.top]:
        print(f"{t:8.2f}  {100 * t / total:5.1f}%  {n:5d}  {name[:120]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
