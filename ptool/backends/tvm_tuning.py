"""MetaSchedule tuning of the heavy kernels, with ptool's own schedule as the baseline to beat.

TVM's stock tuning pipeline (``static_shape_tuning_pipeline``) tunes every fused kernel, reshapes
and gathers included, and drops ptool's schedules for the build. Here:

1. The model is legalized and fused exactly as the untuned build does it, and MetaSchedule's
   tasks are extracted from it (``relax_integration.extract_tasks``).
2. Only the kernels ptool's :class:`~ptool.backends.tvm_schedules.MatmulRule` takes (matmul,
   dense, batched matmul, conv2d with their fused epilogues: nearly all the time of a
   transformer) are tuned, the trial budget split evenly between them.
3. ptool's schedule for each of those kernels is measured with the same builder and runner and
   committed to the database as one more record, so applying the database picks, per kernel,
   whichever is faster: a tuned build is never slower than the untuned one kernel by kernel.
4. The build applies the database, then ptool's rules schedule everything it does not cover.

The database (MetaSchedule's JSON files) lives in a folder keyed by the module and the target; a
marker there records the trials spent, so a second build with no more trials reuses it without
measuring anything.

Measured here: MetaSchedule's default build function imports ``tvm.s_tir.tensor_intrin`` in
every builder worker, and the builder starts fresh workers for every batch; that import alone
takes 45-50 s on this machine, longer than the builder's default 30 s timeout, so every candidate
failed as a "build error". ptool builds with :func:`build_candidate` (the same build, without
registering tensor intrinsics fp32 kernels never use) and a longer timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILDER_TIMEOUT_S = 600.0
RUNNER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class KernelTuning:
    """One tuned kernel: MetaSchedule's best against ptool's schedule (microseconds)."""

    name: str
    weight: int
    ptool_us: float | None
    tuned_us: float | None

    @property
    def winner(self) -> str:
        if self.tuned_us is None:
            return "ptool"
        if self.ptool_us is None:
            return "metaschedule"
        return "metaschedule" if self.tuned_us < self.ptool_us else "ptool"

    def as_dict(self) -> dict[str, Any]:
        return {"kernel": self.name, "calls": self.weight, "ptool_us": self.ptool_us,
                "metaschedule_us": self.tuned_us, "chosen": self.winner}


def database_dir(mod: Any, target: Any, tuning_dir: str | None) -> tuple[Path, str]:
    """The database folder for ``mod`` on ``target`` and the module's key."""
    from tvm_ffi import structural_hash  # tvm.ir.structural_hash moved here in 0.27

    key = hashlib.blake2b(f"{structural_hash(mod)}|{target}".encode(), digest_size=8).hexdigest()
    root = Path(tuning_dir) if tuning_dir else Path.home() / ".cache" / "ptool" / "tvm-tuning" / key
    return root, key


def tune(legalized: Any, target: Any, trials: int, work_dir: Path, key: str,
         progress: bool = True) -> dict[str, Any]:
    """Tune ``legalized``'s heavy kernels into ``work_dir`` (or reuse it); facts for the report.

    ``trials`` is the total budget; a database already holding that many trials for this module
    (``key``) is reused as it is.
    """
    from tvm.s_tir import meta_schedule as ms

    work_dir.mkdir(parents=True, exist_ok=True)
    marker = work_dir / f"ptool_trials_{key}.txt"  # per module: a shared folder never passes one
    # model's database off as another's
    done = int(marker.read_text()) if marker.is_file() and marker.read_text().strip().isdigit() else 0
    tasks = _heavy_tasks(legalized, target)
    facts: dict[str, Any] = {"tune_trials": trials, "tuning_dir": str(work_dir), "tuned_kernels": len(tasks)}
    summary = work_dir / f"ptool_kernels_{key}.json"
    if done >= trials or not tasks:
        facts.update(tuning_reused=True, tuning_seconds=0.0)
        if summary.is_file():  # what the tuning run that made the database measured
            made = json.loads(summary.read_text())
            facts.update(kernels=made["kernels"], tuned_with_seconds=made["tuning_seconds"])
        return facts
    t0 = time.perf_counter()
    per_task = max(1, math.ceil(trials / len(tasks)))
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    builder = ms.builder.LocalBuilder(timeout_sec=BUILDER_TIMEOUT_S, f_build=build_candidate)
    runner = ms.runner.LocalRunner(timeout_sec=RUNNER_TIMEOUT_S)
    with _Progress(per_task * len(tasks), progress) as bar, contextlib.redirect_stdout(io.StringIO()):
        # MetaSchedule prints its task tables to stdout; the full logs stay in work_dir/logs
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [t for t, _ in tasks], str(work_dir), seed=0)
        ms.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(work_dir),
            max_trials_global=per_task * len(tasks), max_trials_per_task=per_task,
            num_trials_per_iter=min(32, per_task), builder=builder, runner=runner,
            database=database, measure_callbacks=ms.measure_callback.MeasureCallback.create("default")
            + [bar.callback()])
    kernels = _commit_baselines(tasks, database, builder, runner, target)
    facts.update(tuning_reused=False, tuning_seconds=round(time.perf_counter() - t0, 1),
                 kernels=[k.as_dict() for k in kernels])
    summary.write_text(json.dumps({"trials": trials, "tuning_seconds": facts["tuning_seconds"],
                                   "kernels": facts["kernels"]}, indent=1))
    marker.write_text(str(trials))
    return facts


def build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's ``default_build`` minus its ``import tvm.s_tir.tensor_intrin`` (see above)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def apply_database_pass(work_dir: Path) -> Any:
    """Relax pass: the best record per kernel from ``work_dir`` (marks those kernels scheduled)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    @tvm.transform.module_pass(opt_level=0, name="ptool.ApplyTuningDatabase")
    def _apply(mod: Any, _ctx: Any) -> Any:
        with ms.database.JSONDatabase(work_dir=str(work_dir)):  # given a folder, TVM's pass logs a warning
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)

    return _apply


def _heavy_tasks(legalized: Any, target: Any) -> list[tuple[Any, Any]]:
    """(MetaSchedule task, ptool's schedule of it) for every kernel ptool's MatmulRule takes."""
    from tvm.s_tir import meta_schedule as ms

    from ptool.backends.tvm_schedules import MatmulRule, _try_rule

    rule = MatmulRule()
    chosen = []
    with target:
        for task in ms.relax_integration.extract_tasks(legalized, target):
            func = task.dispatched[0]["main"]
            sch = _try_rule(rule, func, target)
            if sch is not None:
                chosen.append((task, sch[0] if isinstance(sch, list) else sch))
    return chosen


def _commit_baselines(tasks: list[tuple[Any, Any]], database: Any, builder: Any, runner: Any,
                      target: Any) -> list[KernelTuning]:
    """Measure ptool's schedule of every task like any candidate (one builder batch, one runner
    batch) and commit each to ``database`` next to MetaSchedule's records."""
    from tvm.s_tir import meta_schedule as ms

    workloads = [database.commit_workload(task.dispatched[0]) for task, _ in tasks]
    tuned = [database.get_top_k(w, 1) for w in workloads]
    args = [ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"]) for task, _ in tasks]
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in tasks])
    ran = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", a)
                      for b, a in zip(built, args) if b.error_msg is None])
    results = iter(r.result() for r in ran)
    kernels = []
    for (task, sch), workload, best, b, a in zip(tasks, workloads, tuned, built, args):
        result = next(results) if b.error_msg is None else None
        ptool_us = None
        if result is not None and result.error_msg is None:
            ptool_us = _mean_us(result.run_secs)
            database.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, workload, run_secs=result.run_secs, target=target, args_info=a))
        kernels.append(KernelTuning(task.task_name, int(task.weight), ptool_us,
                                    _mean_us(best[0].run_secs) if best else None))
    return kernels


def _mean_us(run_secs: Any) -> float:
    values = [float(s) for s in run_secs]
    return round(1e6 * sum(values) / len(values), 2)


class _Progress:
    """A tqdm bar over MetaSchedule's measured trials (fed by a measure callback)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.bar = total, enabled, None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="MetaSchedule trials", unit="trial", leave=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()

    def callback(self) -> Any:
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        bar = self.bar

        @derived_object
        class _Tick(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                if bar is not None:
                    bar.update(len(measure_candidates))

        return _Tick()
