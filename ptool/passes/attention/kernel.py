"""What every attention replacement computes from, and the helpers they share.

A converted attention site calls one :class:`AttentionKernel` module in place of
``softmax(q k^T * scale + mask) v``. The kernel sees the site's tensors exactly as the original
attention did:

* ``q`` ``(B, H, N, D)``, ``k`` ``(B, H, M, D)``, ``v`` ``(B, H, M, Dv)`` - keys and values are
  already repeated to ``H`` heads for grouped-query models (the graph's own ``repeat_kv``);
* ``mask`` - ``None``, a boolean mask (``True`` = may attend) or an additive float mask,
  broadcastable to ``(B, H, N, M)``; for causal sites it already contains the causal part when
  the model built one (transformers does), and :attr:`SiteShape.causal` says the site is causal
  either way. In an additive mask, entries ``<= MASKED`` hide a key and the others are added to
  the scores (:func:`score_bias`): a site whose scores carry a real bias (Swin's relative-position
  bias, a soft ``-100`` shift mask) passes it this way, and only kernels that apply it
  (:attr:`AttentionKernel.takes_bias`) are given such a site - the others read masks as key
  visibility only, and the passes skip the site for them with that reason.

and returns the attended values ``(B, H, N, Dv)`` in ``q``'s dtype. Kernels are ordinary trainable
``nn.Module`` s; :meth:`AttentionKernel.attention_weights` gives the (quadratic) attention rows a
kernel implies, which conversion distils against the softmax rows and tests compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

MASKED = -1e4
"""Additive-mask entries at or below this count as masked (exp(-1e4) is 0 in every float type)."""


@dataclass(frozen=True)
class SiteShape:
    """The static facts of one attention site a kernel is built for.

    Attributes:
        layer: index of the site among the model's attention sites (graph order).
        heads: query heads ``H``.
        kv_heads: key/value heads before grouped-query repetition (``== heads`` without GQA).
        head_dim: ``D`` of q and k.
        value_dim: ``Dv`` of v.
        q_len: ``N`` at capture time.
        kv_len: ``M`` at capture time.
        scale: the softmax scale (``1/sqrt(D)`` unless the model uses another).
        causal: query ``i`` sees keys ``j <= i`` only.
        grid: ``(rows, cols)`` of the 2-D token grid (ViT patches) or ``None`` for 1-D sequences.
        prefix: tokens before the grid (ViT's CLS), only meaningful with ``grid``.
    """

    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    q_len: int
    kv_len: int
    scale: float
    causal: bool = False
    grid: tuple[int, int] | None = None
    prefix: int = 0

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int = 0, scale: float | None = None,
           causal: bool = False, kv_heads: int | None = None, grid: tuple[int, int] | None = None,
           prefix: int = 0) -> SiteShape:
        """The shape of a site with these (example) tensors; ``scale`` defaults to ``1/sqrt(D)``."""
        _, heads, n, d = q.shape
        return cls(layer=layer, heads=heads, kv_heads=kv_heads or heads, head_dim=d, value_dim=v.shape[-1],
                   q_len=n, kv_len=k.shape[-2], scale=1 / math.sqrt(d) if scale is None else scale,
                   causal=causal, grid=grid, prefix=prefix)


def allowed(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` as a boolean "may attend" mask (additive entries <= :data:`MASKED` are masked)."""
    if mask is None:
        return None
    return mask if mask.dtype == torch.bool else mask > MASKED


def score_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The part of an additive float mask that is added to the visible scores: its entries above
    :data:`MASKED`, 0 where it masks; ``None`` for no mask or a boolean one."""
    if mask is None or mask.dtype == torch.bool:
        return None
    return torch.where(mask > MASKED, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))


def key_keep(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A ``(B, 1|H, M, 1)`` 0/1 factor that zeroes padded keys, or ``None`` without a mask.

    A key is kept when at least one query may attend to it. That is exact for padding masks, and
    for causal masks (the last query sees every unpadded key); linear kernels apply causality
    themselves.
    """
    ok = allowed(mask)
    if ok is None:
        return None
    if ok.dim() < 4:
        ok = ok.reshape((1,) * (4 - ok.dim()) + tuple(ok.shape))
    return ok.any(dim=-2).unsqueeze(-1).to(dtype)


def causal_allowed(n: int, m: int, device: torch.device | None = None) -> torch.Tensor:
    """``(n, m)`` boolean: query ``i`` may see key ``j`` iff ``j <= i + (m - n)`` (keys end-aligned)."""
    i = torch.arange(n, device=device).unsqueeze(-1)
    j = torch.arange(m, device=device)
    return j <= i + (m - n)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float, causal: bool = False) -> torch.Tensor:
    """The reference: exact softmax attention (what every site computed before conversion)."""
    return softmax_weights(q, k, mask, scale, causal) @ v


def softmax_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    causal: bool = False) -> torch.Tensor:
    """Softmax attention rows ``(B, H, N, M)`` in float32 (the teacher during distillation).

    The mask's additive part (:func:`score_bias`) is added to the scores: this is what the site
    computed (0 for a pure mask)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    bias = score_bias(mask)
    if bias is not None:
        scores = scores + bias.float()
    ok = allowed(mask)
    if causal:
        c = causal_allowed(q.shape[-2], k.shape[-2], q.device)
        ok = c if ok is None else ok & c
    if ok is not None:
        scores = scores.masked_fill(~ok, torch.finfo(scores.dtype).min)
    return scores.softmax(-1).to(q.dtype)


class AttentionKernel(nn.Module):
    """Base class of every attention replacement (see the module docstring for the contract).

    Subclasses implement :meth:`forward`; those whose output is a (normalized or not) weighted sum
    of values also implement :meth:`attention_weights`. ``shape`` is the site the kernel was built for.
    ``takes_bias`` is True for kernels that add an additive mask's :func:`score_bias` to their
    scores; the others are not given sites whose scores carry a bias.
    """

    takes_bias: ClassVar[bool] = False

    def __init__(self, shape: SiteShape) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The ``(B, H, N, M)`` weights this kernel applies to ``v`` (quadratic), or ``None``."""
        return None

    @property
    def trainable(self) -> bool:
        """Whether the kernel has parameters to convert (distil) - else it converts instantly."""
        return any(True for _ in self.parameters())

    def extra_repr(self) -> str:
        s = self.shape
        return f"layer={s.layer}, heads={s.heads}, head_dim={s.head_dim}, causal={s.causal}"


class SoftmaxKernel(AttentionKernel):
    """Exact softmax attention as a kernel: the identity replacement (checks site rewiring exactly)."""

    takes_bias = True

    def forward(self, q, k, v, mask=None):
        return softmax_attention(q, k, v, mask, self.shape.scale, self.shape.causal)

    def attention_weights(self, q, k, mask=None):
        return softmax_weights(q, k, mask, self.shape.scale, self.shape.causal)
