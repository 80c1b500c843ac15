"""Subprocesses that a test stops with a real SIGINT."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """``preexec_fn`` giving the child the default SIGINT disposition.

    A process started in the background by a non-interactive shell (``make test &``, ``nohup``)
    ignores SIGINT, and its children inherit that; Python then never installs its Ctrl-C handler
    and the SIGINT the test sends does nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
