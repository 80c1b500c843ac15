"""The pass registry: one explicit tuple of pass classes, and the name/option parser.

Registering a pass means adding its class to ``_PASS_CLASSES`` below; importing a module has no
side effects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from ptool.errors import PassError, did_you_mean
from ptool.options import build_pass, describe_type, field_types, format_value, split_spec
from ptool.passes.base import Pass


def _pass_classes() -> tuple[type[Pass], ...]:
    # Imported here, not at module import, so `import ptool` stays fast (passes import torch).
    from ptool.passes.attention.passes import LinearAttention, SigmoidAttention, SoftplusAttention, SparseAttention
    from ptool.passes.cleanup import CommonSubexpressionElimination, ConstantFold, DeadCodeElimination
    from ptool.passes.fold_affine import FoldAffine
    from ptool.passes.fold_bn import FoldBatchNorm
    from ptool.passes.merge_branches import MergeBranches
    from ptool.passes.precision import Precision
    from ptool.passes.quant.logquant import LogQuant
    from ptool.passes.quant.quantize import Quantize
    from ptool.passes.quant.repquant import RepQuant
    from ptool.passes.quant.rotate import Rotate
    from ptool.passes.quant.smooth import SmoothQuant
    from ptool.passes.repbn import RepBatchNorm
    from ptool.passes.shiftadd.binary_attention import BinaryAttention
    from ptool.passes.shiftadd.shift_linear import ShiftLinear
    from ptool.passes.tokens.token_reduce import TokenReduce

    return (
        DeadCodeElimination, CommonSubexpressionElimination, ConstantFold,
        FoldBatchNorm, MergeBranches, FoldAffine, RepBatchNorm,
        LinearAttention, SigmoidAttention, SoftplusAttention, SparseAttention,
        Quantize, SmoothQuant, Rotate, LogQuant, RepQuant,
        Precision,
        ShiftLinear,
        BinaryAttention,
        TokenReduce,
    )


def registry() -> dict[str, type[Pass]]:
    """Registered passes by name."""
    return {cls.name: cls for cls in _pass_classes()}


def get_pass_class(name: str) -> type[Pass]:
    """The pass class registered as ``name``; PassError with a suggestion if there is none."""
    passes = registry()
    if name not in passes:
        raise PassError(
            f"unknown pass '{name}'{did_you_mean(name, passes)}; run `ptool passes` to list them "
            f"(registered: {', '.join(passes)})"
        )
    return passes[name]


def parse_pass(spec: str | Pass) -> Pass:
    """Turn ``"name"``, ``"name:key=value,..."`` or a pass object into a configured pass.

    Raises:
        PassError: unknown name, unknown option, or a value the option does not allow.
    """
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        return spec()
    if not isinstance(spec, str):
        raise PassError(f"a pass must be a name string or a ptool pass object, not {type(spec).__name__}")
    name, raw = split_spec(spec)
    return build_pass(get_pass_class(name), raw)


def parse_pipeline(specs: Iterable[str | Pass] | str | None) -> list[Pass]:
    """Parse a list of pass specs (a single string is one pass)."""
    if specs is None:
        return []
    if isinstance(specs, (str, Pass)):
        specs = [specs]
    return [parse_pass(s) for s in specs]


@dataclass(frozen=True)
class PassInfo:
    """One row of ``ptool.list_passes()``."""

    name: str
    family: str
    numerics: str
    exact: bool
    needs_calibration: bool
    options: dict[str, str]
    doc: str

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items()) or "-"
        return f"{self.name:<16} {self.family:<20} {'exact' if self.exact else 'approximate':<12} {opts}  {self.doc}"


def list_passes() -> list[PassInfo]:
    """Every registered pass: name, family, exact/approximate, options (type=default), doc."""
    rows = []
    for cls in _pass_classes():
        types_ = field_types(cls)
        opts = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            opts[f.name] = f"{describe_type(types_[f.name])} (default {format_value(default)})"
        rows.append(
            PassInfo(cls.name, cls.family.value, str(cls.numerics), cls.numerics.exact,
                     cls.needs_calibration, opts, cls.summary())
        )
    return rows
