"""Errors ptool raises at its boundary.

Every user-facing failure is one of these, with a one-line message that says what is wrong and
what is allowed; the CLI prints ``str(err)`` and exits with ``err.exit_code``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PtoolError(Exception):
    """Base class: a failure the user can act on (bad input, a pass that broke numerics, ...)."""

    exit_code = 1


class UsageError(PtoolError, ValueError):
    """Bad input from the user: a wrong path, a wrong shape, a bad option."""

    exit_code = 2


class PassError(UsageError):
    """An unknown pass name, an unknown option, or a bad option value."""


class ModelLoadError(UsageError):
    """A model path or object that ptool cannot load (missing file, bad folder, invalid ONNX)."""


class InputError(UsageError):
    """Example inputs that do not fit the model (wrong count, shape or dtype)."""


class TraceError(PtoolError):
    """The model could not be captured as a graph (torch.export and the fallback both failed)."""


class VerificationError(PtoolError):
    """A pass or backend broke its numerics contract; the message names the culprit."""


class BackendError(PtoolError):
    """A backend could not lower, build or run the model."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception message, cut at ``limit`` (errors stay one line)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(err).__name__
