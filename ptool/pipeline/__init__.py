"""The one pipeline: a loaded model, its passes, verification after each, the report.

:func:`transform` takes what ``ptool.frontends.loaders.load_model`` returns — a torch module, an
ExportedProgram or an ONNX model — and runs the passes on the model's IR through one pass manager
(:mod:`ptool.pipeline.manager`): a torch model as an FX graph (:mod:`ptool.pipeline.fx_ir`), an
ONNX model as an ``onnx_ir.Model`` (:mod:`ptool.pipeline.onnx_ir`). Both get the same verification,
instruments, report and skip reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ptool.passes.base import Pass


def transform(loaded: Any, pipeline: Sequence[Pass], example_inputs: Any, example_kwargs: dict | None,
              calibration: list[tuple[tuple, dict]] | None, *, dynamic_shapes: Any = None, verify: bool = True,
              instruments: Sequence[Any] = (), copy_model: bool = True, fixpoint: bool = False) -> Any:
    """Run ``pipeline`` on a loaded model in its own IR; return the drop-in module with ``.report``."""
    from ptool.frontends.loaders import ModelKind

    if loaded.kind is ModelKind.ONNX:
        from ptool.pipeline.onnx_ir import transform_onnx

        return transform_onnx(loaded.obj, pipeline, example_inputs, example_kwargs, calibration, verify=verify,
                              instruments=instruments, fixpoint=fixpoint)
    from ptool.pipeline.fx_ir import transform_torch

    return transform_torch(loaded, pipeline, example_inputs, example_kwargs, calibration,
                           dynamic_shapes=dynamic_shapes, verify=verify, instruments=instruments,
                           copy_model=copy_model, fixpoint=fixpoint)
