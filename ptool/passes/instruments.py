"""Instruments: objects the pass manager calls around each pass (passed in explicitly).

An instrument may implement any of ``before_pass(index, pass_, gm)`` and
``after_pass(index, pass_, gm, record)``. Library code reads no environment variables; a user
who wants IR dumps passes ``instruments=[DumpIR("dumps/")]``.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass


@dataclass
class DumpIR:
    """Write the graph after every pass to ``folder/NNN_<pass>.txt`` (``000_input.txt`` first)."""

    folder: str | pathlib.Path

    def before_pass(self, index, pass_, gm) -> None:
        if index == 0:
            self._write(0, "input", gm)

    def after_pass(self, index, pass_, gm, record) -> None:
        self._write(index + 1, pass_.name, gm)

    def _write(self, number: int, label: str, gm) -> None:
        folder = pathlib.Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{number:03d}_{label}.txt").write_text(str(gm.graph))


@dataclass
class ProgressPrinter:
    """Print one line per finished pass (the CLI uses a rich progress bar instead)."""

    def after_pass(self, index, pass_, gm, record) -> None:
        print(f"[{index + 1}] {record.spec}: {record.rewritten} rewritten, {record.seconds:.2f}s")
