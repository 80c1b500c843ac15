"""Plan a tuning search past this machine: wall time and cost on 1..1000 nodes for 10..100000 candidates.

    python tools/simulate_cluster.py                       # from the measured costs in BENCHMARKS.json["cluster"]
    python tools/simulate_cluster.py --build 30 --timing 2 --price 3.0   # your model, your nodes

A search is three pipelines running side by side; the slowest bounds the wall time:

* **nodes**: each candidate costs ``build + fidelity`` (transform, compile, held-out check),
  ``timing`` and Ray's ``overhead`` per candidate, on one timing node at a time; ``n`` nodes take
  ``ceil(N / n)`` candidates each (``N`` candidates);
* **driver**: one process receives every result (``dispatch`` each) and rewrites the tuning record
  as results arrive; a write grows with the rows already in it (``write(i) = a + c * i``, fitted to
  the measured writes), so rewriting after every result would cost ``c * N^2 / 2`` (quadratic: the
  ``per-result writes`` figure). ptool skips a rewrite while the last one is more recent than
  ``PARTIAL_WRITE_RATIO`` (10) times its duration, so writes take at most about a tenth of the
  driver's time: ``N * dispatch / 0.9 + write(N)``;
* **tracker**: with TVM MetaSchedule over RPC, every trial of a tuned candidate is one request
  through the tracker, which serves them one at a time: ``N * trials * tracker_ms``.

Cost = nodes x wall hours x price per node-hour. Figures are a model, not a measurement: they say
where the bottleneck moves (nodes -> driver -> tracker) and roughly when.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NODES = (1, 10, 100, 1000)
CANDIDATES = (10, 100, 1000, 10000, 100000)


@dataclass(frozen=True)
class Costs:
    """Seconds per candidate and per result; the defaults are this machine's measured ones (2 cores)."""

    build: float = 3.0         # transform + compile + fidelity check, s per candidate
    timing: float = 0.05       # timed calls (+ warm-up), s per candidate
    overhead: float = 1.0      # Ray's extra per candidate (task, job deserialization, run-off rebuilds), s
    dispatch_ms: float = 1.0   # the driver's handling of one result besides the record write, ms
    write_a_ms: float = 0.5    # record write: fixed part, ms
    write_c_ms: float = 0.005  # record write: per row already in the record, ms
    trials: int = 0            # MetaSchedule trials per candidate measured through the tracker
    tracker_ms: float = 5.0    # the tracker's time per request (assumed; served one at a time)
    price: float = 0.10        # $ per node-hour (a 2-core cloud VM)

    @classmethod
    def from_bench(cls, d: dict, **override) -> Costs:
        """From ``tools/bench_cluster.py``'s measurements (BENCHMARKS.json["cluster"])."""
        w = {int(k): v for k, v in d["record_write_ms"].items()}
        lo, hi = min(w), max(w)
        c = max(0.0, (w[hi] - w[lo]) / (hi - lo))
        a = max(0.0, w[lo] - c * lo)
        values = dict(build=d["build_fidelity_s"], timing=d["timing_s"],
                      overhead=max(0.0, d["overhead_per_candidate_s"]["warm"]),
                      dispatch_ms=d["empty_task_ms"], write_a_ms=a, write_c_ms=c)
        return cls(**{**values, **override})


def wall(costs: Costs, nodes: int, candidates: int) -> dict:
    """Wall seconds of each pipeline, the bottleneck, the wall time and the cost."""
    per = costs.build + costs.timing + costs.overhead
    final_write = costs.write_a_ms + costs.write_c_ms * candidates
    parts = {
        "nodes": math.ceil(candidates / nodes) * per,
        "driver": (candidates * costs.dispatch_ms / 0.9 + final_write) / 1e3,
        "tracker": candidates * costs.trials * costs.tracker_ms / 1e3,
    }
    every_result = (candidates * (costs.dispatch_ms + costs.write_a_ms)
                    + costs.write_c_ms * candidates * (candidates + 1) / 2) / 1e3
    bottleneck = max(parts, key=parts.get)
    seconds = parts[bottleneck]
    return {**{k: round(v, 1) for k, v in parts.items()}, "per_result_writes_s": round(every_result, 1),
            "bottleneck": bottleneck, "wall_s": round(seconds, 1),
            "cost": round(nodes * seconds / 3600 * costs.price, 2)}


def simulate(costs: Costs) -> dict:
    return {"costs": asdict(costs), "grid": {f"{n}x{c}": wall(costs, n, c) for c in CANDIDATES for n in NODES}}


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"


def render(sim: dict) -> str:
    c = sim["costs"]
    lines = [
        "### Tuning past one machine: simulated wall time and cost (`tools/simulate_cluster.py`)",
        "",
        f"From the costs above: build + fidelity {c['build']:.2f} s, timing {c['timing']:.3f} s, Ray overhead "
        f"{c['overhead']:.2f} s per candidate; driver {c['dispatch_ms']:.1f} ms per result + record write "
        f"{c['write_a_ms']:.2f} ms + {c['write_c_ms'] * 1e3:.2f} us per row already in it; tracker "
        f"{c['tracker_ms']:.0f} ms per request (assumed) x {c['trials']} trials; ${c['price']:.2f} per node-hour. "
        "Each cell: wall time, cost, and the bottleneck when it is not the nodes. The driver's record "
        "writes are throttled to a tenth of its time; rewriting after every result instead would take "
        + ", ".join(f"{_duration(sim['grid'][f'1x{n}']['per_result_writes_s'])} at {n:,}" for n in CANDIDATES[2:])
        + " candidates (quadratic).",
        "",
        "| candidates | " + " | ".join(f"{n} node{'s' if n > 1 else ''}" for n in NODES) + " |",
        "|---:|" + "---:|" * len(NODES),
    ]
    for cand in CANDIDATES:
        cells = []
        for n in NODES:
            g = sim["grid"][f"{n}x{cand}"]
            mark = "" if g["bottleneck"] == "nodes" else f" ({g['bottleneck']})"
            cells.append(f"{_duration(g['wall_s'])}, ${g['cost']:,.2f}{mark}")
        lines.append(f"| {cand:,} | " + " | ".join(cells) + " |")
    tuned = Costs(**{**c, "trials": 64})
    lines += ["", "With TVM MetaSchedule over the RPC tracker at 64 trials per candidate "
              f"({tuned.tracker_ms:.0f} ms per request, one tracker):", "",
              "| candidates | " + " | ".join(f"{n} node{'s' if n > 1 else ''}" for n in NODES) + " |",
              "|---:|" + "---:|" * len(NODES)]
    for cand in (100, 1000, 10000):
        cells = []
        for n in NODES:
            g = wall(tuned, n, cand)
            mark = "" if g["bottleneck"] == "nodes" else f" ({g['bottleneck']})"
            cells.append(f"{_duration(g['wall_s'])}{mark}")
        lines.append(f"| {cand:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, help_ in (("build", "build + fidelity s per candidate"), ("timing", "timing s per candidate"),
                        ("overhead", "Ray overhead s per candidate"), ("tracker-ms", "tracker ms per request"),
                        ("price", "$ per node-hour")):
        p.add_argument(f"--{name}", type=float, default=None, help=help_)
    p.add_argument("--trials", type=int, default=None, help="MetaSchedule trials per candidate via the tracker")
    p.add_argument("--json", action="store_true", help="print the grid as JSON")
    a = p.parse_args()
    override = {k: v for k, v in (("build", a.build), ("timing", a.timing), ("overhead", a.overhead),
                                  ("tracker_ms", a.tracker_ms), ("price", a.price), ("trials", a.trials))
                if v is not None}
    try:
        bench = json.loads((ROOT / "BENCHMARKS.json").read_text())["cluster"]
        costs = Costs.from_bench(bench, **override)
    except (OSError, KeyError, ValueError):
        print("no measured costs in BENCHMARKS.json (run tools/bench_cluster.py); using the defaults", file=sys.stderr)
        costs = Costs(**override)
    sim = simulate(costs)
    print(json.dumps(sim, indent=1) if a.json else render(sim))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
