"""Terminal output for the CLI: results on stdout, progress and diagnostics on stderr.

Progress (a rich spinner / bar) is drawn only when stderr is a terminal; piped or captured runs
stay quiet, so stdout holds just the tables and stderr just warnings and the error line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

#: Packages whose loggers chat at WARNING level during export / compile; hidden unless --debug.
_NOISY_PACKAGES = frozenset({"torch", "onnxscript", "onnx_ir", "onnx", "onnxruntime", "transformers", "tvm"})


def one_line(text: str) -> str:
    """Collapse a message to one line (errors must be one line on stderr)."""
    return " ".join(str(text).split())


def _step_line(spinner: Any, text: str) -> Callable[[str, int, int, dict], None]:
    """A progress sink that shows a loop's steps in the spinner's line:
    ``transforming (hedgehog) — attention transfer 37/200 (18%) loss=0.0123``."""
    def show(label: str, done: int, total: int, fields: dict) -> None:
        share = f" ({100 * done // total}%)" if total else ""
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        spinner.update(f"{text} — {label} {done}/{total}{share}{extra}")
    return show


def format_bytes(size: float) -> str:
    """``33.2 KiB``, ``86.3 MiB``, ``1.2 GiB``: the unit that gives a readable number (never ``0.0 MiB``)."""
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def key_values(rows: list[tuple[str, str]]) -> str:
    """``key   value`` lines with the values aligned."""
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


class UI:
    """Where the CLI writes. ``live`` is True when stderr is an interactive terminal."""

    def __init__(self, *, debug: bool = False) -> None:
        self.debug = debug
        self._warnings: list[warnings.WarningMessage] = []
        self._console = None
        # The streams at start-up: results and diagnostics go here even while library chatter on
        # sys.stdout / sys.stderr is being swallowed (see capture_noise).
        self._stdout = sys.stdout
        self._stderr = sys.stderr

    @property
    def live(self) -> bool:
        if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 draws on the shared terminal
            return False
        try:
            return self._stderr.isatty()
        except (AttributeError, ValueError):
            return False

    def _rich(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self._stderr)
        return self._console

    # -- output ---------------------------------------------------------------------------------

    def out(self, text: str = "") -> None:
        """A result line (stdout)."""
        print(text, file=self._stdout, flush=True)

    def err(self, text: str) -> None:
        """A diagnostic line (stderr)."""
        print(text, file=self._stderr, flush=True)

    def note(self, text: str) -> None:
        """A progress note: shown on a terminal, dropped otherwise."""
        if self.live:
            self._rich().print(f"[dim]{text}[/dim]", highlight=False)

    # -- progress -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        """A spinner with ``text`` while the block runs, then a one-line 'done (N s)' note."""
        if not self.live:
            yield
            return
        from ptool.progress import reporting_to

        start = time.perf_counter()
        with self._rich().status(text, spinner="dots") as spinner, reporting_to(_step_line(spinner, text)):
            yield
        self.note(f"✓ {text} ({time.perf_counter() - start:.1f}s)")

    @contextlib.contextmanager
    def progress(self, text: str, total: int) -> Iterator[Callable[[int, int], None]]:
        """A progress bar; yields ``update(done, total)``."""
        if not self.live:
            yield lambda done, total: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self._rich(), transient=True) as bar:
            task = bar.add_task(text, total=total)
            yield lambda done, total_: bar.update(task, completed=done, total=total_)

    # -- warnings and log noise -----------------------------------------------------------------

    @contextlib.contextmanager
    def capture_noise(self) -> Iterator[None]:
        """Unless debugging: record warnings (shown later, filtered), quiet library loggers, and
        swallow what libraries print (torch.export prints partial graphs to stderr on failure)."""
        if self.debug:
            yield
            return
        import torch  # noqa: F401  (torch configures its loggers on import; our levels must come after)

        # Loggers that exist now get ERROR; ones created later inherit it from their package's
        # logger (created here if needed), and chatter that still gets through lands in the
        # swallowed stderr below.
        names = {n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in _NOISY_PACKAGES}
        saved = {lg: lg.level for lg in map(logging.getLogger, names | _NOISY_PACKAGES)}
        for lg in saved:
            lg.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(record=True) as caught, \
                    contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("default")
                try:
                    yield
                finally:
                    self._warnings.extend(caught)
        finally:
            for lg, level in saved.items():
                lg.setLevel(level)

    def flush_warnings(self) -> None:
        """Print each distinct warning raised by ptool itself as one ``ptool: warning:`` line."""
        seen = set()
        for w in self._warnings:
            filename = str(w.filename).replace("\\", "/")
            if "/ptool/" not in filename or not issubclass(w.category, UserWarning):
                continue
            text = one_line(str(w.message))
            if text not in seen:
                seen.add(text)
                self.err(f"ptool: warning: {text}")
        self._warnings.clear()
