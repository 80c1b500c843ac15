"""``--input NAME=SHAPE[:DTYPE]`` and ``--inputs FILE.npz``: the inputs a command runs the model on.

Every command that runs a model (``inspect``, ``convert``, ``bench``, ``tune``) takes them:

- ``--inputs FILE.npz``: arrays by input name (``numpy.savez``), used as they are;
- ``--input NAME=SHAPE[:DTYPE]`` (repeatable): make that input up at this shape, e.g.
  ``--input images=1x3x640x640`` or ``--input input_ids=1x64:int64``; ``NAME=`` alone is a scalar;
- ``--calibration FILE.npz``: calibration batches, N samples per input stacked on a new first axis
  (inputs it leaves out keep the example's value in every batch).

For an ONNX file, inputs named by neither are made up from the graph's declared types, a symbolic
dim taking the size the same dim name got from a given input (``batch``, ``seq_len``); for a torch
model they keep the example the model came with. ptool says on stderr which inputs it made up.
The text is parsed here, once; what reaches the frontends is names, shapes and arrays.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptool.errors import UsageError

__all__ = ["InputShape", "add_input_arguments", "calibration_calls", "parse_input_shape", "load_npz"]

_SPEC = re.compile(r"^(?P<name>[^=]+)=(?P<shape>[^:]*)(?::(?P<dtype>\w+))?$")
_FORM = "NAME=SHAPE[:DTYPE], e.g. images=1x3x640x640 or input_ids=1x128:int64 (NAME= for a scalar)"


@dataclass(frozen=True)
class InputShape:
    """One ``--input``: make up input ``name`` with this shape (and dtype, when stated)."""

    name: str
    shape: tuple[int, ...]
    dtype: Any = None  # numpy dtype, or None: the model's


def parse_input_shape(text: str) -> InputShape:
    """``"images=1x3x640x640:float32"`` -> :class:`InputShape`.

    Raises:
        UsageError: not of the form NAME=SHAPE[:DTYPE], a dim that is not a positive integer, or an
            unknown dtype.
    """
    import numpy as np

    m = _SPEC.match(text.strip())
    if not m:
        raise UsageError(f"--input '{text}' is not {_FORM}")
    dims = [d for d in re.split(r"[x,]", m["shape"].replace(" ", "")) if d] if m["shape"] else []
    if any(not d.isdigit() or int(d) < 1 for d in dims):
        raise UsageError(f"--input '{text}': every dim must be a positive integer ({_FORM})")
    dtype = None
    if m["dtype"]:
        try:
            dtype = np.dtype(m["dtype"])
        except TypeError:
            raise UsageError(f"--input '{text}': unknown dtype '{m['dtype']}' (e.g. float32, float16, int64, "
                             "int32, uint8, bool)") from None
    return InputShape(m["name"].strip(), tuple(int(d) for d in dims), dtype)


def load_npz(path: str) -> dict[str, Any]:
    """The arrays of an ``.npz`` file by name (read eagerly; object arrays refused).

    Raises:
        UsageError: a missing or unreadable file, or one with no arrays.
    """
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--inputs '{path}' does not exist or is not a file")
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as e:
        raise UsageError(f"--inputs '{path}' is not a readable .npz file of arrays ({type(e).__name__}: {e})") from None
    if not arrays:
        raise UsageError(f"--inputs '{path}' holds no arrays")
    return arrays


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:DTYPE]",
                   help="make up this input at this shape (repeatable), e.g. images=1x3x640x640; "
                        "symbolic dims of the other inputs follow it")
    p.add_argument("--inputs", metavar="FILE.npz", default=None,
                   help="run the model on these arrays (numpy.savez, one array per input name)")
    p.add_argument("--calibration", metavar="FILE.npz", default=None,
                   help="calibration batches for passes that need data (quantize:mode=int8-static ...): per input "
                        "name, N samples stacked on a new first axis (N calls); inputs left out keep the example's")


def calibration_calls(arrays: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """``{name: (N, *shape) array}`` -> N dicts ``{name: array of shape}``.

    Raises:
        UsageError: arrays with different sample counts, or a scalar (no sample axis).
    """
    counts = {name: (a.shape[0] if a.ndim else None) for name, a in arrays.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        raise UsageError(f"--calibration '{path}': every array needs the same number of samples on its first axis "
                         f"(got {', '.join(f'{n}: {c}' for n, c in counts.items())})")
    count = next(iter(counts.values()))
    return [{name: a[i] for name, a in arrays.items()} for i in range(count)]
