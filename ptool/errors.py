"""Errors ptool raises at its boundary.

Every user-facing failure is one of these, with a one-line message that says what is wrong and
what is allowed; the CLI prints ``str(err)`` and exits with ``err.exit_code``.
"""

from __future__ import annotations

import difflib
import re
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


_ORT_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)'")
_ORT_PREFIX = re.compile(r"^.*\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"^/\S+:\d+ [^(]*\([^)]*\)\s*(?:const\s*)?")


def onnxruntime_failure(err: BaseException, limit: int = 300) -> str:
    """ONNX Runtime's multi-line C++ error as one line naming the node that failed.

    ``[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Resize node.
    Name:'/model.10/Resize' Status Message: /onnxruntime_src/...cc:87 virtual ... Shape mismatch ...``
    becomes ``node '/model.10/Resize' (Resize): Shape mismatch ...`` — the innermost node when a
    subgraph (If / Loop) failed.
    """
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    nodes = _ORT_NODE.findall(text)
    detail = text.rsplit("Status Message:", 1)[-1].strip() if nodes else text
    detail = _ORT_SOURCE.sub("", _ORT_PREFIX.sub("", detail)).strip() or type(err).__name__
    if nodes:
        op, name = nodes[-1]
        detail = f"node '{name}' ({op}): {detail}" if name else f"an unnamed {op} node: {detail}"
    return detail[:limit]
