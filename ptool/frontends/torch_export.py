"""Capture a torch model as ptool's IR: an unlifted, trainable ``torch.fx.GraphModule``.

Order of attempts (the first that works wins; the report records which one):

1. ``torch.export.export(model, args, kwargs, strict=False)`` then ``ep.module()``: pre-dispatch
   ATen ops, parameters and buffers as ``get_attr`` of the original module hierarchy, the
   original call signature and output structure (pytree specs), FakeTensor metadata on every node.
2. ``torch.export.export(..., strict=True)`` (TorchDynamo): takes some Python that non-strict
   tracing cannot.
3. Fallback for models neither can take (data-dependent Python control flow such as
   ``if x.sum() > 0``): ``torch.export.draft_export`` traces the model *on the example inputs*,
   using their real values where export would need a guess. Control flow is specialized to those
   inputs and a runtime assertion guards the choice, so an input that would take another branch
   fails loudly instead of computing the wrong thing. ptool warns when it uses this path.

If all fail, :class:`~ptool.errors.TraceError` carries the first line of torch.export's error.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from ptool.errors import InputError, TraceError, first_line
from ptool.inputs import check_inputs


class CaptureMethod(str, enum.Enum):
    EXPORT = "torch.export"
    EXPORT_STRICT = "torch.export(strict)"
    DRAFT_EXPORT = "torch.export.draft_export (specialized to the example inputs)"


@dataclass
class Captured:
    """A captured graph and how it was obtained."""

    graph_module: torch.fx.GraphModule
    method: CaptureMethod
    exported_program: torch.export.ExportedProgram | None = None


def export_program(
    model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: object = None, *, strict: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export.export`` with ptool's defaults (non-strict, no grad).

    Dynamic dims whose range the model itself narrows (a 512-position embedding caps ``seq``) are
    narrowed as torch.export suggests and the export retried once: the dims stay open within what
    the model can run.
    """
    with torch.no_grad():
        try:
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
        except Exception as e:
            if dynamic_shapes is None or "Suggested fixes" not in str(e):
                raise
            from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

            fixes = str(e).split("Suggested fixes:", 1)[1].splitlines()
            fixes = "Suggested fixes:\n" + "\n".join(f for f in fixes if " = " in f)  # the parser takes only these
            refined = refine_dynamic_shapes_from_suggested_fixes(fixes, dynamic_shapes)
            return torch.export.export(model, args, kwargs, dynamic_shapes=refined, strict=strict)


def _validate_call(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Run the model once so that wrong example inputs fail with a clear message, not mid-trace."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # the user's model rejected the inputs: say so in one line
        shapes = ", ".join(
            f"{tuple(a.shape)}:{str(a.dtype).removeprefix('torch.')}" if isinstance(a, torch.Tensor) else type(a).__name__
            for a in (*args, *kwargs.values())
        )
        raise InputError(
            f"the model fails on the example inputs ({shapes}): {type(e).__name__}: {first_line(e)}"
        ) from None


def capture(
    model: nn.Module,
    example_inputs: tuple,
    example_kwargs: dict | None = None,
    *,
    dynamic_shapes: object = None,
    copy_model: bool = True,
) -> Captured:
    """Capture ``model`` as an unlifted GraphModule (see module docstring for the fallbacks).

    Args:
        model: the user's module. With ``copy_model`` (the default) it is deep-copied first, so the
            graph owns its weights and the user's object is never touched. Without, the graph
            *shares* the module's parameter and buffer objects (no second copy of the weights:
            what big models need); passes never write into weights in place, but training passes
            (attention conversion, repbn's fine-tune) update the shared parameters. The module's
            train/eval flags are restored either way.
        example_inputs / example_kwargs: one example call.
        dynamic_shapes: as in ``torch.export.export``.
        copy_model: deep-copy ``model`` first (see above).

    Raises:
        InputError: the model does not run on the example inputs.
        TraceError: no capture method worked.
    """
    args, kwargs = check_inputs(example_inputs, example_kwargs)
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if copy_model:
        model = copy.deepcopy(model)
    with _eval_mode(model):
        return _capture_eval(model, args, kwargs, dynamic_shapes)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode; restore every submodule's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _capture_eval(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: object) -> Captured:
    _validate_call(model, args, kwargs)

    errors = []
    for strict, method in ((False, CaptureMethod.EXPORT), (True, CaptureMethod.EXPORT_STRICT)):
        try:
            ep = export_program(model, args, kwargs, dynamic_shapes, strict=strict)
            return Captured(ep.module(), method, ep)
        except Exception as e:  # torch raises many types here; we report the first one
            errors.append(e)
            if dynamic_shapes is not None and "constraint" in str(e).lower():
                raise TraceError(f"torch.export rejected dynamic_shapes: {first_line(e)}") from None

    try:
        with torch.no_grad():
            ep = torch.export.draft_export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
        warnings.warn(
            "torch.export could not capture the model "
            f"({first_line(errors[0])}); traced with draft_export, which specializes Python control "
            "flow to the example inputs (other branches raise at run time)",
            stacklevel=3,
        )
        return Captured(ep.module(), CaptureMethod.DRAFT_EXPORT, ep)
    except Exception:
        raise TraceError(
            f"torch.export cannot trace this model: {first_line(errors[0])} — make the forward "
            "export-friendly (no data-dependent Python control flow) or pass an ExportedProgram"
        ) from None


def from_exported_program(ep: torch.export.ExportedProgram) -> Captured:
    """Use an ExportedProgram (e.g. a loaded ``.pt2``) as the IR."""
    return Captured(ep.module(), CaptureMethod.EXPORT, ep)
