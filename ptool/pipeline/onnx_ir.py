"""An ONNX model through the pipeline: transformed *as ONNX*, verified on ONNX Runtime.

Converting an ONNX model back to torch would lose what the file is (its opset, its exact graph)
and is not possible in general, so the passes run on an ``onnx_ir.Model``: each pass's ONNX
implementation is looked up in :data:`ptool.passes.onnx.ONNX_IMPLEMENTATIONS`, and a pass that
only exists for torch graphs raises :class:`~ptool.errors.PassError` naming it before anything runs.

Verification runs real ONNX Runtime sessions with ORT's graph optimizations off, so a comparison
measures the pass's rewrite rather than fusions that may differ between two graphs; a pass that
reports no change is not re-run. A changed model must pass ``onnx.checker`` (the analogue of
``graph.lint()``). Before the passes, ptool measures the model's noise floor: how far ORT's own
graph optimizations (on vs off) move its outputs; exact passes are judged against it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from ptool.ir.onnx_graph import node_count, parameter_count
from ptool.passes.base import Pass, PassContext, PassResult
from ptool.pipeline.manager import VERIFY_BATCHES
from ptool.verify import Fidelity

#: Above this size the in-memory checker cannot serialize the model; ORT loading still checks it.
_CHECKER_MAX_BYTES = 1 << 30


class OnnxIR:
    """The ONNX IR: an ``onnx_ir.Model``; reference inputs are ORT feed dicts."""

    noun = "ONNX model"
    rerun_unchanged = False

    def prepare(self, passes: Sequence[Pass]) -> None:
        from ptool.passes.onnx import onnx_implementation

        for pass_ in passes:
            onnx_implementation(pass_)

    def run_pass(self, pass_: Pass, model: ir.Model, ctx: PassContext) -> PassResult:
        from ptool.passes.onnx import onnx_implementation

        return onnx_implementation(pass_)(pass_, model, ctx)

    def checked(self, model: ir.Model) -> Any:
        """Run ``onnx.checker`` on the model; return its ModelProto (or the IR model itself when it
        is too large to serialize in memory — ORT loading it is then the check)."""
        import onnx

        from ptool.ir.onnx_module import ir_weight_bytes

        if ir_weight_bytes(model) > _CHECKER_MAX_BYTES:
            return model
        proto = ir.to_proto(model)
        onnx.checker.check_model(proto)
        return proto

    def outputs(self, model: Any, inputs: Sequence[Mapping[str, np.ndarray]]) -> list[list]:
        return run_reference(model, inputs)

    def node_count(self, model: ir.Model) -> int:
        return node_count(model)

    def parameter_count(self, model: ir.Model) -> int:
        return parameter_count(model)


def run_reference(model: Any, inputs: Sequence[Mapping[str, np.ndarray]], *, optimize: bool = False) -> list[list]:
    """Outputs of ``model`` (``onnx_ir.Model`` or ``ModelProto``) under ONNX Runtime on every feed
    dict (graph optimizations off unless ``optimize``). The session is closed again: ORT holds a
    copy of every weight."""
    from ptool.ir.onnx_module import ort_session, run_session

    session = ort_session(model, optimize=optimize)
    return [run_session(session, dict(feeds)) for feeds in inputs]


def noise_floor(proto: Any, feeds: list[dict], reference: list[list]) -> Fidelity:
    """How far ONNX Runtime's own graph optimizations (Conv+BN fusion, GEMM re-layouts...) move the
    model's outputs: the float noise of the model itself, that verification judges exact passes
    against. ``reference``: the unoptimized outputs on ``feeds``."""
    from ptool.verify import compare_many

    return compare_many(reference, run_reference(proto, feeds, optimize=True))


def transform_onnx(
    proto: Any,
    pipeline: Sequence[Pass],
    example_inputs: Any,
    example_kwargs: dict | None,
    calibration: list[tuple[tuple, dict]] | None,
    *,
    verify: bool = True,
    instruments: Sequence[Any] = (),
    fixpoint: bool = False,
) -> Any:
    """Run ``pipeline`` on an ONNX model at ONNX level and return an ONNX-backed module.

    Args:
        proto: the ``onnx.ModelProto`` (not modified: passes work on an ``onnx_ir`` copy).
        pipeline: configured passes; each must have an ONNX implementation.
        example_inputs: positional inputs (graph-input order), a dict by input name, or None to
            synthesize them (``ptool.frontends.onnx_import.example_inputs_for``).
        example_kwargs: inputs by graph-input name.
        calibration: ``(args, kwargs)`` pairs; the first few are verification inputs too.
        verify: run ONNX Runtime before and after every pass and compare.
        instruments: objects with ``before_pass`` / ``after_pass`` hooks (given the ``onnx_ir.Model``).
        fixpoint: repeat the exact passes until nothing changes.

    Returns:
        A :class:`ptool.ir.onnx_module.OnnxTransformedModule` with ``.report`` (``capture="onnx"``).

    Raises:
        PassError: a pass has no ONNX implementation. InputError: inputs do not fit the graph.
        VerificationError: an exact pass changed the outputs.
    """
    from ptool.frontends.onnx_import import example_call
    from ptool.ir.onnx_module import OnnxTransformedModule, feeds_from_call, input_specs, to_torch
    from ptool.pipeline.manager import run_pipeline
    from ptool.report import Report
    from ptool.verify import compare_many

    onnx_ir = OnnxIR()
    onnx_ir.prepare(pipeline)  # fail fast, before any work
    specs = input_specs(proto)
    feeds = example_call(proto, example_inputs, example_kwargs)
    calib = list(calibration or [])
    calib_feeds = [feeds_from_call(specs, a, k) for a, k in itertools.islice(calib, VERIFY_BATCHES)]
    reference = [feeds, *calib_feeds] if verify else []

    example_args = tuple(to_torch(v) for v in feeds.values())
    ctx = PassContext(example_inputs=example_args, example_kwargs={},
                      calibration=[a for a, _ in calib] if calib else None, calibration_calls=calib,
                      instruments=instruments)

    model = ir.from_proto(proto)
    start_outputs, noise = None, None
    if reference:
        start_outputs = run_reference(proto, reference)
        noise = noise_floor(proto, reference, start_outputs)
    records = run_pipeline(model, pipeline, ctx, onnx_ir, reference, reference_outputs=start_outputs,
                           noise_floor=noise.max_abs_error if noise else 0.0, fixpoint=fixpoint)
    module = OnnxTransformedModule(model, Report(records=records, capture="onnx", verified_on=len(reference),
                                                 noise=noise), example_args, {})
    if start_outputs is not None:  # the whole model as the user will run it: ORT's optimizations on
        module.report.total = compare_many(start_outputs, run_reference(model, reference, optimize=True))
    return module
