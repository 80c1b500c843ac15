"""Feature maps ``phi: R^D -> R^m`` for the linear-attention kernels in :mod:`.linear`.

A linear kernel replaces ``exp(q . k * scale)`` by ``phi(q) . phi(k)``. The maps here are pure
functions of one token (no sequence-dependent statistics), except the FAVOR+ key stabiliser of
non-causal sites, which is one constant per (batch, head) and so cancels in the normalised
weights. Every map computes in float32.

* :func:`elu_plus_one` - ``elu(x) + 1`` (Katharopoulos et al.), positive, parameter-free;
* :class:`PerformerFeatures` - FAVOR+ positive random features,
  ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)`` with ``x' = x * scale^(1/2)`` and a fixed
  orthogonal Gaussian ``W``: ``E_W[phi(q) . phi(k)] = exp(q . k * scale)`` (unbiased softmax
  kernel, variance shrinking with ``m``);
* :class:`HedgehogFeatures` - a learnable per-head map, LoLCATs' "softmax_dim" variant
  ``[softmax_f(x' W), softmax_f(-x' W)]`` (``m = 2 f``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EXP_CAP = 40.0
"""Largest exponent an unshifted FAVOR+ key feature may take (``exp(40) ~ 2e17``): keeps
``sum_j phi(k_j) v_j`` finite in float32. It binds only when ``W x'`` nearly equals ``|x'|^2``
- a key almost parallel to a random direction and of that direction's length - which typical
key norms do not reach."""


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1`` in float32: positive, so every normaliser is positive."""
    return F.elu(x.float()) + 1.0


def orthogonal_gaussian(rows: int, dim: int, seed: int) -> torch.Tensor:
    """``(rows, dim)`` float32 random projection with blockwise-orthogonal rows (FAVOR+).

    Rows come in blocks of ``dim`` orthonormal directions (QR of a Gaussian matrix), each row
    rescaled by the norm of an independent ``N(0, I_dim)`` vector, so every row is marginally
    ``N(0, I_dim)`` as the unbiased estimator needs. Deterministic for a given ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(rows / dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        blocks.append(q.T)
    w = torch.cat(blocks)[:rows]
    norms = torch.randn(rows, dim, generator=gen, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return (w * norms).float()


class PerformerFeatures(nn.Module):
    """FAVOR+ positive random features for one site (projection shared across heads).

    Stabilisers (each a factor common to everything it multiplies, so the normalised attention is
    unchanged up to the ``eps`` of the denominator):

    * queries: the per-token max over features (a factor common to one query's whole row);
    * keys of a non-causal site: the detached max over the kept keys and features of each
      (batch, head) - padded keys are left out so they cannot change it;
    * keys of a causal site: none. A sequence max would let future keys in and the recurrent
      decode form could not reproduce it; FAVOR+ features have mean 1 per feature, so unshifted
      keys are well scaled, and the exponent is capped at :data:`EXP_CAP` against overflow.

    Args:
        head_dim: ``D``.
        scale: the softmax scale; ``x`` is multiplied by ``scale ** 0.5`` so ``q . k`` carries it.
        features: ``m`` (0: ``round(D ln D)``, at least 1).
        seed: seed of the projection.
        causal: key stabiliser choice (above).
    """

    def __init__(self, head_dim: int, scale: float, *, features: int = 0, seed: int = 0, causal: bool = False) -> None:
        super().__init__()
        self.features = features or max(1, round(head_dim * math.log(head_dim)))
        self.root_scale = math.sqrt(scale)
        self.causal = causal
        self.register_buffer("projection", orthogonal_gaussian(self.features, head_dim, seed))

    def _exponent(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.root_scale
        return x @ self.projection.float().T - 0.5 * (x * x).sum(-1, keepdim=True)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., N, D) -> (..., N, m)`` query features, each row's max shifted to 0."""
        e = self._exponent(x)
        # max(dim).values rather than amax: TVM's exported-program importer has no amax
        return torch.exp(e - e.max(-1, keepdim=True).values.detach()) / math.sqrt(self.features)

    def key(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, H, M, D) -> (B, H, M, m)`` key features; ``keep`` ``(B, 1|H, M, 1)`` marks real keys."""
        e = self._exponent(x)
        if self.causal:
            return torch.exp(e.clamp(max=EXP_CAP)) / math.sqrt(self.features)
        kept = e if keep is None else torch.where(keep > 0, e, torch.full_like(e, torch.finfo(e.dtype).min))
        shift = kept.flatten(-2).max(-1).values.detach()[..., None, None]
        # Kept keys are <= 0 after the shift already; the clamp only bounds padded keys (which
        # ``keep`` zeroes next) so that a fully padded row cannot produce inf * 0 = NaN.
        return torch.exp((e - shift).clamp(max=0.0)) / math.sqrt(self.features)

    def extra_repr(self) -> str:
        return f"features={self.features}, causal={self.causal}"


class HedgehogFeatures(nn.Module):
    """Hedgehog / LoLCATs learnable map ``[softmax_f(x' W_h), softmax_f(-x' W_h)]`` per head ``h``.

    ``x' = x * scale ** 0.5`` so that at the identity initialisation the map sees the logits'
    scale. ``W`` ``(H, D, f)`` starts at the identity when ``f == D``; otherwise at the
    rectangular identity plus seeded ``N(0, 0.01^2)`` noise, which breaks the symmetry of
    the otherwise identical zero columns (they would receive identical gradients forever).

    Args:
        heads, head_dim: ``H``, ``D``.
        scale: the softmax scale.
        features: ``f`` (0: ``D``); the map has ``m = 2 f`` outputs.
        seed: seed of the initial noise (``f != D`` only).
    """

    def __init__(self, heads: int, head_dim: int, scale: float, *, features: int = 0, seed: int = 0) -> None:
        super().__init__()
        f = features or head_dim
        self.root_scale = math.sqrt(scale)
        w = torch.eye(head_dim, f).expand(heads, head_dim, f).clone()
        if f != head_dim:
            w += 0.01 * torch.randn(heads, head_dim, f, generator=torch.Generator().manual_seed(seed))
        self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, D) -> (B, H, N, 2 f)``."""
        u = torch.einsum("bhnd,hdf->bhnf", x.float() * self.root_scale, self.weight.float())
        return torch.cat([u.softmax(-1), (-u).softmax(-1)], dim=-1)

    def extra_repr(self) -> str:
        h, d, f = self.weight.shape
        return f"heads={h}, head_dim={d}, features={f}"
