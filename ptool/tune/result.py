"""What ``ptool.autotune`` returns: the winning configuration, the table, and how to save them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptool.tune.fingerprint import DeviceFingerprint
from ptool.tune.record import FORMAT, RECORD_FILE, Row, Status, write_json
from ptool.tune.space import TuningConfig

__all__ = ["PLOT_FILE", "Table", "TuneResult", "format_table"]

PLOT_FILE = "latency_vs_fidelity.png"


def _num(x: float | None, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def format_table(rows: list[Row], *, max_error: float) -> str:
    """The table as text: one line per candidate, fastest valid first, then excluded/failed/not measured."""
    from ptool.report import format_table as _fmt

    order = {Status.OK: 0, Status.EXCLUDED: 1, Status.FAILED: 2, Status.INTERRUPTED: 3, Status.NOT_MEASURED: 4}
    ranked = sorted(rows, key=lambda r: (order.get(r.status, 9), r.median_ms if r.median_ms is not None else math.inf))
    headers = ["", "candidate", "status", "median ms", "p10-p90 ms", "runs", "error", "cosine", "build s", "mem +MiB",
               "reason"]
    body = []
    for r in ranked:
        mark = "*" if r.winner else ("P" if r.pareto else "")
        band = f"{r.p10_ms:.2f}-{r.p90_ms:.2f}" if r.p10_ms is not None and r.p90_ms is not None else "-"
        body.append([mark, r.label, r.status, _num(r.median_ms, ".2f"), band, str(r.runs or "-"),
                     _num(r.error, ".1e"), _num(r.cosine, ".6f"), _num(r.build_s, ".1f"), _num(r.memory_mb, ".0f"),
                     r.reason])
    if any(r.node for r in rows):  # a cluster search: which node measured each row
        headers.insert(-1, "node")
        for line, r in zip(body, ranked):
            line.insert(-1, r.node or "-")
    legend = (f"* winner, P Pareto front (latency vs error); error = worst over the held-out inputs vs the original "
              f"model as given (eager torch, or ONNX Runtime for an ONNX file), must be <= max_error {max_error:g}")
    return _fmt(headers, body, align="lllrrrrrrr" + "l" * (len(headers) - 10)) + "\n" + legend


class Table(list):
    """The candidates' :class:`Row` s: a plain list that prints as the table (``print(best.table)``)."""

    def __init__(self, rows: Any = (), *, max_error: float = math.nan) -> None:
        super().__init__(rows)
        self.max_error = max_error

    def __str__(self) -> str:
        return format_table(list(self), max_error=self.max_error)

    __repr__ = __str__  # a notebook or REPL shows the table, not a wall of Row(...)


@dataclass
class TuneResult:
    """The outcome of one autotune run (or of the record it reused).

    Attributes:
        config: the winning :class:`TuningConfig` (None when no candidate stayed within ``max_error``).
        table: every candidate's :class:`~ptool.tune.record.Row`.
        fingerprint: the device it was measured on.
        key: the record key (fingerprint x model x search settings).
        status: ``complete``, ``budget`` (stopped starting candidates past ``budget_s``) or ``interrupted``.
        reused: True when the whole answer came from a saved record (nothing was measured).
        seconds: wall time of this call.
        settings: ``max_error``, metric, candidates, ... (what the key covers).
        notes: remarks (fidelity measured on the example inputs only, ...).
    """

    config: TuningConfig | None
    table: list[Row]
    fingerprint: DeviceFingerprint
    key: str
    model_key: str
    status: str = "complete"
    reused: bool = False
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    record_path: Path | None = None
    _model: Any = field(default=None, repr=False)
    _call: tuple | None = field(default=None, repr=False)
    _calibration: Any = field(default=None, repr=False)
    _compiled: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.table = Table(self.table, max_error=self.max_error)

    @property
    def max_error(self) -> float:
        return float(self.settings.get("max_error", math.nan))

    @property
    def winner(self) -> Row | None:
        return next((r for r in self.table if r.winner), None)

    @property
    def compiled(self) -> Any:
        """The winner, transformed and compiled (built on first access when the record was reused).

        Raises:
            UsageError: no candidate stayed within ``max_error``.
        """
        from ptool.errors import UsageError

        if self._compiled is None:
            if self.config is None:
                raise UsageError(f"no candidate stayed within max_error {self.max_error:g}; nothing to compile")
            args, kwargs = self._call or ((), {})
            self._compiled = self.config.apply(self._model, args, example_kwargs=kwargs,
                                               calibration=self._calibration)
        return self._compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)

    # -- the record ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "key": self.key,
            "model_key": self.model_key,
            "status": self.status,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(self.seconds, 3),
            "fingerprint": self.fingerprint.to_dict(),
            "settings": self.settings,
            "winner": self.config.to_dict() if self.config else None,
            "notes": self.notes,
            "rows": [r.to_dict() for r in self.table],
        }

    def save(self, directory: str | Path, *, plot: bool = True) -> Path:
        """Write the record into ``directory``: ``tuning_record.json`` (table + winner + fingerprint),
        ``winner.json``, ``table.txt`` and the latency-vs-fidelity PNG. Returns the folder.

        A later ``ptool.autotune(..., record_dir=directory)`` of the same model on the same device
        reuses this record instead of measuring again.
        """
        from ptool.checkpoint import interrupts_deferred
        from ptool.tune.plot import plot_rows

        folder = Path(directory)
        with interrupts_deferred():  # never half a record
            write_json(folder / RECORD_FILE, self.to_dict())
            write_json(folder / "winner.json", {"config": self.config.to_dict() if self.config else None,
                                                "fingerprint": self.fingerprint.to_dict(), "key": self.key})
            (folder / "table.txt").write_text(str(self) + "\n", encoding="utf-8")
        if plot:
            plot_rows(self.table, folder / PLOT_FILE, max_error=self.max_error)
        self.record_path = folder / RECORD_FILE
        return folder

    @classmethod
    def from_record(cls, data: dict, **private: Any) -> TuneResult:
        winner = data.get("winner")
        return cls(
            config=TuningConfig.from_dict(winner) if winner else None,
            table=[Row.from_dict(r) for r in data.get("rows", [])],
            fingerprint=DeviceFingerprint.from_dict(data["fingerprint"]),
            key=data["key"], model_key=data.get("model_key", ""), status=data.get("status", "complete"),
            settings=dict(data.get("settings", {})), notes=list(data.get("notes", [])), **private,
        )

    # -- text ------------------------------------------------------------------------------------

    def __str__(self) -> str:
        head = [f"device: {self.fingerprint}",
                f"status: {self.status}{' (reused the saved record; nothing measured)' if self.reused else ''}"]
        win = self.winner
        if self.config is not None and win is not None:
            head.append(f"winner: {self.config}  ({win.median_ms:.2f} ms, error {win.error:.1e})")
        else:
            head.append(f"winner: none (no candidate within max_error {self.max_error:g})")
        lines = head + ["", format_table(self.table, max_error=self.max_error)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def print(self) -> None:  # noqa: A003  (the API's spelling: best.print())
        """Print :meth:`__str__`."""
        print(str(self))
