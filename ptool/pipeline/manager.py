"""The pass manager: run a pipeline in list order and verify after every pass, on either IR.

One loop for a torch graph and an ONNX model alike. For each pass it times the run, counts compute
nodes and weight elements before/after, counts sites rewritten/skipped, checks the result is a
well-formed model of its IR, and — with reference inputs — compares the outputs with those of the
pass's *input* model. An exact pass that drifts past its declared tolerance (or
:data:`ptool.verify.NOISE_FACTOR` times the model's own float noise) raises
:class:`~ptool.errors.VerificationError` naming the pass and the passes that ran before it; an
approximate pass has its fidelity recorded (with a violation, and a warning, when it misses its own
bound), because the user or the autotuner decides what is acceptable (``ptool convert`` refuses to
write such a model without ``--accept-lossy``). After other approximate passes, an approximate pass
that misses its bound against its input still keeps it if the error against the untransformed model
grew by no more than the bound allows: against its input it also meets the earlier passes' noise
(``precision`` after ``quantize``: a bf16 rounding flips an int8 activation level).

What differs between the IRs — how a pass runs on it, how the result is checked and run, how nodes
and weights are counted — is an :class:`IR` (``ptool/pipeline/fx_ir.py``,
``ptool/pipeline/onnx_ir.py``); instruments get the model of whichever IR it is.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

from ptool.errors import PtoolError, VerificationError, first_line
from ptool.passes.base import Pass, PassContext, PassResult
from ptool.report import PassRecord
from ptool.verify import Fidelity, Lossy, compare_many


class IR(Protocol):
    """What the pass manager needs of one IR. ``model`` is the IR's mutable model object."""

    #: How a model of this IR is named in messages ("graph", "ONNX model").
    noun: str
    #: Re-run the model after a pass that reports no change (cheap for a torch graph, which a pass
    #: may also change through its weights; an ONNX Runtime session per pass is not).
    rerun_unchanged: bool

    def prepare(self, passes: Sequence[Pass]) -> None:
        """Fail before anything runs if a pass cannot run on this IR (PassError)."""

    def run_pass(self, pass_: Pass, model: Any, ctx: PassContext) -> PassResult:
        """Run one pass on ``model`` in place, leaving a well-formed model (lint, recompile...)."""

    def checked(self, model: Any) -> Any:
        """``model`` after a pass that changed it, validated and ready to run (raises when invalid)."""

    def outputs(self, runnable: Any, inputs: Sequence[Any]) -> list:
        """The outputs of ``runnable`` on every reference input."""

    def node_count(self, model: Any) -> int: ...

    def parameter_count(self, model: Any) -> int: ...


def judge(pass_: Pass, before: list, after: list, ran: str, noise_floor: float = 0.0,
          original: list | None = None) -> tuple:
    """Compare outputs after a pass with those before it; raise if an exact pass drifted.

    ``noise_floor``: how far the model's outputs move under a mere re-ordering of its float
    arithmetic (max abs); an exact pass may move them by :data:`ptool.verify.NOISE_FACTOR` times it.
    ``original``: the untransformed model's outputs, given when earlier approximate passes changed
    the model: an approximate pass that misses its bound against its input still keeps it when the
    error against these grew by no more than its bound allows (:meth:`ptool.verify.Lossy.adds_within`).

    Returns:
        ``(fidelity, violation)``: the comparison and the contract violation (None if kept).

    Raises:
        VerificationError: an exact pass broke its tolerance (names the pass and those before it).
    """
    fidelity = compare_many(before, after)
    violation = pass_.numerics.violation(fidelity, noise_floor)
    if violation and original is not None and isinstance(pass_.numerics, Lossy):
        if pass_.numerics.adds_within(compare_many(original, before), compare_many(original, after)):
            violation = None
    if violation and pass_.numerics.exact:
        raise VerificationError(
            f"exact pass '{pass_.spec()}' changed the outputs: {violation} (passes before it: {ran})"
        )
    if violation:  # an approximate pass past its own bound: the model is returned, the user is told
        warnings.warn(f"approximate pass '{pass_.spec()}' missed its declared bound {pass_.numerics}: {violation}; "
                      "the model is returned (report row 'ok' = NO)", stacklevel=2)
    return fidelity, violation


def _hook(instrument: Any, name: str) -> Any:
    return getattr(instrument, name, lambda *a: None)


def run_pipeline(
    model: Any,
    passes: Sequence[Pass],
    ctx: PassContext,
    ir: IR,
    reference_inputs: Sequence[Any] = (),
    *,
    reference_outputs: list | None = None,
    noise_floor: float = 0.0,
    fixpoint: bool = False,
) -> list[PassRecord]:
    """Run ``passes`` on ``model`` in order, mutating it; return one record per pass run.

    With ``fixpoint``, the exact passes then run again, in order, while a round still rewrites
    something (at most :data:`MAX_ROUNDS` rounds in all): one fold can expose another (a merge after
    a BatchNorm fold, a fold after a merge). Rows of later rounds carry their round number; a pass
    that rewrites nothing in a later round adds a row only when the sites it skips changed (a
    BatchNorm merged away is no longer reported as skipped).

    Args:
        model: the model to transform (mutated in place): a ``torch.fx.GraphModule`` or an
            ``onnx_ir.Model``, as ``ir`` says.
        passes: configured passes, run exactly in this order.
        ctx: calibration data and instruments (``before_pass(i, pass_, model)``,
            ``after_pass(i, pass_, model, record)``).
        ir: the IR ``model`` is in.
        reference_inputs: inputs to verify numerics on, in the IR's form; empty disables checks.
        reference_outputs: the outputs of ``model`` on them, if the caller already has them.
        noise_floor: the model's own float noise (max abs), see :func:`judge`.
        fixpoint: repeat the exact passes until nothing changes (see above).

    Raises:
        PassError: a pass cannot run on this IR (before any pass runs).
        VerificationError: an exact pass changed the outputs beyond its tolerance, or the model
            no longer runs.
        PtoolError: a pass failed or produced an invalid model; the message names it.
    """
    ir.prepare(passes)
    outputs = None
    if reference_inputs:
        outputs = reference_outputs if reference_outputs is not None else ir.outputs(model, reference_inputs)
    run = _Run(model, ctx, ir, reference_inputs, outputs, noise_floor)
    records = run.round(passes, 1)
    exact = [p for p in passes if p.numerics.exact]
    last = records
    for round_ in range(2, MAX_ROUNDS + 1):
        if not (fixpoint and any(r.rewritten for r in last if r.exact)):
            break
        latest = {r.spec: r for r in records}
        last = run.round(exact, round_)
        records += [r for r in last if r.rewritten or r.skipped != latest[r.spec].skipped]
    return records


#: How many calibration batches are verified on besides the example call (both IRs).
VERIFY_BATCHES = 4

#: The most rounds a fixpoint run makes (the first included).
MAX_ROUNDS = 6


class _Run:
    """One pipeline run: the model, its reference outputs so far, and the passes already run."""

    def __init__(self, model: Any, ctx: PassContext, ir: IR, inputs: Sequence[Any], outputs: list | None,
                 noise_floor: float) -> None:
        self.model, self.ctx, self.ir, self.inputs, self.outputs = model, ctx, ir, inputs, outputs
        self.noise_floor = noise_floor
        self.original = outputs  # the untransformed model's
        self.approximated = False  # an approximate pass has moved the outputs
        self.ran: list[str] = []
        self.index = 0

    def round(self, passes: Sequence[Pass], round_: int) -> list[PassRecord]:
        return [self.one(pass_, round_) for pass_ in passes]

    def one(self, pass_: Pass, round_: int) -> PassRecord:
        """Run one pass, verify it, and return its record (the instruments see both)."""
        ir, model, ctx = self.ir, self.model, self.ctx
        spec, index = pass_.spec(), self.index
        ran = ", ".join(self.ran) or "none"
        for inst in ctx.instruments:
            _hook(inst, "before_pass")(index, pass_, model)
        nodes_before, params_before = ir.node_count(model), ir.parameter_count(model)
        start = time.perf_counter()
        try:
            result = ir.run_pass(pass_, model, ctx)
        except PtoolError:
            raise
        except Exception as e:
            raise PtoolError(f"pass '{spec}' failed on the {ir.noun} ({type(e).__name__}: {first_line(e)}); "
                             f"passes already run: {ran}") from e
        seconds = time.perf_counter() - start

        fidelity, violation = None, None
        if self.outputs is not None:
            fidelity, violation, self.outputs = _verify(ir, pass_, model, result, self.inputs, self.outputs, ran,
                                                        self.noise_floor, self.original if self.approximated else None)
            self.approximated |= not pass_.numerics.exact and fidelity.max_abs_error > 0
        record = PassRecord.of(pass_, result, seconds=seconds, nodes=(nodes_before, ir.node_count(model)),
                               params=(params_before, ir.parameter_count(model)), fidelity=fidelity,
                               violation=violation)
        record.round = round_
        for inst in ctx.instruments:
            _hook(inst, "after_pass")(index, pass_, model, record)
        self.ran.append(spec)
        self.index += 1
        return record


def _verify(ir: IR, pass_: Pass, model: Any, result: PassResult, inputs: Sequence[Any], before: list, ran: str,
            noise_floor: float, original: list | None) -> tuple[Fidelity, str | None, list]:
    """Judge one pass on the reference inputs: ``(fidelity, violation, outputs after it)``."""
    spec = pass_.spec()
    if not (result.changed or result.rewritten or ir.rerun_unchanged):  # same model, same outputs
        return Fidelity.perfect(), None, before
    try:
        runnable = ir.checked(model)
    except Exception as e:
        raise PtoolError(f"pass '{spec}' produced an invalid {ir.noun} ({first_line(e)}); "
                         f"passes already run: {ran}") from e
    try:
        after = ir.outputs(runnable, inputs)
    except Exception as e:
        raise VerificationError(
            f"pass '{spec}' produced a {ir.noun} that no longer runs: {type(e).__name__}: {first_line(e)}"
        ) from e
    fidelity, violation = judge(pass_, before, after, ran, noise_floor, original)
    return fidelity, violation, after
