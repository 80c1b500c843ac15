"""The token-reduction modules the ``token-reduce`` pass inserts: reduce, gather, un-merge.

Every token-reduction scheme is ``X' = T X`` with ``T`` in ``R^{M x N}``, ``M < N`` (Token
Transforming's unified view). Per image, on the ``Np = N - P`` tokens after the ``P`` prefix tokens
(CLS, a distillation token: kept apart, passed through unchanged):

1. **anchors**: the ``Mp`` most important tokens, ``idx = topk(importance, Mp)`` (near-ties broken by
   position, the same on every backend) - importance is the
   attention the CLS query gave each token in the previous block (mean over heads), or the token's
   L2 norm where there is no previous block;
2. **assignment** ``W`` in ``R^{Np x Mp}``: each input token's distribution over the anchors,
   ``W = softmax(cos(x_j, x_a) / temperature)`` over anchors ``a`` (``transform``); a one-hot row
   of the most similar anchor (``merge``, ToMe-style many-to-one averaging; ``prune`` uses it only
   for un-merging);
3. **transform** ``T = (W / colsum(W))^T``: each output token is the ``W``-weighted mean of the inputs
   assigned to it (``transform``: many-to-many; ``merge``: many-to-one); ``prune``: ``T`` has
   one-hot rows at the anchors (the other tokens are dropped).

Un-merging (per-token outputs): ``X ~= W X'`` - each original token is the convex combination of the
anchors it was assigned to (a copy of its anchor for ``merge`` / ``prune``). Several stages compose:
``X ~= W_1 W_2 ... X''``.

All shapes are static (``Mp`` is fixed when the pass runs): ``topk`` with a constant ``k``,
``gather``, ``softmax``, ``matmul``, ``cat`` - so the result exports to ONNX and compiles on TVM.
Input tokens whose key the attention mask hides (padding) get no weight in ``T`` and no importance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("transform", "merge", "prune")
_MASKED = -1e4  # additive mask entries at or below this hide a key (as the attention kernels read them)


def _valid_keys(mask: torch.Tensor | None, batch: int, n: int) -> torch.Tensor | None:
    """``(B, N)`` float 1/0: the keys the CLS query (row 0) may see, from a boolean or additive mask."""
    if mask is None:
        return None
    row = mask[..., :1, :]  # (B|1, H|1, 1, N)
    ok = row if row.dtype == torch.bool else row > _MASKED
    ok = ok.to(torch.float32).amax(dim=1)[:, 0, :]  # visible to some head
    return ok.expand(batch, n)


_TIE_BREAK = 1e-4
"""Largest offset of the ramp that orders near-tied tokens (earlier first) before a top-k or argmax."""


def _tie_broken(values: torch.Tensor) -> torch.Tensor:
    """``values`` (in [0, 1] or [-1, 1]) minus a tiny ramp over the last axis, so near-ties (a random-weight
    model's almost uniform attention) are decided the same way on every backend: without it, float
    rounding that differs between torch, ONNX Runtime and TVM picks different anchors. The ramp is far
    above float rounding and far below any difference that matters."""
    m = values.shape[-1]
    return values - torch.arange(m, device=values.device, dtype=values.dtype) * (_TIE_BREAK / m)


class TokenReducer(nn.Module):
    """One reduction stage: ``(x, [q, k, mask]) -> (x', W, index)``.

    Args:
        prefix: tokens kept apart at the front (CLS, distillation token).
        keep_count: anchors ``Mp`` among the ``Np`` other tokens.
        method: ``transform``, ``merge`` or ``prune`` (module docstring).
        temperature: softmax temperature of ``transform``'s assignment (cosine similarities).
        scale: the previous attention's softmax scale (importance from its CLS query).

    ``forward(x, q=None, k=None, mask=None)``: ``x`` ``(B, N, d)``; ``q``, ``k`` the previous
    block's attention in ``(B, H, N, D)`` (importance = the CLS row of its softmax; without them the
    token norm), ``mask`` its mask. Returns ``x'`` ``(B, P + Mp, d)``, the assignment ``W``
    ``(B, Np, Mp)`` (for un-merging) and the kept positions ``(B, P + Mp)`` (int64, the prefix
    first) for gathering masks.
    """

    def __init__(self, *, prefix: int, keep_count: int, method: str = "transform", temperature: float = 0.1,
                 scale: float = 1.0) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.prefix, self.keep_count, self.method = int(prefix), int(keep_count), method
        self.temperature, self.scale = float(temperature), float(scale)

    def extra_repr(self) -> str:
        return (f"prefix={self.prefix}, keep_count={self.keep_count}, method={self.method}, "
                f"temperature={self.temperature:g}")

    def forward(self, x: torch.Tensor, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        p, mp = self.prefix, self.keep_count
        np_ = n - p
        xp = x[:, p:]
        valid = _valid_keys(mask, b, n)
        if q is not None and k is not None:
            scores = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * self.scale  # (B, H, 1, N)
            if mask is not None:
                scores = scores.masked_fill(~mask[..., :1, :], float("-inf")) if mask.dtype == torch.bool \
                    else scores + mask[..., :1, :].float()
            importance = scores.softmax(-1).mean(1)[:, 0, p:]  # (B, Np)
        else:
            importance = xp.float().norm(dim=-1)
            if valid is not None:
                importance = importance * valid[:, p:]
        idx = _tie_broken(importance / importance.amax(-1, keepdim=True).clamp_min(1e-30)).topk(mp, dim=-1).indices
        xn = F.normalize(xp.float(), dim=-1)
        an = xn.gather(1, idx.unsqueeze(-1).expand(b, mp, d))
        sim = xn @ an.transpose(1, 2)  # (B, Np, Mp) cosine similarities
        if self.method == "transform":
            w = (sim / self.temperature).softmax(-1)
        else:  # the most similar anchor (ties share the row)
            ranked = _tie_broken(sim)
            hard = (ranked == ranked.amax(-1, keepdim=True)).float()
            w = hard / hard.sum(-1, keepdim=True)
        if self.method == "prune":
            positions = torch.arange(np_, device=x.device)
            t = (idx.unsqueeze(-1) == positions).float()  # (B, Mp, Np) one-hot rows
        else:
            mass = w if valid is None else w * valid[:, p:].unsqueeze(-1)
            t = (mass / mass.sum(1, keepdim=True).clamp_min(1e-12)).transpose(1, 2)  # (B, Mp, Np)
        reduced = (t @ xp.float()).to(x.dtype)
        out = torch.cat([x[:, :p], reduced], dim=1)
        front = torch.arange(p, device=x.device).unsqueeze(0).expand(b, p)
        kept = torch.cat([front, idx + p], dim=1)
        return out, w.to(x.dtype), kept


class TokenGather(nn.Module):
    """A tensor that enters the reduced blocks from outside (an attention mask) at the kept tokens.

    ``forward(t, kept)``: ``t`` with batch axis 0 (size B or 1) and token axes ``axes``; ``kept``
    ``(B, M)`` positions; returns ``t`` with each token axis gathered to ``M``.
    """

    def __init__(self, axes: tuple[int, ...]) -> None:
        super().__init__()
        self.axes = tuple(int(a) for a in axes)

    def extra_repr(self) -> str:
        return f"axes={self.axes}"

    def forward(self, t: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        b, m = kept.shape
        if t.shape[0] != b:
            t = t.expand(b, *t.shape[1:])
        for axis in self.axes:
            view = [b] + [1] * (t.dim() - 1)
            view[axis] = m
            size = list(t.shape)
            size[axis] = m
            t = t.gather(axis, kept.reshape(view).expand(size))
        return t


class TokenUnmerge(nn.Module):
    """Back to one row per original token: ``(x (B, P + Mp, d), W (B, Np, Mp)) -> (B, P + Np, d)``,
    the prefix unchanged and each other token ``W x`` (its anchors' combination)."""

    def __init__(self, prefix: int) -> None:
        super().__init__()
        self.prefix = int(prefix)

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}"

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        p = self.prefix
        return torch.cat([x[:, :p], (w @ x[:, p:].float()).to(x.dtype)], dim=1)
