"""Measure what ``ptool tune --ray`` costs per candidate vs the local search, and feed the cluster simulation.

    PYTHONPATH=. python tools/bench_cluster.py            # writes the ``cluster`` section of BENCHMARKS.md

On one machine: a local Ray cluster (a head with no CPU, one timing node with one CPU, 100 MB object
stores), and the same search (the ``tests/tune`` MLP: torch eager + 5 ONNX Runtime variants, one
approximate pass excluded by its fidelity check) run three ways, each twice (the second run is the
warm one: Ray's worker processes have imported torch):

* local: ``ptool.autotune`` in this process;
* ray: ``ptool.autotune(..., cluster=address)``, every candidate a task on the one timing node:
  (ray - local) / candidates is the overhead per candidate of going through Ray;
* the per-unit costs the simulation needs: build + fidelity per candidate (the rows' ``build_s``),
  timing per candidate (runs x median + warm-up), an empty Ray task's round trip, the driver's
  record write as a function of the rows in the record.

``tools/simulate_cluster.py`` turns these into wall time and cost for 1..1000 nodes and
10..100000 candidates; this tool runs it and writes both tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

STORE = 100 * 2**20


def search_kwargs() -> tuple:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16)).eval()
    x = torch.randn(4, 64)
    held = [(torch.randn(4, 64, generator=torch.Generator().manual_seed(s)),) for s in (1, 2)]
    kw = dict(backends=["torch", "onnxruntime"], passes=["quantize"], max_error=1e-7, held_out_inputs=held,
              repeat=10, progress=False, force=True,
              variants={"torch": [{}], "onnxruntime": [{}, {"intra_op_threads": 1}, {"intra_op_threads": 2},
                                                       {"graph_optimization_level": "basic"},
                                                       {"graph_optimization_level": "extended"}]})
    return model, (x,), kw


def timed_search(cluster: str | None, folder: str) -> tuple[float, list]:
    import ptool

    model, args, kw = search_kwargs()
    t0 = time.perf_counter()
    result = ptool.autotune(model, args, cluster=cluster, record_dir=folder, **kw)
    return time.perf_counter() - t0, list(result.table)


def record_write_ms(rows: int, template: dict) -> float:
    """Median ms to write a record holding ``rows`` rows (what the driver does after every result)."""
    from ptool.tune.record import write_json

    payload = {"format": 1, "rows": [dict(template, label=f"row {i}") for i in range(rows)]}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tuning_record.json"
        times = []
        for _ in range(5 if rows <= 1000 else 2):
            t0 = time.perf_counter()
            write_json(path, payload)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    a = p.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    import ray
    from ray.cluster_utils import Cluster

    from ptool.tune.cluster import node_resources

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE,
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources=node_resources("cpu"), object_store_memory=STORE)
    start_s = time.perf_counter() - t0
    runs: dict[str, list[float]] = {"local": [], "ray": []}
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)

        @ray.remote(num_cpus=1)
        def empty() -> None:
            return None

        ray.get(empty.remote())
        trips = []
        for _ in range(30):
            t1 = time.perf_counter()
            ray.get(empty.remote())
            trips.append((time.perf_counter() - t1) * 1e3)
        with tempfile.TemporaryDirectory() as d:
            for _ in range(2):  # cold, then warm; local and ray alternate so both see the same noise
                for how in ("local", "ray"):
                    seconds, table = timed_search(cluster.address if how == "ray" else None, f"{d}/{how}")
                    runs[how].append(seconds)
                    if how == "local":
                        local_table = table
    finally:
        ray.shutdown()
        cluster.shutdown()
    measured = [r for r in local_table if r.build_s is not None]
    candidates = len(measured) + sum(r.label.endswith("(any backend)") for r in local_table)
    build_s = statistics.median(r.build_s for r in measured)
    timing_s = statistics.median((r.runs + 3) * r.median_ms / 1e3 for r in measured)  # 1 + 2 warm-up calls
    template = measured[0].to_dict()
    writes = {n: record_write_ms(n, template) for n in (10, 100, 1000, 10000)}
    data = {
        "candidates": candidates,
        "cluster_start_s": round(start_s, 1),
        "local_s": [round(x, 2) for x in runs["local"]],
        "ray_s": [round(x, 2) for x in runs["ray"]],
        "overhead_per_candidate_s": {
            "cold": round((runs["ray"][0] - runs["local"][0]) / candidates, 3),
            "warm": round((runs["ray"][1] - runs["local"][1]) / candidates, 3),
        },
        "empty_task_ms": round(statistics.median(trips), 2),
        "build_fidelity_s": round(build_s, 3),
        "timing_s": round(timing_s, 4),
        "record_write_ms": {str(k): round(v, 2) for k, v in writes.items()},
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    import simulate_cluster

    sim = simulate_cluster.simulate(simulate_cluster.Costs.from_bench(data))
    md = render(data) + "\n\n" + simulate_cluster.render(sim)
    print(md)
    if not a.no_write:
        from _sections import write_section

        write_section("cluster", md, {**data, "simulation": sim})
    return 0


def render(d: dict) -> str:
    oh = d["overhead_per_candidate_s"]
    w = d["record_write_ms"]
    return "\n".join([
        "### Tuning on a Ray cluster: overhead per candidate (`tools/bench_cluster.py`)",
        "",
        f"The same search ({d['candidates']} candidates: torch eager + 5 ONNX Runtime variants of the test MLP, "
        "one approximate pass excluded by its fidelity check) in this process and through a local Ray "
        "cluster with one timing node (head without CPU + 1 worker node, 100 MB object stores); cold = "
        "first run (Ray's worker process imports torch), warm = second run. Wall seconds of the whole "
        f"`autotune` call; cluster start ({d['cluster_start_s']} s) not included. 1-minute load "
        f"{d['load_before']} before, {d['load_after']} after (2 cores shared with other jobs: read the "
        "ratios, not the absolute seconds).",
        "",
        "| run | local s | Ray s | Ray - local per candidate s |",
        "|---|---:|---:|---:|",
        f"| cold | {d['local_s'][0]:.1f} | {d['ray_s'][0]:.1f} | {oh['cold']:.2f} |",
        f"| warm | {d['local_s'][1]:.1f} | {d['ray_s'][1]:.1f} | {oh['warm']:.2f} |",
        "",
        f"Per unit, for the simulation: an empty Ray task's round trip {d['empty_task_ms']:.1f} ms (median of 30); "
        f"build + fidelity per candidate {d['build_fidelity_s']:.2f} s, timing {d['timing_s'] * 1e3:.1f} ms "
        f"(medians over the rows); the driver's record write after each result "
        f"{w['10']:.1f} / {w['100']:.1f} / {w['1000']:.1f} / {w['10000']:.0f} ms at 10 / 100 / 1,000 / 10,000 rows.",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
