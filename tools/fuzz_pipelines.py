"""Nightly fuzz: ``tests/passes/test_fuzz_pipelines.py`` with many more examples, random seed, a summary.

Runs pytest on that file with the environment its tests read (``PTOOL_FUZZ_EXAMPLES``,
``PTOOL_FUZZ_SEED``, ``PTOOL_FUZZ_MODELS``, ``PTOOL_FUZZ_LOG``), then prints, from the log of every
pass run in a pipeline: per pass the runs, how many rewrote something, how often it was inside its
declared bound where it claims it and elsewhere, its worst cosine, and the errors seen. Hypothesis
prints any failing example with the spec of every pass and a ``@reproduce_failure`` blob.

    .venv/bin/python tools/fuzz_pipelines.py [--examples 2000] [--seed S] [--workers 2]
        [--models resnet,repvgg,bert,llama,vit,gpt2,mobilenet_v2] [-k test_pipeline_fuzz]

The exit code is pytest's. A pipeline example takes about 0.3 s of wall time on 2 cores (80 per
model with six models: under 3 minutes), so ``--examples 2000`` is a few hours.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST = "tests/passes/test_fuzz_pipelines.py"


def summarize(log: pathlib.Path) -> str:
    """A table of the pass runs logged by the pipeline tests."""
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    runs = [r for r in rows if "pass" in r]
    by_pass: dict[str, list[dict]] = collections.defaultdict(list)
    for r in runs:
        by_pass[r["pass"]].append(r)
    header = ("pass", "runs", "rewrote", "claimed in bound", "other in bound", "worst cosine")
    lines = ["{:<20} {:>5} {:>7} {:>17} {:>15} {:>12}".format(*header)]
    for name in sorted(by_pass):
        rs = by_pass[name]
        claimed = [r for r in rs if r["claimed"]]
        other = [r for r in rs if not r["claimed"]]
        lines.append(
            f"{name:<20} {len(rs):>5} {sum(r['rewritten'] > 0 for r in rs):>7} "
            f"{sum(r['within_contract'] for r in claimed):>8}/{len(claimed):<8} "
            f"{sum(r['within_contract'] for r in other):>7}/{len(other):<7} {min(r['cosine'] for r in rs):>12.4f}"
        )
    errors = collections.Counter(r["error"].split(" (")[0] + ("" if r.get("expected") else "  <- unexpected")
                                 for r in rows if "error" in r)
    if errors:
        lines.append("\nerrors (pipelines stopped by a ptool error):")
        lines += [f"  {n:>4} x {e}" for e, n in errors.most_common()]
    pipelines = len({(r["model"], tuple(r["pipeline"])) for r in rows})
    lines.append(f"\n{pipelines} distinct pipelines, {len(runs)} pass runs")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="examples per hypothesis test (and per model)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: a fresh one, printed)")
    parser.add_argument("--models", default="resnet,repvgg,bert,llama,vit,gpt2,mobilenet_v2",
                        help="fixtures: tests.models.zoo names, or repvgg")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers")
    parser.add_argument("-k", dest="select", default="", help="pytest -k expression (e.g. 'test_pipeline_fuzz')")
    args = parser.parse_args()

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    with tempfile.TemporaryDirectory() as tmp:
        log = pathlib.Path(tmp) / "runs.jsonl"
        env = {**os.environ, "PTOOL_FUZZ_EXAMPLES": str(args.examples), "PTOOL_FUZZ_SEED": str(seed),
               "PTOOL_FUZZ_MODELS": args.models, "PTOOL_FUZZ_LOG": str(log)}
        cmd = [sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
               *(["-n", str(args.workers)] if args.workers > 1 else []), *(["-k", args.select] if args.select else [])]
        print(f"seed {seed}: {' '.join(cmd)}", flush=True)
        code = subprocess.call(cmd, cwd=ROOT, env=env)
        print(summarize(log))
    print(f"\nseed {seed}; rerun: .venv/bin/python tools/fuzz_pipelines.py --examples {args.examples} --seed {seed} "
          f"--models {args.models}")
    return code


if __name__ == "__main__":
    sys.exit(main())
