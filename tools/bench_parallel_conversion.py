"""Measure data-parallel attention conversion: torchrun with 2 processes against 1 process, on all-MiniLM-L6-v2.

    PYTHONPATH=. python tools/bench_parallel_conversion.py     # writes the ``parallel-conversion`` section

Runs ``tools/convert_parallel.py`` (hedgehog, attention transfer then distillation, same pass spec,
seed and calibration data) once in one process and once under ``torchrun --nproc-per-node 2``, and
reports the largest difference between the two runs' trained kernel weights, how far training moved
them (the scale the difference is small against), the losses, and both wall times: of the
``transform`` call, and of the whole command (interpreter, imports, process group, capture).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

TOOL = ROOT / "tools" / "convert_parallel.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(processes: int, out: Path, args: list[str], threads: int | None = None) -> tuple[dict, float, float]:
    """One conversion: the saved result, the command's wall seconds and its CPU seconds (all its
    processes: robust to a machine that pauses or starves the run, which wall time is not)."""
    import torch

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PTOOL_CHECKPOINT_DIR": "off",
           **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    launch = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                                        "--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    start, cpu = time.perf_counter(), _cpu_of_children()
    subprocess.run([sys.executable, *launch, str(TOOL), "-o", str(out), *args], env=env, cwd=ROOT, check=True)
    return torch.load(out), time.perf_counter() - start, _cpu_of_children() - cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transfer-steps", type=int, default=8)
    p.add_argument("--distill-steps", type=int, default=8)
    p.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    a = p.parse_args()
    import torch

    args = ["--model", "minilm", "--rows", "8", "--seq", "64", "--batches", "4", "--distill-batch", "2",
            "--transfer-steps", str(a.transfer_steps), "--distill-steps", str(a.distill_steps)]
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        one, one_wall, one_cpu = run(1, Path(d) / "one.pt", args)
        two, two_wall, two_cpu = run(2, Path(d) / "two.pt", args)
        # one process on one thread: the rounding floor (vs several threads) and the fair time on a busy machine
        single, single_wall, single_cpu = run(1, Path(d) / "single.pt", args, threads=1)

    def diff(a: dict, b: dict) -> float:
        return max(float((w - b["weights"][k]).abs().max()) for k, w in a["weights"].items())

    moved = max(float((w - torch.eye(w.shape[-2], w.shape[-1])).abs().max()) for w in one["weights"].values())
    data = {"transfer_steps": a.transfer_steps, "distill_steps": a.distill_steps, "rows": 8, "seq": 64,
            "batches": 4, "distill_batch": 2, "max_abs_weight_diff": diff(one, two),
            "threads_weight_diff": diff(one, single), "max_weight_moved": moved,
            "tensors": len(one["weights"]), "parameters": sum(w.numel() for w in one["weights"].values()),
            "load_before": load0, "load_after": os.getloadavg()[0], "threads": torch.get_num_threads(),
            "runs": {str(n): {"transform_s": r["seconds"], "wall_s": wall, "cpu_s": cpu, "notes": r["notes"]}
                     for n, (r, wall, cpu) in {"1": (one, one_wall, one_cpu), "1x1": (single, single_wall, single_cpu),
                                               "2": (two, two_wall, two_cpu)}.items()}}
    md = render(data)
    print(md)
    if not a.no_write:
        from _sections import write_section

        write_section("parallel-conversion", md, data)
    return 0


def render(d: dict) -> str:
    runs = [d["runs"][k] for k in ("1", "1x1", "2")]
    rows = [("`transform` wall s", [r["transform_s"] for r in runs], ".1f"),
            ("whole command wall s", [r["wall_s"] for r in runs], ".1f"),
            ("whole command CPU s (all processes)", [r["cpu_s"] for r in runs], ".1f"),
            ("last transfer loss", [r["notes"]["transfer_last_loss"] for r in runs], ".6g"),
            ("distillation MSE after", [r["notes"]["distill_mse_after"] for r in runs], ".6g")]
    spec = (f"linear-attention:feature_map=hedgehog,transfer_steps={d['transfer_steps']},"
            f"distill_steps={d['distill_steps']},distill_batch={d['distill_batch']}")
    return "\n".join([
        "### Data-parallel conversion: torchrun 2 processes vs 1 (`tools/bench_parallel_conversion.py`)",
        "",
        f"Hedgehog conversion of all-MiniLM-L6-v2 (`{spec}`; {d['batches']} calibration batches of {d['rows']} x "
        f"{d['seq']} tokens of the Python manual), same seed and effective batch: one process, then `torchrun "
        "--nproc-per-node 2` (each transfer step's rows and each distillation step's calls split across the "
        f"processes, gradients summed before every Adam step). {d['parameters']:,} trained parameters in "
        f"{d['tensors']} tensors.",
        "",
        f"| | 1 process ({d['threads']} threads) | 1 process (1 thread) | 2 processes (1 thread each) |",
        "|---|---:|---:|---:|",
        *(f"| {label} | " + " | ".join(f"{v:{fmt}}" for v in values) + " |" for label, values, fmt in rows),
        "",
        f"Largest difference of the trained weights, 2 processes vs 1 process on {d['threads']} threads: "
        f"**{d['max_abs_weight_diff']:.2g}** (training moved them by up to {d['max_weight_moved']:.3g}); 1 process on "
        f"1 thread vs on {d['threads']} threads: {d['threads_weight_diff']:.2g}. Both are float rounding (a split "
        "batch, or another thread count, sums in another order), which Adam's first steps amplify in weights "
        "whose gradient is near 0 (its update there is g / (|g| + 1e-8)). "
        f"1-minute load {d['load_before']:.2f} before, "
        f"{d['load_after']:.2f} after: the machine (2 cores) was shared with other jobs, which also paused "
        "this run at times, so the wall seconds are noisy (the CPU seconds less so); the weight difference is not.",
    ])


if __name__ == "__main__":
    sys.exit(main())
