"""Shared by ``ptool bench`` and ``ptool demo``: build one candidate per backend, measure them
side by side against torch eager on the original model, format the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ptool.benchmark import TVM_NOTE
from ptool.errors import UsageError, did_you_mean

TVM_SLOW = "; on matmul-heavy models like this one it is much slower than torch until tuned"


def parse_backends(values: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """``["torch,onnxruntime", "tvm"]`` -> ``["torch", "onnxruntime", "tvm"]`` (validated, deduplicated).

    Without ``values`` the ``default`` list is used, minus tvm when apache-tvm is not installed.
    """
    import importlib.util

    from ptool.backends import BACKENDS

    if not values:
        values = [",".join(b for b in default if b != "tvm" or importlib.util.find_spec("tvm") is not None)]
    names = [b.strip() for v in values for b in v.split(",") if b.strip()]
    if not names:
        raise UsageError(f"--backend needs at least one of {', '.join(BACKENDS)}")
    for b in names:
        if b not in BACKENDS:
            raise UsageError(f"unknown backend '{b}' (allowed: {', '.join(BACKENDS)}){did_you_mean(b, BACKENDS)}")
    return list(dict.fromkeys(names))


def build_candidates(original: Any, compiled_source: Any, backends: Sequence[str], args: tuple, kwargs: dict,
                     ui, *, transformed: bool, onnx_path: str | None = None, device: str = "cpu") -> list:
    """The eager baseline plus one candidate per backend (see :func:`ptool.benchmark.backend_candidates`).

    ``onnx_path``: for onnxruntime, keep its ONNX file there (the demo's ``out/minilm.onnx``);
    ``device``: where every row runs.
    """
    from ptool.benchmark import backend_candidates

    options = {"onnxruntime": {"onnx_path": onnx_path}} if onnx_path else {}
    return backend_candidates(original, compiled_source, backends, args, kwargs, transformed=transformed,
                              backend_options=options, status=ui.status, device=device)


def _err(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else ("inf" if math.isinf(x) else f"{x:.1e}")


def format_rows(rows: Sequence[Any], *, memory: bool = True, build: bool = True,
                speedup_header: str = "speedup vs eager") -> str:
    """The comparison table: latency, spread, speedup vs the baseline, error and cosine vs the baseline."""
    from ptool.report import format_table

    headers = ["backend", "median ms", "p10-p90 ms", "runs", speedup_header, "max abs err", "cosine"]
    if build:
        headers.append("build s")
    if memory:
        headers.append("mem +MiB")
    table = []
    for r in rows:
        t, f = r.timing, r.fidelity
        line = [
            r.name,
            f"{t.median_ms:.2f}",
            f"{t.p10_ms:.2f}-{t.p90_ms:.2f}",
            str(t.runs),
            f"{r.speedup:.2f}x",
            _err(f.max_abs_error if f else None),
            f"{f.cosine:.6f}" if f else "-",
        ]
        if build:
            line.append(f"{r.build_seconds:.1f}" if r.build_seconds else "-")
        if memory:
            # RSS may shrink during a build (freed temporaries): shown as +0, not as a saving
            line.append(f"{max(r.memory_mb, 0.0):+.0f}" if r.memory_mb is not None else "-")
        table.append(line)
    return format_table(headers, table)


def notes(rows: Sequence[Any]) -> list[str]:
    """Footnotes: distinct candidate notes and a warning for noisy measurements."""
    out = list(dict.fromkeys(r.note + (TVM_SLOW if r.note == TVM_NOTE and r.speedup < 1 else "")
                             for r in rows if r.note))
    load = machine_load()
    if load is not None and load[0] > load[1]:
        out.append(f"the machine is busy (load average {load[0]:.1f} on {load[1]} cores): eager torch suffers most, "
                   "its OpenMP threads spin-wait for descheduled peers; compare on a quiet machine "
                   "(or export OMP_WAIT_POLICY=PASSIVE)")
    noisy = [r.name for r in rows if r.timing.spread > 0.25 and r.timing.runs >= 5]
    if noisy:
        out.append(f"noisy timings (p10-p90 spread > 25% of the median) for: {', '.join(noisy)}; "
                   "re-run on a quiet machine or with a larger --repeat")
    return out


def machine_load() -> tuple[float, int] | None:
    """(1-minute load average, usable cores), or None where the OS does not say."""
    import os

    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return os.getloadavg()[0], cores
    except (OSError, AttributeError):
        return None
