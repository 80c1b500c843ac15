"""``autotune``: search pass pipelines x backends x backend options for the fastest one within ``max_error``.

The search, in two stages so approximate passes cost one fidelity check before any compile:

1. the exact base pipeline (``dce, cse, constant-fold, fold-bn`` + the user's exact passes) on
   every backend variant (see :mod:`ptool.tune.space`);
2. each approximate candidate: transformed once and checked in eager torch on the held-out inputs;
   past ``max_error`` it gets one ``excluded`` row with the reason and is never compiled; otherwise
   it runs on the best variant of each backend from stage 1, except where the backend leaves its
   number format out (``tuning_left_out``: bf16 on ONNX Runtime's CPU provider), which gets one
   ``excluded`` row with the backend's reason instead.

Every candidate is timed with :func:`ptool.benchmark.measure` (warm-up, median, p10/p90; a slow one
gets fewer runs, :func:`ptool.benchmark.plan_repeats`), and the best few are re-timed side by side
with :func:`ptool.benchmark.measure_interleaved` before the winner is picked, so machine noise
cannot crown a candidate. Fidelity is always measured on held-out inputs vs the original model in
eager torch, never on the calibration data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from ptool.errors import UsageError
from ptool.tune.fingerprint import device_fingerprint
from ptool.tune.record import Row, Status, model_key, read_record
from ptool.tune.result import TuneResult
from ptool.tune.search import RUN_OFF, Call, Search
from ptool.tune.space import (
    TuningConfig,
    backend_variants,
    check_backends,
    declared_pass_candidates,
    precision_candidates,
    split_passes,
)

__all__ = ["RUN_OFF", "TuningInterrupted", "autotune", "default_record_dir"]

ErrorMetric = Literal["cosine", "max_rel_error"]
Progress = Callable[[int, int, str], Any]


class TuningInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the search; what was measured is saved (``result.status == "interrupted"``)."""

    def __init__(self, result: TuneResult) -> None:
        super().__init__(f"tuning interrupted; {sum(r.status in Status.DONE for r in result.table)} candidates "
                         f"measured, record saved to {result.record_path}")
        self.result = result


def default_record_dir() -> Path:
    """Where records go when ``record_dir`` is not given: ``~/.cache/ptool/tuning``."""
    return Path.home() / ".cache" / "ptool" / "tuning"


def _calls(items: Iterable | None, what: str) -> list[Call]:
    from ptool.inputs import calibration_call

    if items is None:
        return []
    try:
        items = list(items)
    except TypeError:
        raise UsageError(f"{what} must be an iterable of input tuples (or dicts of keyword inputs)") from None
    return [Call(*calibration_call(i)) for i in items]


def _progress(progress: bool | Progress) -> tuple[Progress, Callable[[], None]]:
    """``progress`` -> ``(update(done, total, label), close())``: a rich bar with an ETA on a terminal."""
    import sys

    if callable(progress):
        return progress, lambda: None
    if not progress or not sys.stderr.isatty():
        return (lambda done, total, label: None), lambda: None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), transient=True)
    bar.start()
    task = bar.add_task("tuning", total=1)
    return (lambda done, total, label: bar.update(task, completed=done, total=total, description=label[:60])), bar.stop


def autotune(
    model: Any,
    example_inputs: Any = None,
    *,
    example_kwargs: dict | None = None,
    device: str = "cpu",
    max_error: float = 0.01,
    error_metric: ErrorMetric = "cosine",
    budget_s: float | None = None,
    backends: Sequence[str] | str | None = None,
    variants: dict[str, list[dict]] | None = None,
    passes: Sequence[str] | None = None,
    held_out_inputs: Iterable | None = None,
    calibration: Iterable | None = None,
    record_dir: str | Path | None = None,
    force: bool = False,
    tvm_trials: int = 0,
    repeat: int = 20,
    max_seconds_per_candidate: float = 5.0,
    progress: bool | Progress = True,
    cluster: str | None = None,
    tvm_tracker: str | None = None,
    tvm_key: str | None = None,
) -> TuneResult:
    """Find the fastest (passes x backend x options) configuration whose error stays within ``max_error``.

    Args:
        model: what :func:`ptool.transform` takes (module, ExportedProgram, path).
        example_inputs / example_kwargs: the call that is timed.
        device: ``cpu``, ``cuda`` or ``cuda:N``: where every candidate is built and timed (its
            fingerprint keys the record and decides which number formats are tried).
        max_error: the largest error allowed vs the original model, measured as ``error_metric``:
            ``cosine`` -> ``1 - cosine similarity`` of the outputs (default), ``max_rel_error`` ->
            max |out - ref| / max |ref|. Worst over the held-out inputs.
        budget_s: stop starting new candidates after this many seconds (those left are listed as
            ``not measured``); None: no limit.
        backends: backend names (default: every installed one).
        variants: backend -> list of option dicts to try instead of the ones the backend declares
            (e.g. ``{"torch": [{}]}``: eager only).
        passes: approximate pass specs to try (each alone on top of the exact base pipeline); exact
            specs join the base. Default: the candidates the registered passes declare.
        held_out_inputs: input tuples fidelity is measured on (never the calibration ones).
            Default: the example call alone (the result notes it).
        calibration: input tuples for passes that need data (without any, the candidates that need
            it, such as ``quantize:mode=auto``, calibrate on the example call; the notes say so).
        record_dir: where the record is looked up and saved (default ``~/.cache/ptool/tuning``).
        force: measure again even when a matching record exists.
        tvm_trials: MetaSchedule trials for a tuned TVM variant (0: untuned TVM only).
        repeat: timed calls per candidate (fewer for slow ones: about ``max_seconds_per_candidate``).
        progress: a progress bar with an ETA on a terminal (True), none (False), or a callable
            ``progress(done, total, label)``.
        cluster: run the candidates as Ray tasks on a cluster (``pip install 'ptool[cluster]'``):
            ``"auto"`` (the cluster started on this machine), ``"ray://HOST:PORT"`` (Ray Client) or
            ``"HOST:PORT"`` (the head). Candidates are timed only on nodes advertising the target's
            device fingerprint (see :mod:`ptool.tune.cluster`); the record is the same as a local
            run's, with the node that measured each row. None (default): in this process.
        tvm_tracker / tvm_key: ``HOST:PORT`` of a TVM RPC tracker and its servers' key: the
            MetaSchedule-tuned TVM candidates (``tvm_trials``) measure their trials on those servers
            (backend options ``rpc_tracker`` / ``rpc_key``); the database is the same.

    Returns:
        A :class:`TuneResult`: ``.config`` (the winner), ``.table``, ``.compiled``, ``.save(dir)``.

    Raises:
        UsageError: a bad argument (device, max_error, budget, backend). PassError: a bad pass spec.
        TuningInterrupted: Ctrl-C; the partial record is saved first (``.result`` holds it).
    """
    import torch

    from ptool.frontends.loaders import ModelKind, load_model
    from ptool.inputs import check_inputs
    from ptool.passes.pipelines import default_pipeline

    started = time.perf_counter()
    from ptool.backends.device import check_available, parse_device

    target = parse_device(device)
    check_available(target)
    device = str(target)
    if not (isinstance(max_error, (int, float)) and max_error >= 0 and math.isfinite(max_error)):
        raise UsageError(f"max_error must be a finite number >= 0, got {max_error!r}")
    if error_metric not in ("cosine", "max_rel_error"):
        raise UsageError(f"error_metric '{error_metric}' is not allowed (allowed: cosine, max_rel_error)")
    if budget_s is not None and not budget_s > 0:
        raise UsageError(f"budget_s must be > 0 seconds, got {budget_s!r}")
    if tvm_trials < 0:
        raise UsageError(f"tvm_trials must be >= 0, got {tvm_trials}")
    if (tvm_tracker is None) != (tvm_key is None):
        raise UsageError("tvm_tracker and tvm_key go together: the tracker's HOST:PORT and its servers' key")
    tuned_tvm = tvm_trials > 0 or any(v.get("tune_trials") for v in (variants or {}).get("tvm", ()))
    if tvm_tracker is not None and not tuned_tvm:
        raise UsageError("tvm_tracker sends MetaSchedule's trials to RPC servers: give tvm_trials > 0 too")
    if cluster is not None:
        from ptool.tune.cluster import check_address

        cluster = check_address(cluster)
    loaded = load_model(model)
    source = loaded.obj
    onnx_input = loaded.kind is ModelKind.ONNX
    backend_names = check_backends(backends if backends is not None or not onnx_input else _onnx_backends())
    if onnx_input and "torch" in backend_names:
        raise UsageError("an ONNX model is tuned on backends onnxruntime and tvm, not torch; give ptool the torch "
                         "model to tune it in torch")
    exact_extra, approximate = split_passes(declared_pass_candidates() if passes is None else passes)
    notes = []
    if onnx_input:  # only the passes with an ONNX implementation are candidates
        refused = {p: why for p in (*exact_extra, *approximate) if (why := onnx_refusal(p)) is not None}
        exact_extra = [p for p in exact_extra if p not in refused]
        approximate = [p for p in approximate if p not in refused]
        notes += [f"left out: {why}" for why in refused.values()]
    base = default_pipeline() + [p for p in exact_extra if p not in default_pipeline()]

    if example_inputs is None and loaded.example_inputs is not None:
        example_inputs, example_kwargs = loaded.example_inputs, {**loaded.example_kwargs, **(example_kwargs or {})}
    if onnx_input:
        eager, args, kwargs = _onnx_reference(source, example_inputs, example_kwargs)
    else:
        args, kwargs = check_inputs(example_inputs, example_kwargs)
        eager = source.module() if isinstance(source, torch.export.ExportedProgram) else source.eval()
    held = _calls(held_out_inputs, "held_out_inputs")
    calib = _calls(calibration, "calibration")
    if not held:
        held = [Call(args, kwargs)]
        notes.append("no held-out inputs given: fidelity measured on the example call only")
    if not calib:
        calib = _example_as_calibration(approximate, Call(args, kwargs), notes)
    calib_items = [c.args if not c.kwargs else c.kwargs for c in calib] or None

    fp = device_fingerprint(device)
    variant_sets = {b: [dict(v) for v in (variants or {}).get(b, ())] or backend_variants(b, fp, tvm_trials=tvm_trials)
                    for b in backend_names}
    from ptool.backends import backend_options

    if tvm_tracker is not None:  # the tuned TVM variants measure through the tracker
        variant_sets["tvm"] = [{**v, "rpc_tracker": tvm_tracker, "rpc_key": tvm_key} if v.get("tune_trials") else v
                               for v in variant_sets.get("tvm", [])]
    for b in variants or {}:
        if b not in backend_names:
            raise UsageError(f"variants= names backend '{b}', which is not among the backends tuned "
                             f"({', '.join(backend_names)})")
    for b, options in variant_sets.items():
        for v in options:
            backend_options(b, v)  # a bad option fails here, not as a failed row later
    stage1 = [TuningConfig.make(base, b, v) for b in backend_names for v in variant_sets[b]]
    from ptool.checkpoint import run_key

    mkey = model_key(source, args, kwargs)
    settings = {
        "max_error": float(max_error), "error_metric": error_metric, "backends": backend_names,
        "base_passes": base, "approximate_passes": approximate,
        "variants": variant_sets, "repeat": repeat,
        "held_out": run_key([(c.args, c.kwargs) for c in held]),
        "calibration": run_key([(c.args, c.kwargs) for c in calib]),
    }
    key = run_key(fp.key, mkey, settings)
    from ptool.checkpoint import interrupts_deferred
    from ptool.tune.record import RECORD_FILE, write_json

    folder = Path(record_dir) if record_dir is not None else default_record_dir()
    private = {"_model": source if onnx_input else eager, "_call": (args, kwargs), "_calibration": calib_items}

    settings["budget_s"] = budget_s  # recorded, not part of the key: a bigger budget continues a smaller one's run
    previous = None if force else read_record(folder, key)
    earlier_budget = (previous or {}).get("settings", {}).get("budget_s")
    budget_done = (previous is not None and previous.get("status") == "budget" and budget_s is not None
                   and earlier_budget is not None and budget_s <= earlier_budget)
    if previous is not None and (previous.get("status") == "complete" or budget_done):
        result = TuneResult.from_record(previous, **private)
        result.reused, result.seconds = True, time.perf_counter() - started
        result.record_path = folder
        return result
    done_rows = {r["label"]: Row.from_dict(r) for r in (previous or {}).get("rows", []) if r["status"] in Status.DONE}

    candidates, left_out = precision_candidates(approximate, fp)
    if onnx_input:
        candidates = [c for c in candidates if all(runs_on_onnx(p) for p in c)]
    search_kwargs = dict(eager=eager, args=args, kwargs=kwargs, held=held, calibration=calib_items, base=base,
                         max_error=max_error, metric=error_metric, repeat=repeat, max_seconds=max_seconds_per_candidate,
                         device=device, variants=variant_sets, source=source if onnx_input else eager)
    record_file = folder / RECORD_FILE if record_dir is not None else folder / "records" / f"{key}.json"

    last_write = [-math.inf, 0.0]  # when the record was last written, how long that took

    def save_partial(row: Row) -> None:
        """Each finished row goes to disk as it arrives, so a crash loses none; but the driver spends at
        most a tenth of its time rewriting the record (a record of 10,000 rows takes seconds to write)."""
        now = time.perf_counter()
        if now - last_write[0] < PARTIAL_WRITE_RATIO * last_write[1]:
            return
        partial = TuneResult(None, search.rows, fp, key, mkey, "running", False, now - started, settings, notes,
                             **private)
        with interrupts_deferred():
            write_json(record_file, partial.to_dict())
        last_write[:] = [time.perf_counter(), time.perf_counter() - now]

    owned = False
    if cluster is None:
        search = Search(**search_kwargs, done_rows=done_rows, on_row=save_partial)
    else:
        from ptool.tune.cluster import ClusterSearch, connect

        owned = connect(cluster)
        try:
            search = ClusterSearch(**search_kwargs, done_rows=done_rows, on_row=save_partial, target=fp.key,
                                   search_kwargs=search_kwargs)
        except BaseException:
            _disconnect(owned)
            raise
        notes += search.notes
        search.notes = notes  # refusals found during the search land in the result's notes too
    for specs, reason in left_out:  # the device cannot run these formats fast: one row each, never built
        search.rows.append(search.excluded_row((*base, *specs), " + ".join(specs), reason))
    update, close = _progress(progress)
    status = "complete"
    try:
        search.run(stage1, candidates, backend_names, budget_s, started, update)
        if search.budget_hit:
            status = "budget"
        search.run_off()
    except KeyboardInterrupt:
        status = "interrupted"
        search.mark_interrupted()
    finally:
        close()
        _disconnect(owned)
    rows = search.rows
    _mark_winner(rows)
    win = next((r for r in rows if r.winner), None)
    if search.reused:
        notes.append(f"{search.reused} rows reused from an unfinished record of the same run")
    result = TuneResult(TuningConfig.from_dict(win.config) if win else None, rows, fp, key, mkey, status,
                        False, time.perf_counter() - started, settings, notes, **private)
    if win is not None and win.label in search.compiled:
        result._compiled = search.compiled[win.label]
    if record_dir is not None:
        result.save(folder)
    else:
        with interrupts_deferred():
            write_json(record_file, result.to_dict())
        result.record_path = record_file
    if status == "interrupted":
        raise TuningInterrupted(result)
    return result


def _example_as_calibration(approximate: Sequence[str], example: Call, notes: list[str]) -> list[Call]:
    """Without calibration data, the candidates that need it (``quantize:mode=auto``: its per-layer
    sensitivity) calibrate on the example call rather than fail; the notes say so."""
    from ptool.passes.registry import parse_pass

    needing = [p for p in approximate if parse_pass(p).uses_calibration]
    if not needing:
        return []
    notes.append(f"no calibration data given: {', '.join(needing)} calibrate{'s' if len(needing) == 1 else ''} "
                 "on the example call")
    return [example]


def _disconnect(owned: bool) -> None:
    """Leave the Ray cluster if :func:`autotune` joined it (a caller's own ``ray.init`` is left alone)."""
    if owned:
        import ray

        ray.shutdown()


def _onnx_backends() -> list[str]:
    """The backends an ONNX model is tuned on by default: ONNX Runtime, and TVM when installed."""
    import importlib.util

    return ["onnxruntime"] + (["tvm"] if importlib.util.find_spec("tvm") is not None else [])


def runs_on_onnx(spec: str) -> bool:
    """Whether the pass ``spec`` names can run on an ONNX model as configured (it can tune one)."""
    return onnx_refusal(spec) is None


def onnx_refusal(spec: str) -> str | None:
    """Why the pass ``spec`` names cannot run on an ONNX model (None: it can)."""
    from ptool.errors import PassError
    from ptool.passes.onnx import onnx_implementation
    from ptool.passes.registry import parse_pass

    try:
        onnx_implementation(parse_pass(spec))
    except PassError as e:
        return str(e)
    return None


def _onnx_reference(proto: Any, example_inputs: Any, example_kwargs: dict | None) -> tuple[Any, tuple, dict]:
    """The original ONNX model as ONNX Runtime runs it, and its example call as positional tensors in
    graph-input order (inputs not given are made up, with a warning)."""
    from ptool.frontends.onnx_import import example_call
    from ptool.ir.onnx_module import OnnxTransformedModule, to_torch
    from ptool.report import Report

    feeds = example_call(proto, example_inputs, example_kwargs)
    args = tuple(to_torch(v) for v in feeds.values())
    return OnnxTransformedModule(proto, Report(capture="onnx"), args, {}), args, {}


#: The record is rewritten after a finished row unless the last write was more recent than this many
#: times its own duration: writing takes at most about a tenth of the search's time.
PARTIAL_WRITE_RATIO = 10

#: Candidates whose median is within this fraction of the fastest one tie: run-to-run noise on a
#: busy CPU is about this large, and a winner that flips between reruns helps no one.
TIE = 0.02


def _mark_winner(rows: list[Row]) -> None:
    """The winner: the fastest row within max_error, or among rows tying with it (within :data:`TIE`),
    the one with the least error (errors below 1e-6 count as equal), then the simplest configuration
    (fewest passes and options), then the label: the same answer whichever of them noise put first."""
    from ptool.tune.plot import pareto_front

    front = pareto_front(rows)
    for r in rows:
        r.pareto = r in front
        r.winner = False
    if front:
        limit = front[0].median_ms * (1 + TIE)
        tied = [r for r in rows if r.status == Status.OK and r.median_ms is not None and r.median_ms <= limit]
        min(tied, key=lambda r: ((r.error or 0.0) if (r.error or 0.0) > 1e-6 else 0.0,
                                 len(r.config["passes"]) + len(r.config.get("options") or {}), r.label)).winner = True


