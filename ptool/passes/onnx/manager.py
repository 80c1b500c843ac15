"""The ONNX pass manager: run a pipeline on an ``onnx_ir.Model`` and verify after every pass.

Same contract as the torch manager (``ptool/passes/manager.py``): passes run in list order; for
each one it times the run, counts nodes and weight elements before/after, counts sites
rewritten/skipped, checks the result is a valid model (``onnx.checker``, the ONNX analogue of
``graph.lint()``), and — with reference inputs — runs a real ONNX Runtime session on the pass's
output and compares it with the outputs of the pass's *input* model. An exact pass that drifts past
its declared tolerance raises :class:`~ptool.errors.VerificationError` naming the pass and the
passes before it; an approximate pass has its fidelity recorded with a ``within_contract`` flag.

Verification sessions run with ORT's graph optimizations off, so the comparison measures the
pass's rewrite rather than ORT fusions that may differ between the two graphs.

Counting conventions (the report's "nodes" and "params" columns): nodes are all nodes in the graph
and its subgraphs except ``Constant`` (data, like a torch ``get_attr``); params are the elements of
floating-point initializers and ``Constant`` tensors.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from ptool.errors import PtoolError, VerificationError, first_line
from ptool.passes.base import Pass, PassContext
from ptool.passes.manager import judge
from ptool.report import PassRecord
from ptool.verify import Fidelity

ReferenceInputs = Sequence[Mapping[str, np.ndarray]]

#: Above this size the in-memory checker cannot serialize the model; ORT loading still checks it.
_CHECKER_MAX_BYTES = 1 << 30


def node_count(model: ir.Model) -> int:
    """Nodes in the graph and its subgraphs, ``Constant`` nodes excluded."""
    return sum(1 for node in model.graph.all_nodes() if not (node.op_type == "Constant" and node.domain in ("", "ai.onnx")))


def parameter_count(model: ir.Model) -> int:
    """Elements of floating-point weights: initializers and ``Constant`` tensors."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            total += tensor.size
    for node in model.graph.all_nodes():
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value.dtype.is_floating_point():
                total += attr.value.size
    return total


def run_reference(model: ir.Model | Any, inputs: ReferenceInputs) -> list[list]:
    """Outputs of ``model`` (``onnx_ir.Model`` or ``ModelProto``) under ONNX Runtime, graph
    optimizations off, on every feed dict."""
    from ptool.onnx_module import ort_session, run_session

    session = ort_session(model, optimize=False)
    return [run_session(session, dict(feeds)) for feeds in inputs]


def _checked(model: ir.Model) -> ir.Model | Any:
    """Run ``onnx.checker`` on the model; return its ModelProto (or the IR model itself when it
    is too large to serialize in memory — ORT loading it is then the check)."""
    import onnx

    from ptool.onnx_module import ir_weight_bytes

    if ir_weight_bytes(model) > _CHECKER_MAX_BYTES:
        return model
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    return proto


def run_onnx_pipeline(
    model_ir: ir.Model,
    passes: Sequence[Pass],
    ctx: PassContext,
    reference_inputs: ReferenceInputs = (),
    *,
    reference_outputs: list | None = None,
    noise_floor: float = 0.0,
) -> list[PassRecord]:
    """Run ``passes`` on ``model_ir`` in order, mutating it; return one record per pass.

    Args:
        model_ir: the ONNX IR model to transform (mutated in place).
        passes: configured passes, run exactly in this order; each needs an ONNX implementation.
        ctx: calibration data and instruments (``before_pass(i, pass_, model)``,
            ``after_pass(i, pass_, model, record)``).
        reference_inputs: ORT feed dicts to verify numerics on; empty disables the checks.
        reference_outputs: the outputs of ``model_ir`` on ``reference_inputs``, if the caller
            already has them (saves one ORT session).
        noise_floor: the model's own float noise (max abs): exact passes are allowed
            :data:`ptool.verify.NOISE_FACTOR` times it (see :func:`ptool.passes.manager.judge`).

    Raises:
        PassError: a pass has no ONNX implementation.
        VerificationError: an exact pass changed the outputs beyond its tolerance, or produced a
            model ONNX Runtime cannot run.
        PtoolError: a pass failed or produced an invalid model; the message names it.
    """
    from ptool.passes.onnx import onnx_implementation

    implementations = [onnx_implementation(p) for p in passes]  # fail before running anything
    records: list[PassRecord] = []
    outputs = None
    if reference_inputs:
        outputs = reference_outputs if reference_outputs is not None else run_reference(model_ir, reference_inputs)
    for index, (pass_, impl) in enumerate(zip(passes, implementations)):
        spec = pass_.spec()
        ran = ", ".join(p.spec() for p in passes[:index]) or "none"
        for inst in ctx.instruments:
            getattr(inst, "before_pass", lambda *a: None)(index, pass_, model_ir)
        nodes_before, params_before = node_count(model_ir), parameter_count(model_ir)
        start = time.perf_counter()
        try:
            result = impl(pass_, model_ir, ctx)
        except PtoolError:
            raise
        except Exception as e:
            raise PtoolError(
                f"pass '{spec}' failed on the ONNX model ({type(e).__name__}: {first_line(e)}); passes already run: {ran}"
            ) from e
        seconds = time.perf_counter() - start
        fidelity, violation = None, None
        if not (result.changed or result.rewritten):  # same model, same outputs: no check, no ORT session
            fidelity = Fidelity.perfect() if outputs is not None else None
        else:
            try:
                checked = _checked(model_ir)
            except Exception as e:
                raise PtoolError(
                    f"pass '{spec}' produced an invalid ONNX model ({first_line(e)}); passes already run: {ran}"
                ) from e
        if outputs is not None and fidelity is None:
            try:
                new_outputs = run_reference(checked, reference_inputs)
            except Exception as e:
                raise VerificationError(
                    f"pass '{spec}' produced an ONNX model that ONNX Runtime cannot run: {first_line(e)}"
                ) from e
            fidelity, violation = judge(pass_, outputs, new_outputs, ran, noise_floor)
            outputs = new_outputs

        record = PassRecord.of(pass_, result, seconds=seconds, nodes=(nodes_before, node_count(model_ir)),
                               params=(params_before, parameter_count(model_ir)), fidelity=fidelity,
                               violation=violation)
        records.append(record)
        for inst in ctx.instruments:
            getattr(inst, "after_pass", lambda *a: None)(index, pass_, model_ir, record)
    return records
