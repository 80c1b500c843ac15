"""The measuring loop of :func:`ptool.autotune`: one candidate built, checked and timed, the run-off.

:class:`Search` holds the rows so far and evaluates candidates in this process; the local search
(:mod:`ptool.tune.tuner`) drives it candidate by candidate, the cluster search
(:mod:`ptool.tune.cluster`) builds one on each Ray worker from the same inputs.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ptool.tune.record import Row, Status
from ptool.tune.space import TuningConfig, approximate_variants, backend_left_out

__all__ = ["RUN_OFF", "Call", "Search", "error_of", "excluded_label", "fidelity"]

Progress = Callable[[int, int, str], Any]

#: How many of the fastest candidates are re-timed side by side before the winner is picked.
RUN_OFF = 3


@dataclass
class Call:
    """One call of the model: positional and keyword inputs."""

    args: tuple
    kwargs: dict


def excluded_label(spec: str) -> str:
    """The label of the one row an approximate pass past ``max_error`` gets (it is built on no backend)."""
    return f"{spec} | (any backend)"


def error_of(fid: Any, metric: str) -> float:
    """The figure compared with ``max_error``: ``1 - cosine`` or ``max_rel_error`` (inf: mismatched outputs)."""
    if fid.mismatched_leaves:
        return math.inf
    return 1.0 - fid.cosine if metric == "cosine" else fid.max_rel_error


def fidelity(fn: Callable, reference: list, held_out: list[Call]) -> Any:
    """``fn``'s outputs on the held-out calls compared with the reference outputs."""
    import torch

    from ptool.verify import compare_many

    with torch.no_grad():
        outputs = [fn(*c.args, **c.kwargs) for c in held_out]
    return compare_many(reference, outputs)


class Search:
    """The measuring loop's state: rows so far, live compiled candidates, the transformed pipelines."""

    def __init__(self, eager, args, kwargs, held, calibration, base, max_error, metric, repeat, max_seconds,
                 done_rows, device="cpu", variants=None, source=None, reference=None, on_row=None):
        import torch

        self.source = eager if source is None else source  # what ptool.transform takes: the module or the ONNX model
        self.device = device
        self.variants: dict[str, list[dict]] = variants or {}  # backend -> the option dicts of stage 1
        self.eager, self.args, self.kwargs, self.held = eager, args, kwargs, held
        self.calibration, self.base = calibration, base
        self.max_error, self.metric, self.repeat, self.max_seconds = max_error, metric, repeat, max_seconds
        self.done_rows = done_rows
        self.rows: list[Row] = []
        self.compiled: dict[str, Callable] = {}  # live callables of the current best few (for the run-off)
        self.transformed: dict[tuple[str, ...], Any] = {}
        self.budget_hit = False
        self.reused = 0
        self.current: Row | None = None
        self.on_row: Callable[[Row], Any] = on_row or (lambda row: None)  # each finished row, as it finishes
        if reference is None:
            with torch.no_grad():
                reference = [eager(*c.args, **c.kwargs) for c in held]
        self.reference = reference

    # -- stages ---------------------------------------------------------------------------------

    def run(self, stage1: list[TuningConfig], approximate: list[tuple[str, ...]], backends: list[str],
            budget_s: float | None, started: float, update: Progress) -> None:
        total = len(stage1) + len(approximate) * (1 + len(backends))
        done = 0
        self.planned = list(stage1)

        def over_budget() -> bool:
            self.budget_hit = self.budget_hit or (budget_s is not None and time.perf_counter() - started > budget_s)
            return self.budget_hit

        for config in stage1:
            update(done, total, config.label(self.base))
            self._candidate(config, skip=over_budget())
            self.on_row(self.rows[-1])
            done += 1
        best = self._best_variant_per_backend(backends)
        for specs in approximate:
            pipeline, spec = (*self.base, *specs), " + ".join(specs)
            if self._reuse(excluded_label(spec)):  # excluded by the unfinished run resumed: its row stands
                done += 1 + len(backends)
                continue
            update(done, total, f"checking {spec}")
            reason = None if over_budget() else self._check_pipeline(pipeline)
            done += 1
            if reason is not None:  # one row: it is left out on every backend, none was compiled
                self.rows.append(self.excluded_row(pipeline, spec, reason))
                self.on_row(self.rows[-1])
                done += len(backends)
            for b in backends if reason is None else ():
                for options in approximate_variants(b, self.variants.get(b, []), best.get(b)):
                    config = TuningConfig.make(pipeline, b, options)
                    update(done, total, config.label(self.base))
                    left_out = backend_left_out(b, specs, options)
                    if left_out is not None:  # the backend cannot run it fast: one row, never built
                        self.rows.append(Row(config.label(self.base), config.to_dict(), False, Status.EXCLUDED,
                                             left_out))
                        continue
                    self._candidate(config, skip=over_budget())
                    self.on_row(self.rows[-1])
                done += 1
            self.transformed.pop(pipeline, None)
        update(total, total, "done")

    def _best_variant_per_backend(self, backends: list[str]) -> dict[str, dict]:
        best: dict[str, dict] = {}
        for b in backends:
            ok = [r for r in self.rows if r.status == Status.OK and r.config["backend"] == b and r.median_ms]
            if ok:
                best[b] = min(ok, key=lambda r: r.median_ms).config["options"]
        return best

    # -- one candidate ----------------------------------------------------------------------------

    def _transform(self, pipeline: tuple[str, ...]) -> Any:
        import ptool

        if pipeline not in self.transformed:
            self.transformed[pipeline] = ptool.transform(self.source, list(pipeline), self.args,
                                                         example_kwargs=self.kwargs, calibration=self.calibration)
        return self.transformed[pipeline]

    def _check_pipeline(self, pipeline: tuple[str, ...]) -> str | None:
        """Transform and check in eager torch: the reason it is excluded, or None if within max_error."""
        from ptool.errors import first_line

        try:
            m2 = self._transform(pipeline)
        except Exception as e:
            return f"transform failed: {type(e).__name__}: {first_line(e)}"
        error = error_of(fidelity(m2, self.reference, self.held), self.metric)
        if error > self.max_error:
            return f"{self._metric_name()} {error:.2e} > max_error {self.max_error:g} (held-out, eager torch)"
        return None

    def excluded_row(self, pipeline: tuple[str, ...], spec: str, reason: str, *, timed: bool = True) -> Row:
        """The row of an approximate pass left out: its fidelity, and a short eager-torch timing so the
        plot can show it (greyed) next to the candidates it lost to (``timed=False``: no timing, for a
        cluster node whose device is not the one tuned for)."""
        from ptool.benchmark import measure

        config = TuningConfig.make(pipeline, "torch")
        row = Row(excluded_label(spec), config.to_dict(), False, Status.EXCLUDED, reason)
        m2 = self.transformed.get(pipeline)
        if m2 is not None:
            fid = fidelity(m2, self.reference, self.held)
            row.error, row.cosine, row.max_abs_error = error_of(fid, self.metric), fid.cosine, fid.max_abs_error
            if timed:
                self._set_timing(row, measure(m2, self.args, self.kwargs, warmup=1, repeat=3), "eager torch")
        return row

    def _reuse(self, label: str) -> bool:
        """Take the row an unfinished record of this search already finished for ``label`` (True), so
        a resumed search never measures a candidate again; False: there is none, measure it."""
        row = self.done_rows.get(label)
        if row is None:
            return False
        self.rows.append(row)
        self.reused += 1
        return True

    def _metric_name(self) -> str:
        return "1-cosine" if self.metric == "cosine" else "max_rel_error"

    def _candidate(self, config: TuningConfig, *, skip: bool) -> None:
        import ptool
        from ptool.benchmark import measure, memory_snapshot, plan_repeats
        from ptool.errors import first_line

        label = config.label(self.base)
        if self._reuse(label):
            return
        from ptool.passes.registry import parse_pass

        exact = all(parse_pass(p).exact for p in config.passes)
        row = Row(label, config.to_dict(), exact)
        self.rows.append(row)
        if skip:
            row.reason = "time budget spent before it started"
            return
        self.current = row
        gc.collect()  # what earlier candidates left behind is freed now, not during this build
        before = memory_snapshot().rss_mb
        t0 = time.perf_counter()
        try:
            m2 = self._transform(config.passes)
            fn = ptool.compile(m2, backend=config.backend, device=self.device, **config.options_dict)
            fid = fidelity(fn, self.reference, self.held)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            row.status, row.reason = Status.FAILED, f"{type(e).__name__}: {first_line(e)}"
            self.current = None
            return
        row.build_s = time.perf_counter() - t0
        after = memory_snapshot().rss_mb
        # RSS can still shrink while building (the allocator returns pages): growth, floored at 0
        row.memory_mb = max(0.0, after - before) if before is not None and after is not None else None
        row.error, row.cosine, row.max_abs_error = error_of(fid, self.metric), fid.cosine, fid.max_abs_error
        one = measure(fn, self.args, self.kwargs, warmup=1, repeat=1).median_ms / 1e3
        count = plan_repeats({"c": one}, repeat=self.repeat, max_seconds=self.max_seconds)["c"]
        t = measure(fn, self.args, self.kwargs, warmup=2 if count >= self.repeat else 0, repeat=count)
        self._set_timing(row, t, "solo")
        if row.error > self.max_error:
            row.status = Status.EXCLUDED
            row.reason = f"{self._metric_name()} {row.error:.2e} > max_error {self.max_error:g}"
        else:
            row.status = Status.OK
            self.compiled[label] = fn
            self._keep_best_few()
        self.current = None

    @staticmethod
    def _set_timing(row: Row, t: Any, how: str) -> None:
        row.median_ms, row.p10_ms, row.p90_ms, row.spread, row.runs = t.median_ms, t.p10_ms, t.p90_ms, t.spread, t.runs
        row.peak_rss_mb = t.peak_rss_mb
        row.timing = how

    def _keep_best_few(self) -> None:
        """Hold only the fastest RUN_OFF compiled candidates (memory: each holds a copy of the weights)."""
        by_label = {r.label: r for r in self.rows}
        keep = sorted(self.compiled, key=lambda k: by_label[k].median_ms)[:RUN_OFF]
        self.compiled = {k: self.compiled[k] for k in keep}

    def run_off(self) -> None:
        """Re-time the best few side by side (round-robin), so the winner is not a noise artefact."""
        if len(self.compiled) < 2:
            return
        by_label = {r.label: r for r in self.rows}
        for label, t in self.interleave(self.compiled, {k: by_label[k].runs for k in self.compiled}).items():
            self._set_timing(by_label[label], t, "run-off")

    def interleave(self, compiled: dict[str, Callable], runs: dict[str, int]) -> dict[str, Any]:
        """The run-off's timings of ``compiled`` (label -> callable), each as many calls as it had solo
        (``runs``), between 3 and ``repeat``."""
        from ptool.benchmark import measure_interleaved

        return measure_interleaved(compiled, self.args, self.kwargs, warmup=1, settle=1,
                                   repeat={k: max(3, min(self.repeat, runs[k])) for k in compiled})

    def mark_interrupted(self) -> None:
        """The row being measured becomes ``interrupted``; stage-1 candidates not reached, ``not measured``."""
        if self.current is not None:
            self.current.status, self.current.reason = Status.INTERRUPTED, "Ctrl-C while it was being measured"
        self.current = None
        seen = {r.label for r in self.rows}
        for config in getattr(self, "planned", ()):
            label = config.label(self.base)
            if label not in seen:
                self.rows.append(Row(label, config.to_dict(), True, Status.NOT_MEASURED, "Ctrl-C before it started"))
