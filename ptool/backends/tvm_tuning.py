"""MetaSchedule tuning of the heavy kernels, with ptool's own schedule as the baseline to beat.

TVM's stock tuning pipeline (``static_shape_tuning_pipeline``) tunes every fused kernel, reshapes
and gathers included, and drops ptool's schedules for the build. Here:

1. The model is legalized and fused exactly as the untuned build does it, and MetaSchedule's
   tasks are extracted from it (``relax_integration.extract_tasks``).
2. Only the kernels with a reduction are tuned: those ptool's
   :class:`~ptool.backends.tvm_schedules.MatmulRule` takes (matmul, dense, batched matmul,
   conv2d with their fused epilogues: most of the time of a transformer) and the row reductions
   (softmax, layer norm, GEMV); the trial budget is split evenly between them.
3. ptool's schedule of each of those kernels is built and timed by the same builder and runner,
   for the report.
4. The choice is made where it matters, in the model: the model is built once with every
   tuned kernel and once with ptool's, both are run on the example inputs under the Relax VM's
   instrument, and per kernel the faster one is kept (a kernel timed alone, with warm caches
   and nothing else running, can rank differently from the same kernel inside the model).
   The chosen records go to a small database of their own; the build applies it, and ptool's
   rules schedule everything else. A tuned build is thus never slower than the untuned one
   kernel by kernel, as measured in the model.

On a CUDA target the same steps run with dlight's GPU schedules as the baseline (what the
untuned CUDA build uses), MetaSchedule's CUDA search space, candidates run on the GPU, and the
in-model timings synchronized with the device around every kernel (GPU launches return before
the kernel is done). MetaSchedule's runner measures on GPU 0 (its device index is fixed); set
``CUDA_VISIBLE_DEVICES`` to tune for another.

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
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILDER_TIMEOUT_S = 600.0
RUNNER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class KernelTuning:
    """One tuned kernel: ptool's schedule against MetaSchedule's best, timed alone by
    MetaSchedule's runner (µs per call) and inside the model (ms per forward, all calls)."""

    name: str
    weight: int
    ptool_us: float | None
    tuned_us: float | None
    ptool_model_ms: float | None = None
    tuned_model_ms: float | None = None

    @property
    def winner(self) -> str:
        """The faster in the model when it was timed there, else alone; ptool on a tie."""
        ptool, tuned = ((self.ptool_model_ms, self.tuned_model_ms) if self.tuned_model_ms is not None
                        else (self.ptool_us, self.tuned_us))
        if tuned is None:
            return "ptool"
        if ptool is None:
            return "metaschedule"
        return "metaschedule" if tuned < ptool else "ptool"

    def as_dict(self) -> dict[str, Any]:
        return {"kernel": self.name, "calls": self.weight, "ptool_us": self.ptool_us,
                "metaschedule_us": self.tuned_us, "ptool_model_ms": self.ptool_model_ms,
                "metaschedule_model_ms": self.tuned_model_ms, "chosen": self.winner}


def database_dir(mod: Any, target: Any, tuning_dir: str | None) -> tuple[Path, str]:
    """The database folder for ``mod`` on ``target`` and the module's key."""
    from tvm_ffi import structural_hash  # tvm.ir.structural_hash moved here in 0.27

    key = hashlib.blake2b(f"{structural_hash(mod)}|{target}".encode(), digest_size=8).hexdigest()
    root = Path(tuning_dir) if tuning_dir else Path.home() / ".cache" / "ptool" / "tvm-tuning" / key
    return root, key


def tune(tasks: list[tuple[Any, Any]], target: Any, trials: int, work_dir: Path, key: str,
         progress: bool = True, rpc: tuple[str, str] | None = None) -> dict[str, Any]:
    """Tune ``tasks`` (from :func:`heavy_tasks`) into ``work_dir`` (or reuse it); facts for the report.

    ``trials`` is the total budget; a database already holding that many trials for this module
    (``key``) is reused as it is, and one holding fewer is tuned on for the difference (the
    search starts from what the database holds). ``rpc``: ``(HOST:PORT, key)`` of a TVM RPC
    tracker whose servers run the measurements (:func:`rpc_runner`); builds stay here.
    """
    from tvm.s_tir import meta_schedule as ms

    work_dir.mkdir(parents=True, exist_ok=True)
    marker = work_dir / f"ptool_trials_{key}.txt"  # per module: a shared folder never passes one
    # model's database off as another's
    done = int(marker.read_text()) if marker.is_file() and marker.read_text().strip().isdigit() else 0
    facts: dict[str, Any] = {"tune_trials": trials, "tuning_dir": str(work_dir), "tuned_kernels": len(tasks)}
    summary = _summary_path(work_dir, key)
    if done >= trials or not tasks:
        facts.update(tuning_reused=True, tuning_seconds=0.0)
        if summary.is_file():  # what the tuning run that made the database measured
            made = json.loads(summary.read_text())
            facts.update(kernels=made["kernels"], tuned_with_seconds=made["tuning_seconds"])
        return facts
    t0 = time.perf_counter()
    per_task = max(1, math.ceil((trials - done) / len(tasks)))
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    builder = ms.builder.LocalBuilder(timeout_sec=BUILDER_TIMEOUT_S, f_build=build_candidate)
    if rpc is None:
        runner = ms.runner.LocalRunner(timeout_sec=RUNNER_TIMEOUT_S)
    else:
        runner, servers = rpc_runner(*rpc)
        facts.update(rpc_tracker=rpc[0], rpc_key=rpc[1], rpc_servers=servers)
    with (_Progress(per_task * len(tasks), progress) as bar, contextlib.redirect_stdout(io.StringIO()),
          _unnamed_log_handlers_set_aside()):
        # MetaSchedule prints its task tables to stdout; the full logs stay in work_dir/logs
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [t for t, _ in tasks], str(work_dir), seed=0)
        ms.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(work_dir),
            max_trials_global=per_task * len(tasks), max_trials_per_task=per_task,
            num_trials_per_iter=min(32, per_task), builder=builder, runner=runner,
            database=database, measure_callbacks=ms.measure_callback.MeasureCallback.create("default")
            + [bar.callback()])
    kernels = _measure_baselines(tasks, database, builder, runner, target)
    facts.update(tuning_reused=False, tuning_seconds=round(time.perf_counter() - t0, 1),
                 kernels=[k.as_dict() for k in kernels])
    earlier = json.loads(summary.read_text()).get("tuning_seconds", 0.0) if summary.is_file() else 0.0
    summary.write_text(json.dumps({"trials": trials, "tuning_seconds": round(earlier + facts["tuning_seconds"], 1),
                                   "kernels": facts["kernels"]}, indent=1))  # no in-model choice yet
    marker.write_text(str(trials))
    return facts


#: The logger MetaSchedule configures (``logging.config.dictConfig``) at the start of every tuning run.
METASCHEDULE_LOGGER = "tvm.s_tir.meta_schedule"


@contextlib.contextmanager
def _unnamed_log_handlers_set_aside() -> Iterator[None]:
    """Detach the handlers without a name from MetaSchedule's logger while it tunes; put them back after.

    MetaSchedule's logging setup lists the names of the handlers already on its logger and fails on
    one without a name (``AttributeError: 'NoneType' object has no attribute 'format'``). After a
    first tune, its logger no longer propagates, and a process that attaches an unnamed handler to
    such loggers (pytest's log capture does, at every test phase; so may a user's own logging set-up)
    broke every later MetaSchedule tune in that process.
    """
    import logging

    logger = logging.getLogger(METASCHEDULE_LOGGER)
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for h in unnamed:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in unnamed:
            logger.addHandler(h)


def rpc_runner(tracker: str, key: str) -> tuple[Any, int]:
    """MetaSchedule's ``RPCRunner`` through the tracker at ``HOST:PORT`` to the servers registered
    with ``key``, measuring on as many at once as are free now; (runner, that count).

    Raises:
        BackendError: the tracker does not answer, or no server is registered with ``key``.
    """
    import socket

    from tvm import rpc as tvm_rpc
    from tvm.s_tir import meta_schedule as ms

    from ptool.errors import BackendError

    host, _, port = tracker.rpartition(":")
    try:  # TVM's own connect retries a dead address for a minute: ask the socket first
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise BackendError(f"TVM RPC tracker {tracker} does not answer: {type(e).__name__}: {e}") from None
    try:
        summary = tvm_rpc.connect_tracker(host, int(port)).summary()
    except Exception as e:  # TVM raises plain RuntimeError / OSError / TVMError for a dead tracker
        raise BackendError(f"TVM RPC tracker {tracker} does not answer: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    queue = summary.get("queue_info", {}).get(key)
    if not queue or not queue.get("free", 0) + queue.get("pending", 0):
        known = ", ".join(sorted(summary.get("queue_info", {}))) or "none"
        raise BackendError(f"no RPC server is registered with key '{key}' at tracker {tracker} (keys there: {known})")
    servers = max(1, int(queue.get("free", 0)))
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key,
                                 session_timeout_sec=int(RUNNER_TIMEOUT_S))
    return ms.runner.RPCRunner(rpc_config=config, max_workers=servers), servers


def _summary_path(work_dir: Path, key: str) -> Path:
    """The per-module summary: trials, tuning time, the kernels' timings, whether the choice was made."""
    return work_dir / f"ptool_kernels_{key}.json"


def chosen_dir(work_dir: Path, key: str) -> Path:
    """The database of the kernels kept after the in-model comparison (step 4)."""
    return work_dir / f"chosen_{key}"


def choose(tasks: list[tuple[Any, Any]], target: Any, work_dir: Path, key: str, facts: dict[str, Any],
           tuned_ms: dict[str, float], ptool_ms: dict[str, float]) -> dict[str, Any]:
    """Keep, per tuned kernel, the schedule that was faster in the model (``*_ms``: ms per
    forward per kernel, from :func:`profile_kernels` of the two builds); write them to
    :func:`chosen_dir` and the comparison to the summary. Returns the updated facts."""
    from tvm.s_tir import meta_schedule as ms

    tuning = ms.database.JSONDatabase(work_dir=str(work_dir))
    shutil.rmtree(chosen_dir(work_dir, key), ignore_errors=True)  # a choice made before more tuning
    chosen_dir(work_dir, key).mkdir(parents=True)
    chosen = ms.database.JSONDatabase(work_dir=str(chosen_dir(work_dir, key)))
    alone = {k["kernel"]: k for k in facts.get("kernels", [])}
    kernels = []
    for task, _ in tasks:
        name = task.task_name
        k = KernelTuning(name, int(task.weight), alone.get(name, {}).get("ptool_us"),
                         alone.get(name, {}).get("metaschedule_us"), ptool_ms.get(name), tuned_ms.get(name))
        best = tuning.get_top_k(tuning.commit_workload(task.dispatched[0]), 1)
        if k.winner == "metaschedule" and best:
            rec = best[0]
            chosen.commit_tuning_record(ms.database.TuningRecord(
                rec.trace, chosen.commit_workload(task.dispatched[0]), run_secs=rec.run_secs,
                target=target, args_info=rec.args_info))
        kernels.append(k.as_dict())
    facts = {**facts, "kernels": kernels}
    summary = _summary_path(work_dir, key)
    made = json.loads(summary.read_text()) if summary.is_file() else {}
    summary.write_text(json.dumps({**made, "kernels": kernels, "chosen_in_model": True}, indent=1))
    return facts


def is_chosen(work_dir: Path, key: str) -> bool:
    """Whether the in-model choice was made for this database (a rebuild reuses it)."""
    summary = _summary_path(work_dir, key)
    return summary.is_file() and bool(json.loads(summary.read_text()).get("chosen_in_model"))


def profile_interleaved(vms: dict[str, Any], args: list[Any], rounds: int = 3,
                        calls: int = 5, sync: Callable[[], Any] | None = None) -> dict[str, dict[str, float]]:
    """:func:`profile_kernels` of several VMs in turn, ``rounds`` times (so a slow moment of the
    machine hits them all alike); per VM and kernel, the median over rounds."""
    import statistics

    samples: dict[str, list[dict[str, float]]] = {name: [] for name in vms}
    for _ in range(rounds):
        for name, vm in vms.items():
            samples[name].append(profile_kernels(vm, args, calls, sync))
    return {name: {kernel: round(statistics.median(r.get(kernel, 0.0) for r in runs), 4) for kernel in runs[0]}
            for name, runs in samples.items()}


def profile_kernels(vm: Any, args: list[Any], calls: int = 10,
                    sync: Callable[[], Any] | None = None) -> dict[str, float]:
    """ms per call of the model spent in each PrimFunc (and VM builtin), from the Relax VM's
    instrument: the median of ``calls`` model calls (after one warm-up). ``sync`` (a GPU's
    ``dev.sync``) runs before every clock reading, so a kernel's time is its run, not its launch."""
    import statistics

    per_call: dict[str, list[float]] = {}
    spent: dict[str, float] = {}
    started: dict[str, float] = {}

    def instrument(_func: Any, symbol: str, before_run: bool, _ret: Any, *_args: Any) -> int:
        if sync is not None:
            sync()
        now = time.perf_counter()
        if before_run:
            started[symbol] = now
        else:
            spent[symbol] = spent.get(symbol, 0.0) + now - started[symbol]
        return 0

    vm["main"](*args)
    vm.set_instrument(instrument)
    try:
        for _ in range(calls):
            spent.clear()
            vm["main"](*args)
            for name, seconds in spent.items():
                per_call.setdefault(name, []).append(1e3 * seconds)
    finally:
        vm.set_instrument(lambda *a: 0)
    return {name: round(statistics.median(v), 4) for name, v in per_call.items()}


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


def heavy_tasks(legalized: Any, target: Any, rules: list[Any] | None = None) -> list[tuple[Any, Any]]:
    """(MetaSchedule task, the baseline schedule of it) for every kernel with a reduction that
    ``rules`` schedule (default: ptool's CPU rules: matmul / batched matmul / conv2d with
    MatmulRule, the row reductions, softmax, layer norm, GEMV, with dlight's; on a GPU, dlight's
    GPU rules). Elementwise and layout kernels are left out."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    from ptool.backends.tvm_schedules import default_rules, first_schedule

    rules = default_rules() if rules is None else rules
    chosen = []
    with target:
        for task in ms.relax_integration.extract_tasks(legalized, target):
            func = task.dispatched[0]["main"]
            infos = normalize_prim_func(s_tir.Schedule(func))
            if not infos or all(info.is_injective() for info in infos):
                continue
            sch = first_schedule(func, target, rules)
            if sch is not None:
                chosen.append((task, sch))
    return chosen


def _measure_baselines(tasks: list[tuple[Any, Any]], database: Any, builder: Any, runner: Any,
                       target: Any) -> list[KernelTuning]:
    """ptool's schedule of every task timed alone like any candidate (one builder batch, one
    runner batch), next to MetaSchedule's best record."""
    from tvm.s_tir import meta_schedule as ms

    tuned = [database.get_top_k(database.commit_workload(task.dispatched[0]), 1) for task, _ in tasks]
    args = [ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"]) for task, _ in tasks]
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in tasks])
    device_type = "cuda" if target.kind.name == "cuda" else "cpu"
    ran = runner.run([ms.runner.RunnerInput(b.artifact_path, device_type, a)
                      for b, a in zip(built, args) if b.error_msg is None])
    results = iter(r.result() for r in ran)
    kernels = []
    for (task, _), best, b in zip(tasks, tuned, built):
        result = next(results) if b.error_msg is None else None
        ptool_us = _mean_us(result.run_secs) if result is not None and result.error_msg is None else None
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
