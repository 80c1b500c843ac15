"""``ptool convert --dynamic batch,seq``: which input dims the written ONNX file leaves open.

Items, comma-separated:

- ``batch``: axis 0 of every tensor input;
- ``seq``: axis 1 of every tensor input of rank >= 2 (token ids, masks, hidden states);
- ``NAME:AXIS`` or ``NAME:AXIS=DIM``: that axis of that input, as the dim ``DIM`` (inputs given the
  same ``DIM`` share it).

torch.export specializes a dim whose example size is 1 (it cannot tell it from a broadcast), so an
example of size 1 on a dynamic axis is repeated to size 2 for the capture; the model's results on
the original example are unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ptool.errors import UsageError

_ITEM = re.compile(r"^(?P<name>[A-Za-z_]\w*):(?P<axis>\d+)(?:=(?P<dim>[A-Za-z_]\w*))?$")
_FORM = "batch, seq, or NAME:AXIS[=DIM] (e.g. --dynamic batch,seq or --dynamic pixel_values:2=height)"


@dataclass(frozen=True)
class DynamicAxis:
    """One open dim: ``input`` None means every tensor input (of rank > ``axis``)."""

    input: str | None
    axis: int
    dim: str


def parse_dynamic(text: str) -> list[DynamicAxis]:
    """``"batch,seq"`` -> the axes. Raises UsageError for an item of another form."""
    axes = []
    for item in (t.strip() for t in text.split(",")):
        if item == "batch":
            axes.append(DynamicAxis(None, 0, "batch"))
        elif item == "seq":
            axes.append(DynamicAxis(None, 1, "seq"))
        elif m := _ITEM.match(item):
            axes.append(DynamicAxis(m["name"], int(m["axis"]), m["dim"] or f"{m['name']}_{m['axis']}"))
        else:
            raise UsageError(f"--dynamic item '{item}' is not {_FORM}")
    return axes


def dynamic_call(axes: list[DynamicAxis], names: list[str], args: tuple, kwargs: dict) -> tuple[tuple, dict, dict]:
    """The example call (size-1 dynamic axes repeated to 2) and ``dynamic_shapes`` for it, keyed by
    the forward parameter names (``names`` for the positional args).

    Raises:
        UsageError: an input name the model does not take, or an axis past an input's rank.
    """
    import torch

    values = {**dict(zip(names, args)), **kwargs}
    for a in axes:
        if a.input is not None:
            if a.input not in values:
                raise UsageError(f"--dynamic names input '{a.input}', which the model does not take "
                                 f"(inputs: {', '.join(values)})")
            t = values[a.input]
            if not isinstance(t, torch.Tensor) or t.dim() <= a.axis:
                raise UsageError(f"--dynamic {a.input}:{a.axis}: input '{a.input}' has no axis {a.axis}")
    dims: dict[str, Any] = {}
    shapes: dict[str, dict[int, Any]] = {}
    for name, t in values.items():
        if not isinstance(t, torch.Tensor):
            continue
        for a in axes:
            if (a.input is None or a.input == name) and t.dim() > a.axis:
                dims.setdefault(a.dim, torch.export.Dim(a.dim))
                shapes.setdefault(name, {})[a.axis] = dims[a.dim]
                if t.shape[a.axis] == 1:
                    t = torch.cat([t, t], dim=a.axis)
        values[name] = t
    new_args = tuple(values[n] for n in names[: len(args)])
    new_kwargs = {k: values[k] for k in kwargs}
    if not shapes:
        raise UsageError("--dynamic opens no dim: the model has no tensor input with such an axis")
    return new_args, new_kwargs, {n: shapes.get(n) for n in values}
