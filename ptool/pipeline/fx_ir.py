"""A torch model through the pipeline: captured as an FX graph, transformed, verified in torch."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from ptool.ir.graph import node_count, parameter_count, refresh_meta, remove_unused_attributes
from ptool.passes.base import Pass, PassContext, PassResult
from ptool.pipeline.manager import VERIFY_BATCHES


class FxIR:
    """The torch IR: a ``torch.fx.GraphModule``; reference inputs are ``(args, kwargs)`` calls."""

    noun = "graph"
    rerun_unchanged = True

    def prepare(self, passes: Sequence[Pass]) -> None:
        """Every pass runs on torch graphs."""

    def run_pass(self, pass_: Pass, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = pass_.run(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        if result.changed:
            remove_unused_attributes(gm)
            refresh_meta(gm)
        return result

    def checked(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return gm  # linted and recompiled by run_pass

    def outputs(self, gm: torch.nn.Module, inputs: Sequence[tuple[tuple, dict]]) -> list:
        return run_reference(gm, inputs)

    def node_count(self, gm: torch.fx.GraphModule) -> int:
        return node_count(gm)

    def parameter_count(self, gm: torch.fx.GraphModule) -> int:
        return parameter_count(gm)


def run_reference(gm: torch.nn.Module, inputs: Sequence[tuple[tuple, dict]]) -> list:
    """Outputs of ``gm`` on every reference input (no grad)."""
    with torch.no_grad():
        return [gm(*args, **kwargs) for args, kwargs in inputs]


def transform_torch(loaded: Any, pipeline: Sequence[Pass], example_inputs: Any, example_kwargs: dict | None,
                    calibration: list[tuple[tuple, dict]] | None, *, dynamic_shapes: Any = None, verify: bool = True,
                    instruments: Sequence[Any] = (), copy_model: bool = True, fixpoint: bool = False) -> Any:
    """Capture a loaded torch model (module or ExportedProgram), run ``pipeline``, verify it.

    Returns:
        A :class:`ptool.transformed.TransformedModule` with ``.report``.
    """
    from ptool.frontends.loaders import ModelKind
    from ptool.frontends.torch_export import capture, from_exported_program
    from ptool.inputs import check_inputs
    from ptool.pipeline.manager import run_pipeline
    from ptool.report import Report
    from ptool.transformed import TransformedModule
    from ptool.verify import compare_many

    args, kwargs = check_inputs(example_inputs, example_kwargs)
    if loaded.kind is ModelKind.EXPORTED:
        captured = from_exported_program(loaded.obj)
    else:
        captured = capture(loaded.obj, args, kwargs, dynamic_shapes=dynamic_shapes, copy_model=copy_model)
    gm = captured.graph_module

    calib = calibration or []
    reference = [(args, kwargs), *itertools.islice(calib, VERIFY_BATCHES)] if verify else []
    ctx = PassContext(example_inputs=args, example_kwargs=kwargs, calibration=[a for a, _ in calib] if calib else None,
                      calibration_calls=calibration, instruments=instruments)
    start_outputs = run_reference(gm, reference) if reference else None
    records = run_pipeline(gm, pipeline, ctx, FxIR(), reference, reference_outputs=start_outputs, fixpoint=fixpoint)
    report = Report(records=records, capture=captured.method.value, verified_on=len(reference))
    if start_outputs is not None:
        report.total = compare_many(start_outputs, run_reference(gm, reference))
    return TransformedModule(gm, report, args, kwargs)
