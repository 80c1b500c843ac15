"""The pass manager: run a pipeline in list order and verify after every pass.

For each pass it times the run, counts compute nodes and weight elements before/after, counts
sites rewritten/skipped, lints and recompiles the graph, refreshes shape metadata, and — with
reference inputs — compares the outputs with those of the pass's *input* graph. An exact pass
that drifts past its declared tolerance raises :class:`~ptool.errors.VerificationError` naming the
pass and the passes that ran before it; an approximate pass has its fidelity recorded (and a
``within_contract`` flag and a warning when it misses its own bound), because the user or the autotuner
decides what is acceptable (``ptool convert`` refuses to write such a model without ``--accept-lossy``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import torch
import torch.fx

from ptool.errors import PtoolError, VerificationError, first_line
from ptool.ir.graph import node_count, parameter_count, refresh_meta, remove_unused_attributes
from ptool.passes.base import Pass, PassContext
from ptool.report import PassRecord
from ptool.verify import compare_many

ReferenceInputs = Sequence[tuple[tuple, dict]]


def run_reference(gm: torch.nn.Module, inputs: ReferenceInputs) -> list:
    """Outputs of ``gm`` on every reference input (no grad)."""
    with torch.no_grad():
        return [gm(*args, **kwargs) for args, kwargs in inputs]


def judge(pass_: Pass, before: list, after: list, ran: str, noise_floor: float = 0.0) -> tuple:
    """Compare outputs after a pass with those before it; raise if an exact pass drifted.

    ``noise_floor``: how far the model's outputs move under a mere re-ordering of its float
    arithmetic (max abs); an exact pass may move them by :data:`ptool.verify.NOISE_FACTOR` times it.

    Returns:
        ``(fidelity, violation)``: the comparison and the contract violation (None if kept).

    Raises:
        VerificationError: an exact pass broke its tolerance (names the pass and those before it).
    """
    fidelity = compare_many(before, after)
    violation = pass_.numerics.violation(fidelity, noise_floor)
    if violation and pass_.numerics.exact:
        raise VerificationError(
            f"exact pass '{pass_.spec()}' changed the outputs: {violation} (passes before it: {ran})"
        )
    if violation:  # an approximate pass past its own bound: the model is returned, the user is told
        warnings.warn(f"approximate pass '{pass_.spec()}' missed its declared bound {pass_.numerics}: {violation}; "
                      "the model is returned (report row 'ok' = NO)", stacklevel=2)
    return fidelity, violation


def run_pipeline(
    gm: torch.fx.GraphModule,
    passes: Sequence[Pass],
    ctx: PassContext,
    *,
    reference_inputs: ReferenceInputs = (),
) -> list[PassRecord]:
    """Run ``passes`` on ``gm`` in order, mutating it; return one record per pass.

    Args:
        gm: the graph to transform (mutated in place).
        passes: configured passes, run exactly in this order.
        ctx: calibration data and instruments for the passes.
        reference_inputs: ``(args, kwargs)`` pairs to verify numerics on; empty disables checks.

    Raises:
        VerificationError: an exact pass changed the outputs beyond its tolerance.
        PtoolError: a pass failed; the message names it.
    """
    records: list[PassRecord] = []
    outputs = run_reference(gm, reference_inputs) if reference_inputs else None
    for index, pass_ in enumerate(passes):
        spec = pass_.spec()
        for inst in ctx.instruments:
            getattr(inst, "before_pass", lambda *a: None)(index, pass_, gm)
        nodes_before, params_before = node_count(gm), parameter_count(gm)
        start = time.perf_counter()
        try:
            result = pass_.run(gm, ctx)
            gm.graph.lint()
            gm.recompile()
            if result.changed:
                remove_unused_attributes(gm)
                refresh_meta(gm)
        except PtoolError:
            raise
        except Exception as e:
            ran = ", ".join(p.spec() for p in passes[:index]) or "none"
            raise PtoolError(
                f"pass '{spec}' failed ({type(e).__name__}: {first_line(e)}); passes already run: {ran}"
            ) from e
        seconds = time.perf_counter() - start

        fidelity, violation = None, None
        if outputs is not None:
            try:
                new_outputs = run_reference(gm, reference_inputs)
            except Exception as e:
                raise VerificationError(
                    f"pass '{spec}' produced a graph that no longer runs: {type(e).__name__}: {first_line(e)}"
                ) from e
            ran = ", ".join(p.spec() for p in passes[:index]) or "none"
            fidelity, violation = judge(pass_, outputs, new_outputs, ran)
            outputs = new_outputs

        record = PassRecord.of(pass_, result, seconds=seconds, nodes=(nodes_before, node_count(gm)),
                               params=(params_before, parameter_count(gm)), fidelity=fidelity, violation=violation)
        records.append(record)
        for inst in ctx.instruments:
            getattr(inst, "after_pass", lambda *a: None)(index, pass_, gm, record)
    return records
