"""The ``binary-attention`` pass: softmax attention -> Hamming-similarity attention on binary codes.

Per selected site, queries and keys are hashed to ``b``-bit codes ``h in {-1, +1}^b`` (a float
projection per token, then the sign), packed into int32 words
(:func:`~ptool.ops.shift_arith.pack_codes`), and attention becomes
``torch.ops.ptool_shift.binary_attention`` (:mod:`.binary_ops`), the linear attention with the
similarity ``b + h_q . h_k = 2 (b - Hamming(h_q, h_k)) >= 0``:

    o_i = sum_j keep_j (b + h_q,i . h_k,j) v_j / sum_j keep_j (b + h_q,i . h_k,j)

computed as ``h_q,i^T (sum_j h_k,j v_j^T)`` with values quantized to int8 per column, so the
inner sums are additions and subtractions of integers (the definition is
:func:`~ptool.ops.shift_arith.binary_attention_reference`; torch and ONNX Runtime run it,
the TVM backend a popcount/addition kernel). Cost per head: ``O((N + M) b Dv)`` additions, plus the
hash: a ``b x D`` float matmul per token (``random``) or EcoFormer's Gaussian kernel against 25
anchors and a ``b x 25`` matmul per token (``learned``). The hash is the only float work left.

Hashes:

* ``random`` (default, no data needed): SimHash, ``h = sign(R^T x)`` with a fixed seeded Gaussian
  ``R (H, D, b)`` per site. ``E[b + h_q . h_k] = 2 b (1 - angle(q, k) / pi)``: the codes estimate
  the angular kernel, which ignores the norms of q and k and so is flatter than softmax.
* ``learned`` (EcoFormer, needs ``calibration=``): the kernelized hash of
  :class:`~ptool.passes.attention.linear_more.EcoFormerKernel`, fitted to the first calibration
  batch by its simplified kernel-supervised hashing (each query's top/bottom softmax keys as
  +1/-1 targets), then distilled by the attention transfer of
  :mod:`~ptool.passes.attention.convert` (softmax rows' cross-entropy + output MSE) through a
  straight-through sign: the forward value is the op's, the gradient the float surrogate's.

Limits: non-causal sites only (a causal site is skipped with the reason; the prefix-sum form is not
built). The op takes one key-padding row per batch (``(B, M)``): a mask that differs per query
keeps a key if any query may see it (exact for padding masks, as in the other linear kernels),
and per-head masks are merged over heads the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from ptool.ops import binary as binary_ops
from ptool.ops.shift_arith import pack_codes
from ptool.passes.attention.kernel import AttentionKernel, SiteShape, key_keep
from ptool.passes.attention.linear_core import linear_attention, linear_weights
from ptool.passes.attention.linear_more import EcoFormerKernel
from ptool.passes.attention.sites import AttentionSite
from ptool.passes.attention.swap import AttentionSwap
from ptool.passes.base import Family
from ptool.verify import Lossy, Numerics

HashKind = Literal["random", "learned", "ecoformer"]
MIN_BITS, MAX_BITS = 8, 64


def key_keep_rows(mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
    """The op's ``(B, M)`` bool key-padding rows from a site mask (None without a mask).

    A key is kept if any query of any head may attend to it (see the module docstring).
    """
    keep = key_keep(mask, torch.float32)  # (B|1, 1|H, M, 1)
    if keep is None:
        return None
    return (keep[..., 0].amax(dim=1) > 0).expand(batch, keys)


def _hard_signs(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y >= 0, 1.0, -1.0)  # never 0: every backend agrees on the sign of 0


class _BinaryAttend:
    """What the kernels share: codes -> packed words -> the op.

    A kernel defines ``bits`` and ``codes(x) -> {-1, 1} (B, H, N, bits)``, or, with different
    hashes for queries and keys, :meth:`query_codes` and :meth:`key_codes`.
    """

    bits: int

    def query_codes(self, q: torch.Tensor) -> torch.Tensor:
        return self.codes(q)

    def key_codes(self, k: torch.Tensor) -> torch.Tensor:
        return self.codes(k)

    def _packed(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 words ``(B, H, N|M, ceil(bits / 32))`` of the query and key codes."""
        return pack_codes(self.query_codes(q).detach()), pack_codes(self.key_codes(k).detach())

    def binary_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
        keep = key_keep_rows(mask, k.shape[0], k.shape[-2])
        return torch.ops.ptool_shift.binary_attention(*self._packed(q, k), v.float(), keep, self.bits)

    def hamming_weights(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The ``(B, H, N, M)`` rows the op applies to the quantized values (quadratic, no gradient)."""
        keep = key_keep_rows(mask, k.shape[0], k.shape[-2])
        return binary_ops.hamming_rows(*self._packed(q, k), keep, self.bits)


class RandomHashKernel(_BinaryAttend, AttentionKernel):
    """Binary attention with SimHash codes ``sign(R^T x)``, ``R`` a fixed Gaussian per head; no parameters.

    Args:
        shape: the site.
        bits: code length ``b``.
        seed: seeds ``R`` (mixed with the site's layer, so sites get independent projections).
    """

    def __init__(self, shape: SiteShape, *, bits: int, seed: int = 0) -> None:
        super().__init__(shape)
        self.bits = bits
        g = torch.Generator().manual_seed(seed * 100_003 + shape.layer)
        self.register_buffer("projection", torch.randn(shape.heads, shape.head_dim, bits, generator=g))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """``{-1, 1}`` codes ``(B, H, N, b)`` of q or k (float)."""
        return _hard_signs(x.float() @ self.projection)

    def forward(self, q, k, v, mask=None):
        return self.binary_attend(q, k, v, mask).to(q.dtype)

    def attention_weights(self, q, k, mask=None):
        return self.hamming_weights(q, k, mask).to(q.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, hash=random"


class EcoFormerHashKernel(_BinaryAttend, EcoFormerKernel):
    """Binary attention with EcoFormer's kernelized hash, fitted and distilled on calibration data.

    The hash, its fit (:meth:`EcoFormerKernel.fit`) and its differentiable rows
    (:meth:`EcoFormerKernel.attention_weights`) are EcoFormer's; the forward value is the op's.
    While gradients are on, the float EcoFormer attention (values detached) is added as
    ``surrogate - surrogate.detach()``: zero in value, and the straight-through gradient for ``A``.

    Args:
        shape: the site.
        bits: code length ``b``.
        seed: seeds the anchors, the projection and the fit.
    """

    def __init__(self, shape: SiteShape, *, bits: int, seed: int = 0) -> None:
        super().__init__(shape, feature_dim=bits, seed=seed)

    def forward(self, q, k, v, mask=None):
        out = self.binary_attend(q, k, v, mask)
        if torch.is_grad_enabled() and self.proj.requires_grad:
            surrogate = EcoFormerKernel.forward(self, q, k, v.detach(), mask).float()
            out = out + (surrogate - surrogate.detach())
        return out.to(q.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, hash=ecoformer"


def _straight_through_signs(y: torch.Tensor) -> torch.Tensor:
    """``sign(y)`` (never 0) forward; tanh's gradient inside ``[-1, 1]``, 0 outside, backward."""
    hard = _hard_signs(y)
    if not torch.is_grad_enabled():
        return hard
    soft = torch.where(y.abs() <= 1.0, torch.tanh(y), torch.zeros_like(y))
    return hard + (soft - soft.detach())


class ProjectedHashKernel(_BinaryAttend, AttentionKernel):
    """Binary attention with learned asymmetric linear hashes ``sign(P_q^T q)``, ``sign(P_k^T k)``.

    Both projections start as the SimHash ``R`` of :class:`RandomHashKernel` (same seed: before
    training the codes are the random ones). :meth:`fit` rescales each column so the mean ``|y|`` on
    the calibration tokens is 0.5 (codes are invariant to a positive scale; the straight-through
    window ``[-1, 1]`` then covers most tokens); the attention transfer then trains ``P_q`` and
    ``P_k`` through the straight-through sign. Separate projections fit ``q . k`` of a model whose
    query and key weights differ (EcoFormer shares them because it fine-tunes the model to a shared
    projection first).

    Args:
        shape: the site.
        bits: code length ``b``.
        seed: seeds the initial ``R``.
    """

    def __init__(self, shape: SiteShape, *, bits: int, seed: int = 0) -> None:
        super().__init__(shape)
        self.bits = bits
        start = RandomHashKernel(shape, bits=bits, seed=seed).projection
        self.query_projection = torch.nn.Parameter(start.clone())
        self.key_projection = torch.nn.Parameter(start.clone())

    def query_codes(self, q: torch.Tensor) -> torch.Tensor:
        """``{-1, 1}`` codes ``(B, H, N, b)`` of q (straight-through gradient while grad is on)."""
        return _straight_through_signs(q.float() @ self.query_projection)

    def key_codes(self, k: torch.Tensor) -> torch.Tensor:
        """``{-1, 1}`` codes ``(B, H, M, b)`` of k (straight-through gradient while grad is on)."""
        return _straight_through_signs(k.float() @ self.key_projection)

    def _features(self, q, k):
        """``[h_q, b]`` and ``[h_k, 1]``: their product is ``b + h_q . h_k`` (EcoFormer's features)."""
        return (F.pad(self.query_codes(q), (0, 1), value=float(self.bits)),
                F.pad(self.key_codes(k), (0, 1), value=1.0))

    def forward(self, q, k, v, mask=None):
        out = self.binary_attend(q, k, v, mask)
        if torch.is_grad_enabled() and self.query_projection.requires_grad:
            fq, fk = self._features(q, k)
            surrogate = linear_attention(fq, fk, v.detach().float(), keep=key_keep(mask, torch.float32)).float()
            out = out + (surrogate - surrogate.detach())
        return out.to(q.dtype)

    def attention_weights(self, q, k, mask=None):
        fq, fk = self._features(q, k)
        return linear_weights(fq, fk, keep=key_keep(mask, torch.float32)).to(q.dtype)

    def fit(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        """Rescale the projections' columns to mean ``|y|`` 0.5 on one calibration batch (codes unchanged)."""
        keep = key_keep(mask, torch.float32)
        with torch.no_grad():
            for x, p, w in ((q, self.query_projection, None), (k, self.key_projection, keep)):
                y = (x.float() @ p).abs()  # (B, H, N, b)
                if w is not None and w.shape[-2] == y.shape[-2]:
                    mean = (y * w).sum((0, 2)) / (w.expand(*y.shape[:-1], 1).sum((0, 2))).clamp_min(1)
                else:
                    mean = y.mean((0, 2))
                p.mul_((0.5 / mean.clamp_min(1e-12)).unsqueeze(1))
        return 0.0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, hash=learned"


HASH_KERNELS: dict[str, type[AttentionKernel]] = {"random": RandomHashKernel, "learned": ProjectedHashKernel,
                                                  "ecoformer": EcoFormerHashKernel}


@dataclass(frozen=True, kw_only=True)
class BinaryAttention(AttentionSwap):
    """Swap softmax attention for Hamming-similarity attention on binary codes of q and k (additions only).

    Args:
        hash: ``random`` (SimHash, no data needed), ``learned`` (per-head q and k projections,
            started from SimHash and trained on ``calibration=`` against the softmax rows through a
            straight-through sign; ``transfer_steps`` / ``distill_steps`` set the training) or
            ``ecoformer`` (EcoFormer's kernel-supervised hash, fitted then trained the same way).
        bits: code length, 8..64 (one int32 word per 32 bits).
    """

    name: ClassVar[str] = "binary-attention"
    family: ClassVar[Family] = Family.SHIFT_ADD
    numerics: ClassVar[Numerics] = Lossy("cosine", 0.9)

    hash: HashKind = "random"
    bits: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")

    def build_kernel(self, site: AttentionSite, position: int, selected: int) -> AttentionKernel:
        if site.causal:
            raise ValueError("causal site: binary-attention builds the non-causal form only (no prefix sums)")
        return HASH_KERNELS[self.hash](site.shape(), bits=self.bits, seed=self.seed)
