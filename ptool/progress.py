"""Step progress for ptool's long loops (attention transfer, distillation, calibration).

:func:`steps` gives a bar with ``update(n)`` and ``set_postfix(**fields)``. Where it shows:

- a *sink* installed with :func:`reporting_to` (the CLI installs one that puts ``label 37/200 ...``
  into its status line, since the CLI owns the terminal while a command runs);
- otherwise a tqdm bar on an interactive stderr (Python use in a terminal or a notebook);
- otherwise nothing (logs, CI).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from typing import Any

#: ``sink(label, done, total, fields)``: the current step count of a loop.
Sink = Callable[[str, int, int, dict], None]

_SINK: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("ptool_progress_sink", default=None)


@contextlib.contextmanager
def reporting_to(sink: Sink) -> Iterator[None]:
    """Send every :func:`steps` bar opened inside the block to ``sink``."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


class _SinkBar:
    """The part of tqdm's interface ptool's loops use, forwarded to a sink."""

    def __init__(self, sink: Sink, total: int, desc: str, initial: int) -> None:
        self.sink, self.total, self.desc, self.n, self.fields = sink, total, desc, initial, {}
        sink(desc, initial, total, {})

    def update(self, n: int = 1) -> None:
        self.n += n
        self.sink(self.desc, self.n, self.total, self.fields)

    def set_postfix(self, **fields: Any) -> None:
        self.fields = fields
        self.sink(self.desc, self.n, self.total, fields)

    def __enter__(self) -> _SinkBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def steps(total: int, desc: str, initial: int = 0) -> Any:
    """A context manager yielding a bar (``update``, ``set_postfix``) or None when nothing shows it;
    ``initial``: steps already done (a resumed run)."""
    sink = _SINK.get()
    if sink is not None:
        return _SinkBar(sink, total, desc, initial)
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return contextlib.nullcontext(None)
    try:
        from tqdm import tqdm
    except ImportError:  # without tqdm, no bar
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="step", leave=False, initial=initial)
