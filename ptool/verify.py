"""The numerics harness: one way to compare two models' outputs, used by passes and backends.

Outputs are flattened with torch's pytree, so any output structure (tensor, tuple, dict, Hugging
Face ``ModelOutput``) compares leaf by leaf. Floating-point leaves are compared as one long vector:

- ``max_abs_error``  = max |out - ref|
- ``max_rel_error``  = max |out - ref| / max |ref|   (error relative to the output's scale, so
  values near zero do not blow it up)
- ``cosine``         = cosine similarity of the concatenated outputs
- ``sqnr_db``        = 10 log10(|ref|^2 / |out - ref|^2)

Non-float leaves (token ids, masks) must be equal. A contract is :class:`Exact` (bit-identical),
:class:`Close` (``max_abs_error <= atol + rtol * max|ref|``) or :class:`Lossy` (a metric bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Fidelity:
    """How far one model's outputs are from a reference's, over all output leaves and inputs."""

    max_abs_error: float
    max_rel_error: float
    cosine: float
    sqnr_db: float
    ref_scale: float
    mismatched_leaves: int = 0
    eps: float = 0.0  # machine epsilon of the coarsest float dtype among the outputs

    @classmethod
    def perfect(cls) -> Fidelity:
        return cls(0.0, 0.0, 1.0, math.inf, 0.0)

    def worst(self, other: Fidelity) -> Fidelity:
        """Combine two comparisons (e.g. over several inputs), keeping the worst of each figure."""
        return Fidelity(
            max(self.max_abs_error, other.max_abs_error),
            max(self.max_rel_error, other.max_rel_error),
            min(self.cosine, other.cosine),
            min(self.sqnr_db, other.sqnr_db),
            max(self.ref_scale, other.ref_scale),
            self.mismatched_leaves + other.mismatched_leaves,
            max(self.eps, other.eps),
        )

    def __str__(self) -> str:
        return (
            f"max_abs={self.max_abs_error:.3g} max_rel={self.max_rel_error:.3g} "
            f"cosine={self.cosine:.6f} sqnr={self.sqnr_db:.1f}dB"
        )


@dataclass(frozen=True)
class Exact:
    """Outputs must be bit-identical (cleanup passes that only remove or share work)."""

    exact: bool = True

    def violation(self, fid: Fidelity, noise_floor: float = 0.0) -> str | None:
        """``noise_floor`` is ignored: a bit-exact pass moves nothing, whatever the float noise."""
        if fid.mismatched_leaves:
            return f"{fid.mismatched_leaves} output leaves changed structure, dtype or integer value"
        if fid.max_abs_error > 0:
            return f"outputs differ (max abs error {fid.max_abs_error:.3g}); this pass must be bit-exact"
        return None

    def __str__(self) -> str:
        return "exact"


EPS_FACTOR = 8.0
#: An exact-in-real-arithmetic pass may move the outputs by this many times the reference's own float
#: noise (how far a re-ordering of the same arithmetic moves them: ONNX Runtime's graph optimizations
#: on vs off); a real error is far above it.
NOISE_FACTOR = 4.0


@dataclass(frozen=True)
class Close:
    """Equal in real arithmetic; float rounding allowed: ``max_abs <= atol + rtol * max|ref|``.

    ``rtol`` is never tighter than the outputs' dtype can resolve: it is raised to
    ``EPS_FACTOR * eps(dtype)`` for half-precision models (a no-op for float32). Nor is the bound
    tighter than ``NOISE_FACTOR`` times the measured noise floor of the model, when there is one.
    """

    atol: float = 0.0
    rtol: float = 1e-5
    exact: bool = True

    def violation(self, fid: Fidelity, noise_floor: float = 0.0) -> str | None:
        if fid.mismatched_leaves:
            return f"{fid.mismatched_leaves} output leaves changed structure, dtype or integer value"
        bound = self.atol + max(self.rtol, EPS_FACTOR * fid.eps) * fid.ref_scale
        if not fid.max_abs_error <= max(bound, NOISE_FACTOR * noise_floor):
            noise = f", noise floor {noise_floor:.3g}" if noise_floor else ""
            return (
                f"max abs error {fid.max_abs_error:.3g} exceeds {bound:.3g} "
                f"(atol={self.atol:g} + rtol={self.rtol:g} x output scale {fid.ref_scale:.3g}{noise})"
            )
        return None

    def __str__(self) -> str:
        return f"close(rtol={self.rtol:g})"


@dataclass(frozen=True)
class Lossy:
    """An approximate pass: ``metric`` must stay on the right side of ``bound``.

    ``cosine`` and ``sqnr_db`` are lower bounds; ``max_rel_error`` is an upper bound.
    """

    metric: Literal["cosine", "sqnr_db", "max_rel_error"] = "cosine"
    bound: float = 0.99
    exact: bool = False

    def violation(self, fid: Fidelity, noise_floor: float = 0.0) -> str | None:
        value = getattr(fid, self.metric)
        ok = value <= self.bound if self.metric == "max_rel_error" else value >= self.bound
        return None if ok else f"{self.metric} {value:.4g} is past the bound {self.bound:g}"

    def adds_within(self, before: Fidelity, after: Fidelity) -> bool:
        """Whether the error vs the untransformed model grew by no more than this bound allows, from
        ``before`` (the pass's input vs it) to ``after`` (its output vs it). For a pass that follows
        other approximate passes: compared with its own input it also meets their noise (a bf16
        rounding that flips an int8 activation level), which is not error it adds to the model.
        Errors add as ``1 - cosine``, noise power (``10^(-sqnr/10)``) or ``max_rel_error``."""
        if self.metric == "cosine":
            return 1 - after.cosine <= (1 - before.cosine) + (1 - self.bound)
        if self.metric == "sqnr_db":
            return 10 ** (-after.sqnr_db / 10) <= 10 ** (-before.sqnr_db / 10) + 10 ** (-self.bound / 10)
        return after.max_rel_error <= before.max_rel_error + self.bound

    def __str__(self) -> str:
        return f"approx({self.metric} bound {self.bound:g})"


Numerics = Exact | Close | Lossy


def flatten_outputs(outputs: Any) -> list:
    """Flatten any output structure (tuple, dict, ModelOutput) to its leaves."""
    import torch.utils._pytree as pytree

    return pytree.tree_leaves(outputs)


def compare(reference: Any, outputs: Any) -> Fidelity:
    """Compare two output structures leaf by leaf (see the module docstring for the figures)."""
    import torch

    ref_leaves, out_leaves = flatten_outputs(reference), flatten_outputs(outputs)
    if len(ref_leaves) != len(out_leaves):
        return Fidelity(math.inf, math.inf, 0.0, -math.inf, 0.0, abs(len(ref_leaves) - len(out_leaves)) or 1)
    mismatched = 0
    eps = 0.0
    refs, outs = [], []
    for r, o in zip(ref_leaves, out_leaves):
        if not isinstance(r, torch.Tensor) or not isinstance(o, torch.Tensor):  # strings, None, numbers
            mismatched += int(not _same_value(r, o))
            continue
        if r.shape != o.shape:
            mismatched += 1
            continue
        if r.is_floating_point() or r.is_complex():
            eps = max(eps, torch.finfo(r.dtype).eps) if r.is_floating_point() else eps
            # on the host in float64: the two sides may sit on different devices (a GPU backend vs eager CPU)
            refs.append(r.detach().reshape(-1).to("cpu", torch.float64))
            outs.append(o.detach().reshape(-1).to("cpu", torch.float64))
        elif not torch.equal(r.cpu(), o.to("cpu", r.dtype)):
            mismatched += 1
    if not refs:
        return Fidelity(0.0, 0.0, 1.0, math.inf, 0.0, mismatched)
    ref, out = torch.cat(refs), torch.cat(outs)
    if ref.numel() == 0:  # only empty float tensors: nothing can differ but their shapes, checked above
        return Fidelity(0.0, 0.0, 1.0, math.inf, 0.0, mismatched)
    diff = out - ref
    finite = bool(torch.isfinite(out).all()) and bool(torch.isfinite(ref).all())
    if not finite:
        same_nonfinite = bool(torch.equal(torch.isfinite(ref), torch.isfinite(out)))
        mask = torch.isfinite(ref) & torch.isfinite(out)
        if not same_nonfinite:
            return Fidelity(math.inf, math.inf, 0.0, -math.inf, float(ref[mask].abs().max()) if mask.any() else 0.0, mismatched)
        ref, out, diff = ref[mask], out[mask], diff[mask]
        if ref.numel() == 0:
            return Fidelity(0.0, 0.0, 1.0, math.inf, 0.0, mismatched)
    max_abs = float(diff.abs().max())
    scale = float(ref.abs().max())
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    ref_norm, out_norm = float(ref.norm()), float(out.norm())
    if ref_norm == 0 and out_norm == 0:
        cosine = 1.0
    elif ref_norm == 0 or out_norm == 0:
        cosine = 0.0
    else:
        cosine = float(torch.dot(ref, out) / (ref_norm * out_norm))
    noise = float(diff.norm())
    sqnr = math.inf if noise == 0 else (20 * math.log10(ref_norm / noise) if ref_norm > 0 else -math.inf)
    return Fidelity(max_abs, rel, cosine, sqnr, scale, mismatched, eps)


def _same_value(a: Any, b: Any) -> bool:
    """Equality of two non-tensor output leaves (numpy string arrays, None, Python numbers)."""
    import numpy as np

    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and \
            bool(np.array_equal(a, b))
    return type(a) is type(b) and a == b


def compare_many(references: list, outputs: list) -> Fidelity:
    """Compare lists of output structures pairwise (one per reference input) and keep the worst."""
    fid = Fidelity.perfect()
    for r, o in zip(references, outputs, strict=True):
        fid = fid.worst(compare(r, o))
    return fid
