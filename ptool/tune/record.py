"""The tuning record: every candidate's row, the winner and the fingerprint, as one JSON file.

A record is keyed by ``run_key(device fingerprint, model, search settings)``: the same model
(weights, module structure and code, input shapes), on the same device with the same library
versions, searched with the same candidates, ``max_error`` and held-out data, finds it again and
is answered from it instead of being measured again. An interrupted or budget-cut record is
reused row by row: only the candidates it did not finish are measured.

Files are written to a temporary name in the same folder and moved into place, so a record under
its final name is always complete (Ctrl-C while saving leaves the previous one).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["RECORD_FILE", "Row", "Status", "model_key", "read_record", "write_json"]

RECORD_FILE = "tuning_record.json"
FORMAT = 1


class Status:
    """Row statuses (plain strings in the JSON record)."""

    OK = "ok"                      # measured, within max_error
    EXCLUDED = "excluded"          # measured, fidelity past max_error
    FAILED = "failed"              # could not be transformed / compiled / run
    NOT_MEASURED = "not measured"  # the time budget ran out before it started
    INTERRUPTED = "interrupted"    # Ctrl-C while it was being measured

    DONE = (OK, EXCLUDED, FAILED)  # a record row in one of these is reused as is


@dataclass
class Row:
    """One candidate in the table.

    Attributes:
        label: ``<extra passes or 'exact'> | <backend[options]>``.
        config: :meth:`TuningConfig.to_dict` of the candidate.
        exact: True when every pass in it is exact (only backend rounding changes the outputs).
        status / reason: see :class:`Status`; ``reason`` says why a row is excluded, failed or not measured.
        error: the fidelity figure compared with ``max_error`` (``1 - cosine`` or ``max_rel_error``),
            the worst over the held-out inputs.
        cosine / max_abs_error: vs the original model in eager torch on the held-out inputs.
        median_ms / p10_ms / p90_ms / spread / runs: latency from :mod:`ptool.benchmark`.
        build_s: transform + compile + first call, seconds.
        memory_mb: process RSS growth while building it; peak_rss_mb: process peak after timing.
        timing: ``"solo"`` (timed alone) or ``"run-off"`` (re-timed interleaved with the best ones).
        pareto / winner: on the latency-fidelity Pareto front / the chosen configuration.
        node: the cluster node that measured it (``ptool tune --ray``: ``<ip>/<node id prefix>``);
            empty for a row measured in this process.
    """

    label: str
    config: dict
    exact: bool
    status: str = Status.NOT_MEASURED
    reason: str = ""
    error: float | None = None
    cosine: float | None = None
    max_abs_error: float | None = None
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    spread: float | None = None
    runs: int = 0
    build_s: float | None = None
    memory_mb: float | None = None
    peak_rss_mb: float | None = None
    timing: str = ""
    pareto: bool = False
    winner: bool = False
    node: str = ""

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def model_key(module: Any, args: tuple, kwargs: dict) -> str:
    """A hash of the model (state, structure, forward code) and the example inputs' shapes and dtypes.

    Weights are hashed byte for byte (about 0.2 s for 100 MB), so a re-trained model never gets
    another model's record.
    """
    import torch

    from ptool.checkpoint import run_key

    if hasattr(module, "SerializeToString"):  # an ONNX ModelProto: its bytes are its structure and weights
        structure: Any = hashlib.sha256(module.SerializeToString()).hexdigest()
        state = {}
    elif isinstance(module, torch.export.ExportedProgram):
        structure = str(module.graph)
        state = dict(module.state_dict)
    else:
        structure = repr(module)
        state = module.state_dict() if hasattr(module, "state_dict") else {}
        with contextlib.suppress(OSError, TypeError):
            structure += inspect.getsource(type(module))
    shapes = [(tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else repr(t)
              for t in (*args, *kwargs.values())]
    return run_key(type(module).__qualname__, structure, sorted(kwargs), shapes, list(state.items()))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON atomically (temporary file beside, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the record is an ordinary file like its siblings
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_record(folder: Path, key: str) -> dict | None:
    """The record with ``key`` saved in ``folder`` (as ``tuning_record.json`` or ``records/<key>.json``), or None."""
    for path in (folder / RECORD_FILE, folder / "records" / f"{key}.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT and data.get("key") == key:
            return data
    return None

