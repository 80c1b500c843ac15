"""The user's example call and calibration data, normalized once at the edge.

Every entry point (``transform``, ``export_onnx``, ``compile``, the backends, the tuner) takes a
model's inputs the same way; these are the checks they share.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ptool.errors import InputError


def check_inputs(example_inputs: object, example_kwargs: object) -> tuple[tuple, dict]:
    """Normalize one example call to ``(tuple, dict)``: ``(x,)``, ``[x]`` or a bare tensor.

    The one input check every entry point (transform, export, backends) shares.

    Raises:
        InputError: anything else, or no inputs at all.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif example_inputs is None:
        example_inputs = ()
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(
            f"example_inputs must be a tuple of tensors (e.g. (x,)), not {type(example_inputs).__name__}"
        )
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise InputError(f"example_kwargs must be a dict, not {type(example_kwargs).__name__}")
    example_kwargs = dict(example_kwargs or {})
    if not example_inputs and not example_kwargs:
        raise InputError("example inputs are required to trace a torch model: pass example_inputs=(x,)")
    return example_inputs, example_kwargs


def calibration_call(item: Any) -> tuple[tuple, dict]:
    """One calibration item -> (args, kwargs).

    Accepted: a tensor, a tuple/list of positional inputs, a dict of keyword inputs, or an
    ``(args_tuple, kwargs_dict)`` pair for models called with both.
    """
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple) and isinstance(item[1], dict):
        return item[0], dict(item[1])
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, dict):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise InputError(
        f"calibration items must be tensors, tuples of tensors or dicts of keyword inputs, not {type(item).__name__}"
    )


def materialize_calibration(calibration: Iterable | None) -> list[tuple[tuple, dict]] | None:
    """``calibration=`` as a list of ``(args, kwargs)`` calls (None stays None).

    Raises:
        InputError: not iterable, empty, or an item of another kind.
    """
    if calibration is None:
        return None
    try:
        items = list(calibration)
    except TypeError:
        raise InputError("calibration= must be an iterable of input tuples or a DataLoader") from None
    if not items:
        raise InputError("calibration= is empty: give at least one input tuple")
    return [calibration_call(i) for i in items]
