"""The autotuner: the fastest (pass pipeline x backend x backend options) within an error bound.

    best = ptool.autotune(model, example_inputs=(x,), device="cpu", max_error=0.01)
    best.config          # passes + backend + options that won (TuningConfig; .apply(model, ...) re-applies it)
    best.table           # every candidate: latency, fidelity on held-out inputs, memory, status / reason
    best.save("tuned/")  # tuning_record.json + winner.json + table.txt + latency_vs_fidelity.png
    best(x)              # the winner, compiled (built on first use when the record was reused)

Modules: ``fingerprint`` (what keys a record), ``space`` (the candidates, declared by passes and
backends), ``tuner`` (``autotune``), ``search`` (the measuring loop), ``cluster`` (the same search as Ray
tasks: ``autotune(..., cluster=...)``), ``record`` / ``result`` (the saved record), ``plot`` (the PNG).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TuneResult", "TuningConfig", "TuningInterrupted", "autotune", "device_fingerprint"]


def __getattr__(name: str) -> Any:
    if name in ("autotune", "TuningInterrupted"):
        from ptool.tune import tuner

        return getattr(tuner, name)
    if name == "TuneResult":
        from ptool.tune.result import TuneResult

        return TuneResult
    if name == "TuningConfig":
        from ptool.tune.space import TuningConfig

        return TuningConfig
    if name == "device_fingerprint":
        from ptool.tune.fingerprint import device_fingerprint

        return device_fingerprint
    raise AttributeError(f"module 'ptool.tune' has no attribute '{name}'")
