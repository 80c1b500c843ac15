"""The ``ptool`` command line: ``passes``, ``inspect``, ``convert``, ``bench``, ``demo``.

One module per command (``ptool/cli/<command>.py``), each with ``add_arguments(parser)`` and
``run(args, ui) -> int``. This package imports nothing heavy: torch and friends load inside
``run``, so ``ptool --help`` is instant.

Error contract (the README's "Command line"):

- a :class:`ptool.PtoolError` prints ``ptool: error: <message>`` (one line) on stderr and exits with
  its ``exit_code``: 2 for bad usage (bad path, pass name, option, inputs), 1 for a failed conversion
  (a model torch.export cannot trace, a pass or backend that breaks numerics, a backend failure);
- argparse usage errors are one line too, exit 2;
- anything unexpected is one line plus a hint to re-run with ``--debug`` (which re-raises, showing
  the traceback), exit 1; Ctrl-C exits 130;
- warnings raised by ptool itself are shown as ``ptool: warning: ...`` lines after a successful
  run; third-party warnings and log chatter are hidden unless ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ptool.cli._ui import UI, one_line

__all__ = ["main", "build_parser", "COMMANDS"]

#: command -> (module, one-line help). Modules import lazily, but only ``argparse`` at top level.
COMMANDS: dict[str, tuple[str, str]] = {
    "passes": ("ptool.cli.passes", "list the registered passes"),
    "inspect": ("ptool.cli.inspect", "op histogram, norm / attention sites, parameters, FLOPs"),
    "convert": ("ptool.cli.convert", "transform a model and export it to ONNX"),
    "bench": ("ptool.cli.bench", "latency / memory / fidelity table across backends"),
    "tune": ("ptool.cli.tune", "autotune passes x backend x options within an error bound"),
    "demo": ("ptool.cli.demo", "convert the default model and compare torch, ONNX Runtime and TVM"),
}


class _UsageExit(Exception):
    """Raised instead of argparse's ``sys.exit(2)`` so ``main`` can return the code."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and do not exit the interpreter."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageExit(message, self.prog)


def build_parser() -> argparse.ArgumentParser:
    """The full parser (imports each command module; they are light)."""
    from ptool import __version__

    parser = _Parser(
        prog="ptool",
        description="Trace a PyTorch model, rewrite it with verified passes, lower it to ONNX Runtime or TVM.",
        epilog="MODEL is a path (.onnx, .pt2, a Hugging Face folder), module:function returning "
               "(model, example_inputs), or omitted for the embedded default (all-MiniLM-L6-v2 on real text).",
    )
    parser.add_argument("--version", action="version", version=f"ptool {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and third-party warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().split("\n\n")[0])
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks and third-party warnings")
        module.add_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _error(ui: UI, message: str) -> None:
    ui.err(f"ptool: error: {one_line(message)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ptool`` command line; returns the process exit code (never raises, unless --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ui = UI()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageExit as e:
        _error(ui, f"{e} (see '{e.prog} --help')")
        return 2
    except SystemExit as e:  # --help / --version
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if not getattr(args, "command", None):
        parser.print_help(sys.stdout)
        return 2
    debug = bool(getattr(args, "debug", False))
    ui.debug = debug
    module = importlib.import_module(args._module)

    from ptool.errors import PtoolError

    try:
        with ui.capture_noise():
            code = module.run(args, ui)
        ui.flush_warnings()
        return int(code or 0)
    except PtoolError as e:
        if debug:
            raise
        _error(ui, str(e))
        return e.exit_code
    except _UsageExit as e:  # a command validating its own arguments
        if debug:
            raise
        _error(ui, f"{e} (see '{e.prog} --help')")
        return 2
    except BrokenPipeError:  # `ptool ... | head`: the reader left; not an error worth a message
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        _error(ui, "interrupted")
        return 130
    except Exception as e:  # anything else is a ptool bug or an environment problem: one line, no traceback
        if debug:
            raise
        _error(ui, f"unexpected {type(e).__name__}: {one_line(str(e)) or '(no message)'} "
                   "(run with --debug for the traceback)")
        return 1
