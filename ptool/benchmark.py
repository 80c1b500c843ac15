"""The one timing harness: used by ``ptool bench``, ``ptool demo``, ``tools/bench.py`` and the autotuner.

How a figure is produced:

- every call runs under ``torch.no_grad()`` with the garbage collector disabled (collected once
  before timing starts), so neither autograd bookkeeping nor a GC pause lands inside one sample;
- ``warmup`` calls are made first and thrown away (lazy initialization, allocator growth, JIT);
- each call is timed with ``time.perf_counter_ns``; at least ``repeat`` samples are taken, and more
  (up to ``max_repeat``) until they add up to ``min_seconds``;
- figures are the median and the 10th / 90th percentiles of the samples; ``spread`` is
  ``(p90 - p10) / median``, a noise indicator (above ~0.2 the machine was busy).

Comparing candidates (backends, pass pipelines): :func:`measure_interleaved` runs them round-robin,
one call of each per round, so a burst of machine noise hits all of them alike instead of whichever
candidate happened to be running. Quote medians and ratios of medians; never a single best run.

Memory: :func:`memory_snapshot` reads the process resident set size (psutil if installed, else
``/proc/self/statm``) and the process peak (``resource.getrusage``). They are process-wide figures:
the increase in RSS while a backend is built and warmed up is a fair estimate of what it costs; the
peak is the high-water mark of the whole run.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "BASELINE", "Candidate", "ComparisonRow", "MemorySnapshot", "Timing", "backend_candidates", "compare_candidates",
    "gpu_synchronized", "measure", "measure_interleaved", "memory_snapshot", "plan_repeats", "summarize",
]

#: Defaults shared by every caller (the CLI exposes them as flags).
DEFAULT_WARMUP = 3
DEFAULT_REPEAT = 20


@dataclass(frozen=True)
class Timing:
    """Latency figures of one candidate, in milliseconds.

    Attributes:
        median_ms: median of the timed samples (the figure to quote).
        p10_ms / p90_ms: 10th and 90th percentiles.
        spread: ``(p90 - p10) / median``; a noise indicator, not an error bar.
        runs: how many timed samples (warm-up calls excluded).
        samples_ms: every sample, in the order taken.
        rss_mb: resident set size after the last sample (process-wide), if it could be read.
        peak_rss_mb: the process's peak resident set size so far, if it could be read.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    spread: float
    runs: int
    samples_ms: tuple[float, ...] = field(default=(), repr=False)
    rss_mb: float | None = None
    peak_rss_mb: float | None = None

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples_ms) if self.samples_ms else self.median_ms

    def ratio_to(self, baseline: Timing) -> float:
        """``baseline.median / self.median``: the speedup of this candidate over ``baseline``."""
        return baseline.median_ms / self.median_ms if self.median_ms > 0 else math.inf

    def to_dict(self, *, samples: bool = False) -> dict:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        else:
            d["samples_ms"] = list(self.samples_ms)
        return d

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}, {self.runs} runs)"


@dataclass(frozen=True)
class MemorySnapshot:
    """Process memory in MiB; ``None`` where the platform does not tell."""

    rss_mb: float | None
    peak_rss_mb: float | None


def memory_snapshot() -> MemorySnapshot:
    """The current and peak resident set size of this process (cheap: no allocation, no walk)."""
    rss = None
    try:
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
    except Exception:  # psutil missing or refused: fall back to procfs
        try:
            with open("/proc/self/statm", encoding="ascii") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            rss = None
    peak = None
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        peak = None
    return MemorySnapshot(rss, peak)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float], memory: MemorySnapshot | None = None) -> Timing:
    """Turn raw samples (ms) into a :class:`Timing`."""
    if not samples_ms:
        raise ValueError("no timing samples to summarize")
    s = sorted(samples_ms)
    median = statistics.median(s)
    p10, p90 = _percentile(s, 0.10), _percentile(s, 0.90)
    spread = (p90 - p10) / median if median > 0 else 0.0
    memory = memory or MemorySnapshot(None, None)
    return Timing(median, p10, p90, spread, len(s), tuple(samples_ms), memory.rss_mb, memory.peak_rss_mb)


class _Quiet:
    """``torch.no_grad()`` + GC disabled (restored on exit, even if the call raises)."""

    def __enter__(self) -> _Quiet:
        import torch

        self._no_grad = torch.no_grad()
        self._no_grad.__enter__()
        self._gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._gc_was_enabled:
            gc.enable()
        self._no_grad.__exit__(*exc)


def _check_counts(warmup: int, repeat: int, min_seconds: float) -> None:
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if min_seconds < 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds}")


def _per_candidate(value: int | Mapping[str, int], names: Mapping[str, Any], default: int) -> dict[str, int]:
    """One count for all candidates, or a per-name mapping (missing names get ``default``)."""
    return {name: (value.get(name, default) if isinstance(value, Mapping) else value) for name in names}


def measure(
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    warmup: int = DEFAULT_WARMUP,
    repeat: int = DEFAULT_REPEAT,
    min_seconds: float = 0.0,
    max_repeat: int | None = None,
) -> Timing:
    """Time ``fn(*args, **kwargs)``.

    Args:
        fn: the callable (a module, a compiled backend, any function).
        args / kwargs: the call's inputs (the same objects every call).
        warmup: untimed calls first.
        repeat: at least this many timed calls.
        min_seconds: keep timing until the samples add up to this many seconds ...
        max_repeat: ... but never more than this many calls (default ``max(repeat, 1000)``).

    Returns:
        The :class:`Timing`.

    Raises:
        ValueError: negative counts. Whatever ``fn`` raises propagates.
    """
    return measure_interleaved({"fn": fn}, args, kwargs, warmup=warmup, repeat=repeat,
                               min_seconds=min_seconds, max_repeat=max_repeat)["fn"]


def measure_interleaved(
    candidates: Mapping[str, Callable[..., Any]],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    warmup: int | Mapping[str, int] = DEFAULT_WARMUP,
    repeat: int | Mapping[str, int] = DEFAULT_REPEAT,
    min_seconds: float = 0.0,
    max_repeat: int | None = None,
    inputs: Mapping[str, tuple[Sequence[Any], Mapping[str, Any]]] | None = None,
    on_round: Callable[[int, int], None] | None = None,
    settle: int = 0,
) -> dict[str, Timing]:
    """Time several candidates side by side, one call of each per round (round-robin).

    A candidate with a smaller ``repeat`` (e.g. an untuned, slow backend) has its calls spread
    evenly over the rounds rather than bunched at the start, so it samples the same stretch of
    machine noise as the others.

    Args:
        candidates: name -> callable, measured in this order within each round.
        args / kwargs: the inputs every candidate gets, unless ``inputs`` names its own.
        warmup: untimed calls per candidate (done before any timing, in order): one number for
            all, or a mapping name -> count (names not in it get :data:`DEFAULT_WARMUP`).
        repeat: timed calls per candidate: one number for all, or a mapping name -> count
            (names not in the mapping get :data:`DEFAULT_REPEAT`).
        min_seconds: per candidate, keep timing until its samples add up to this long ...
        max_repeat: ... but at most this many calls per candidate (default ``max(repeat, 1000)``).
        inputs: optional name -> ``(args, kwargs)`` for candidates that take other inputs.
        on_round: called as ``on_round(done, total)`` after each round (progress display).
        settle: untimed calls of a candidate right before each of its timed calls. Runtimes keep
            their worker threads spinning for a while after a call (TVM's pool, OpenMP); on a
            small machine those spinners steal cores from the next candidate. Measured on
            MiniLM, 2 cores, torch eager then TVM in turn: 44 / 33 ms with 0, 31 / 20 ms with 1
            (each alone: 31-46 / 19-22 ms). Use 1 when the candidates run on different runtimes.

    Returns:
        name -> :class:`Timing`, in the order of ``candidates``.
    """
    if not candidates:
        return {}
    kwargs = dict(kwargs or {})
    counts = _per_candidate(repeat, candidates, DEFAULT_REPEAT)
    warmups = _per_candidate(warmup, candidates, DEFAULT_WARMUP)
    for name in candidates:
        _check_counts(warmups[name], counts[name], min_seconds)
    caps = {name: max(n, max_repeat if max_repeat is not None else max(n, 1000)) for name, n in counts.items()}
    calls = {name: (inputs[name] if inputs and name in inputs else (tuple(args), kwargs)) for name in candidates}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    elapsed = dict.fromkeys(candidates, 0.0)
    memory: dict[str, MemorySnapshot] = {}
    rounds = max(counts.values())

    def wants(name: str, r: int) -> bool:
        taken = len(samples[name])
        if r < rounds:  # planned phase: spread this candidate's calls evenly over the rounds
            return (r + 1) * counts[name] // rounds > r * counts[name] // rounds
        return elapsed[name] < min_seconds and taken < caps[name]  # extra rounds for min_seconds

    with _Quiet():
        for name, fn in candidates.items():
            a, k = calls[name]
            for _ in range(warmups[name]):
                fn(*a, **k)
        r = 0
        while True:
            active = [name for name in candidates if wants(name, r)]
            if not active and r >= rounds:
                break
            for name in active:
                fn = candidates[name]
                a, k = calls[name]
                for _ in range(settle):
                    fn(*a, **k)
                t0 = time.perf_counter_ns()
                fn(*a, **k)
                dt = (time.perf_counter_ns() - t0) / 1e9
                samples[name].append(dt * 1e3)
                elapsed[name] += dt
            r += 1
            if on_round is not None:
                on_round(min(r, rounds), rounds)
        for name in candidates:
            memory[name] = memory_snapshot()
    return {name: summarize(samples[name], memory[name]) for name in candidates}


def measure_blocks(
    candidates: Mapping[str, Callable[..., Any]],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    rounds: int = 4,
    warmup: int = DEFAULT_WARMUP,
    repeat: int = 5,
) -> dict[str, Timing]:
    """Time several candidates in turns of whole blocks: per round, each candidate runs ``warmup``
    untimed calls, then ``repeat`` timed ones, before the next candidate's block.

    Use it where a runtime's worker threads keep spinning well past one call (ONNX Runtime with its
    default thread spinning): round-robin with ``settle=1`` then still leaves them busy during the
    next candidate's timed call (on 2 cores, ptool's int8 BERT-base at seq 128 timed 51.0 ms
    round-robin beside a spinning ORT, 41-47 ms in blocks beside it in other runs that day; the
    machine's own noise is of that order too). The rounds spread every candidate over the same
    stretch of machine noise.

    Returns:
        name -> :class:`Timing` over all its timed calls, in the order of ``candidates``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    _check_counts(warmup, repeat, 0.0)
    kwargs = dict(kwargs or {})
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with _Quiet():
        for _ in range(rounds):
            for name, fn in candidates.items():
                for _ in range(warmup):
                    fn(*args, **kwargs)
                for _ in range(repeat):
                    t0 = time.perf_counter_ns()
                    fn(*args, **kwargs)
                    samples[name].append((time.perf_counter_ns() - t0) / 1e6)
    memory = memory_snapshot()  # process-wide: one reading serves every candidate
    return {name: summarize(samples[name], memory) for name in candidates}


# ---------------------------------------------------------------------------------------------
# Side-by-side comparison of candidates (backends, pipelines) against a baseline


@dataclass
class Candidate:
    """One thing to time: a callable plus what the table says about it.

    Attributes:
        name: the row label (``"onnxruntime"``, ``"torch eager (original)"``).
        fn: the callable, taking the benchmark inputs.
        build_seconds: how long compiling it took (0 for eager).
        memory_mb: resident memory added while building it and making its first call (process-wide
            RSS delta; None if unknown).
        note: a remark shown under the table (e.g. "untuned default schedules").
    """

    name: str
    fn: Callable[..., Any]
    build_seconds: float = 0.0
    memory_mb: float | None = None
    note: str = ""


@dataclass
class ComparisonRow:
    """A measured candidate: latency, speedup over the baseline, fidelity vs the baseline's outputs."""

    name: str
    timing: Timing
    speedup: float
    fidelity: Any  # ptool.verify.Fidelity (not imported at module level: keeps this module light)
    build_seconds: float
    memory_mb: float | None
    note: str = ""

    def to_dict(self) -> dict:
        f = self.fidelity
        return {
            "name": self.name,
            **self.timing.to_dict(),
            "speedup_vs_baseline": self.speedup,
            "max_abs_error": f.max_abs_error if f else None,
            "max_rel_error": f.max_rel_error if f else None,
            "cosine": f.cosine if f else None,
            "build_seconds": self.build_seconds,
            "memory_mb": self.memory_mb,
            "note": self.note,
        }


def plan_repeats(seconds_per_call: Mapping[str, float], *, repeat: int, max_seconds: float | None,
                 min_repeat: int = 3) -> dict[str, int]:
    """Timed calls per candidate: ``repeat``, cut so one candidate takes about ``max_seconds``.

    A slow candidate (an untuned TVM build ~80x slower than eager) then gets a handful of runs
    instead of holding the whole comparison hostage; never fewer than ``min(min_repeat, repeat)``.
    """
    floor = min(min_repeat, repeat)
    if max_seconds is None:
        return dict.fromkeys(seconds_per_call, repeat)
    return {name: max(floor, min(repeat, int(max_seconds / max(t, 1e-9))))
            for name, t in seconds_per_call.items()}


def compare_candidates(
    candidates: Sequence[Candidate],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    check_inputs: Sequence[tuple[Sequence[Any], Mapping[str, Any]]] = (),
    warmup: int = DEFAULT_WARMUP,
    repeat: int = DEFAULT_REPEAT,
    max_seconds: float | None = None,
    on_round: Callable[[int, int], None] | None = None,
    settle: int = 1,
) -> list[ComparisonRow]:
    """Check and time ``candidates`` side by side; the first one is the baseline.

    1. Fidelity: every candidate runs on the benchmark call plus ``check_inputs``; its outputs are
       compared with the baseline's (:func:`ptool.verify.compare_many`).
    2. Budget: one timed call per candidate sets its repeat count (:func:`plan_repeats`).
    3. Timing: :func:`measure_interleaved`, round-robin, each timed call after ``settle``
       untimed ones (candidates run on different runtimes); speedup = baseline median / median.

    Returns:
        One :class:`ComparisonRow` per candidate, in order (the baseline's speedup is 1).
    """
    import torch

    from ptool.verify import compare_many

    if not candidates:
        return []
    kwargs = dict(kwargs or {})
    calls = [(tuple(args), kwargs), *((tuple(a), dict(k)) for a, k in check_inputs)]
    with torch.no_grad():
        reference = [candidates[0].fn(*a, **k) for a, k in calls]
        fidelity = {}
        for c in candidates:
            outputs = [c.fn(*a, **k) for a, k in calls]
            fidelity[c.name] = compare_many(reference, outputs)
    per_call = {c.name: (1 + settle) * measure(c.fn, args, kwargs, warmup=0, repeat=1).median_ms / 1e3
                for c in candidates}
    counts = plan_repeats(per_call, repeat=repeat, max_seconds=max_seconds)
    # The fidelity calls above already warmed every candidate up; a slow one gets a single extra
    # warm-up call instead of ``warmup`` (its warm-up would otherwise cost more than its timing).
    warmups = {name: warmup if counts[name] >= repeat else min(warmup, 1) for name in counts}
    timings = measure_interleaved({c.name: c.fn for c in candidates}, args, kwargs, warmup=warmups,
                                  repeat=counts, on_round=on_round, settle=settle)
    base = timings[candidates[0].name]
    return [ComparisonRow(c.name, timings[c.name], timings[c.name].ratio_to(base), fidelity[c.name],
                          c.build_seconds, c.memory_mb, c.note) for c in candidates]


#: The row label of the reference every comparison is made against.
BASELINE = "torch eager (original)"

#: The note attached to TVM candidates (the pip build has no BLAS, and nothing is tuned yet).
TVM_NOTE = "tvm is untuned: ptool's default CPU schedules, no MetaSchedule tuning (tune_trials=N adds it)"


def backend_label(backend: str, *, transformed: bool) -> str:
    """The row label for ``backend``."""
    if backend == "torch":
        return "torch (transformed graph)" if transformed else "torch (exported graph)"
    return "tvm (untuned)" if backend == "tvm" else backend


def backend_candidates(
    original: Callable[..., Any],
    compiled_source: Any,
    backends: Sequence[str],
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    transformed: bool = True,
    backend_options: Mapping[str, Mapping[str, Any]] | None = None,
    status: Callable[[str], Any] | None = None,
    device: str = "cpu",
) -> list[Candidate]:
    """The eager baseline plus one compiled candidate per backend, ready for :func:`compare_candidates`.

    Args:
        original: the user's model, run eagerly (the baseline row, :data:`BASELINE`).
        compiled_source: what the backends compile (e.g. the module ``ptool.transform`` returned).
        backends: backend names (``torch``, ``onnxruntime``, ``tvm``).
        args / kwargs: the example call.
        transformed: label the torch row as the transformed graph.
        backend_options: backend name -> options for ``ptool.compile``.
        status: ``status(text)`` returns a context manager shown while a backend builds.
        device: ``cpu``, ``cuda`` or ``cuda:N``. On a GPU the baseline is a copy of ``original``
            moved there (the torch backend, uncompiled), every backend builds for the GPU, and
            every call is timed up to ``torch.cuda.synchronize()`` (a GPU call returns before its
            work is done).

    Each candidate's ``build_seconds`` covers compiling plus the first call (lazy session / VM
    set-up), and ``memory_mb`` the process RSS growth over the same span.

    Raises:
        UsageError: an unknown or unavailable device.
    """
    import contextlib

    import torch

    import ptool
    from ptool.backends.device import check_available, parse_device

    kwargs = dict(kwargs or {})
    status = status or (lambda text: contextlib.nullcontext())
    target = parse_device(device)
    check_available(target)
    if target.is_cuda:  # the torch backend uncompiled: a copy of the model on the GPU, inputs moved there
        original = ptool.compile(original, backend="torch", example_inputs=tuple(args), example_kwargs=kwargs,
                                 device=str(target))

    def eager(*a: Any, **k: Any) -> Any:
        with torch.no_grad():
            return original(*a, **k)

    synchronized = gpu_synchronized if target.is_cuda else (lambda fn: fn)
    candidates = [Candidate(BASELINE, synchronized(eager))]
    for backend in backends:
        options = dict((backend_options or {}).get(backend, {}))
        before = memory_snapshot().rss_mb
        start = time.perf_counter()
        label = "building the TVM module (can take minutes)" if backend == "tvm" else f"compiling for {backend}"
        with status(label):
            run = synchronized(ptool.compile(compiled_source, backend=backend, example_inputs=tuple(args),
                                             example_kwargs=kwargs, device=str(target), **options))
            with torch.no_grad():
                run(*args, **kwargs)
        seconds = time.perf_counter() - start
        after = memory_snapshot().rss_mb
        memory = after - before if before is not None and after is not None else None
        candidates.append(Candidate(backend_label(backend, transformed=transformed), run, seconds, memory,
                                    TVM_NOTE if backend == "tvm" else ""))
    return candidates


def gpu_synchronized(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` returning only once the GPU has done its work, so a timed call measures the work."""
    import torch

    def call(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return call
