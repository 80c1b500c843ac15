"""The pass abstraction: what every pass declares and returns.

A pass is a frozen, keyword-only dataclass. Its fields are its whole configuration, so it prints,
compares, hashes and round-trips to the CLI string ``name:key=value``. Class-level facts (``name``,
``family``, ``numerics``, ``needs_calibration``) describe the pass itself, not one use of it.

``run(graph_module, ctx)`` mutates the FX graph it is given and returns a :class:`PassResult`.
The pass manager (``ptool/pipeline/manager.py``) does the rest: lint, recompile, metadata refresh,
timing, and the numerics check against the pass's input graph.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ptool.report import Skip
from ptool.verify import Numerics

if TYPE_CHECKING:
    import torch.fx


class Family(str, enum.Enum):
    """Pass families, as the README lists them."""

    CLEANUP = "cleanup"
    REPARAM = "re-parameterization"
    ATTENTION_LINEAR = "attention-linear"
    ATTENTION_KERNEL = "attention-kernel"
    ATTENTION_SPARSE = "attention-sparse"
    QUANTIZATION = "quantization"
    SHIFT_ADD = "shift-add"
    PRECISION = "precision"
    TOKENS = "token-reduction"


@dataclass
class PassResult:
    """What one pass run did: whether the graph changed, sites rewritten, sites skipped (why)."""

    changed: bool = False
    rewritten: int = 0
    skipped: list[Skip] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def hit(self, count: int = 1) -> None:
        """Record ``count`` rewritten sites."""
        self.rewritten += count
        self.changed = self.changed or count > 0

    def skip(self, site: str, reason: str) -> None:
        """Record a site left alone and why."""
        self.skipped.append(Skip(site, reason))


@dataclass
class PassContext:
    """What a pass may read besides the graph: reference inputs, calibration data, instruments.

    Attributes:
        example_inputs: the positional example inputs (one tuple).
        example_kwargs: keyword example inputs.
        calibration: a list of positional input tuples for passes that need data (``None`` if
            not given).
        calibration_calls: the same batches as ``(args, kwargs)`` pairs, for models called with
            keyword inputs.
        instruments: objects called around each pass (see ``passes/instruments.py``).
    """

    example_inputs: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    calibration: list[tuple] | None = None
    calibration_calls: list[tuple[tuple, dict]] | None = None
    instruments: Sequence[Any] = ()

    def require_calibration(self, pass_name: str) -> list[tuple]:
        """Return calibration data or raise a clear error naming the pass that needs it."""
        from ptool.errors import PassError

        if not self.calibration:
            raise PassError(
                f"pass '{pass_name}' needs calibration data: pass calibration=[(x,), ...] "
                "(an iterable of input tuples or a DataLoader; CLI: --calibration FILE.npz)"
            )
        return self.calibration

    def calls(self) -> list[tuple[tuple, dict]]:
        """The calibration data as ``(args, kwargs)`` calls (empty without calibration)."""
        if self.calibration_calls:
            return list(self.calibration_calls)
        return [(tuple(args), {}) for args in self.calibration or ()]

    def require_calibration_calls(self, pass_name: str) -> list[tuple[tuple, dict]]:
        """:meth:`calls`, or the clear error of :meth:`require_calibration` when there is no data."""
        self.require_calibration(pass_name)
        return self.calls()


@dataclass(frozen=True, kw_only=True)
class Pass:
    """Base class of every pass. Subclasses are frozen keyword-only dataclasses.

    Subclasses set the class variables and implement :meth:`run`.
    """

    name: ClassVar[str]
    family: ClassVar[Family]
    numerics: ClassVar[Numerics]
    needs_calibration: ClassVar[bool] = False
    tuning_candidates: ClassVar[tuple[str, ...]] = ()
    """Specs the autotuner tries (approximate passes; exact ones are always applied). A pass joins
    the search space by declaring them here, not by an edit to the tuner."""

    @property
    def uses_calibration(self) -> bool:
        """Whether this configuration reads calibration data (a pass whose data need depends on its
        options, such as ``quantize:mode=auto``, says so per instance)."""
        return self.needs_calibration

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite ``gm`` in place and say what changed."""
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring: the one-line doc shown by ``ptool passes``."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @property
    def exact(self) -> bool:
        return self.numerics.exact

    def spec(self) -> str:
        """The CLI spelling of this configured pass: ``name`` or ``name:key=value,...``.

        Only options that differ from their defaults are written, so ``spec`` round-trips
        through :func:`ptool.passes.registry.parse_pass`.
        """
        from ptool.options import format_value

        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            parts.append(f"{f.name}={format_value(value)}")
        return self.name + (":" + ",".join(parts) if parts else "")

    def __str__(self) -> str:
        return self.spec()
