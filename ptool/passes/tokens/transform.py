"""The token-reduction modules the ``token-reduce`` pass inserts: reduce, gather, un-merge.

Every token-reduction scheme is ``X' = T X`` with ``T`` in ``R^{M x N}``, ``M < N`` (Token
Transforming's unified view). Per image, on the ``Np = N - P`` tokens after the ``P`` prefix tokens
(CLS, a distillation token: kept apart, passed through unchanged):

1. **anchors** (``transform``, ``merge``, ``prune``, ``fuse``): the ``Mp`` most important tokens,
   ``idx = topk(importance, Mp)`` (near-ties broken by position, the same on every backend) - importance
   is the attention the CLS query gave each token (mean over heads), or the token's L2 norm where no
   attention comes before the stage;
2. **assignment** ``W`` in ``R^{Np x Mp}``: each input token's distribution over the output tokens, from
   cosine similarities of features ``f`` (the tokens, or the attention's keys averaged over heads):
   ``W = softmax(cos(f_j, f_a) / temperature)`` over anchors ``a`` (``transform``); a one-hot row of
   the most similar anchor (``merge``, many-to-one averaging; ``prune`` uses it only for un-merging);
   ``fuse`` (EViT): one-hot at the token's own column for the ``Mp - 1`` top anchors, every other token
   into one fused column; ``bipartite`` (ToMe): the tokens alternate between sets A and B, each A
   token's best match is its most similar B token, and the ``r = Np - Mp`` A tokens with the best
   matches go to their match's column (the other tokens keep their own);
3. **transform** ``T = (W' / colsum(W'))^T`` with ``W' = diag(s) W`` (sizes ``s`` when ``weighted``, else
   ones; ``fuse`` also weights by the importance): each output token is the weighted mean of the inputs
   assigned to it;
   ``prune``: ``T`` has one-hot rows at the anchors (the other tokens are dropped);
4. **sizes** ``s' = W^T s`` (how many original tokens each output token stands for; ones before the
   first stage, the prefix's stay 1). Proportional attention adds ``log s'`` to later attention logits.

Un-merging (per-token outputs): ``X ~= W X'`` - each original token is the convex combination of the
output tokens it was assigned to (a copy of its anchor for the one-hot methods). Several stages
compose: ``X ~= W_1 W_2 ... X''``.

All shapes are static (``Mp`` is fixed when the pass runs): ``topk`` with a constant ``k``, one-hot
matrices from comparisons with ``arange``, ``gather``, ``softmax``, ``matmul``, ``cat`` - so the result
exports to ONNX and compiles on TVM.
Input tokens whose key the attention mask hides (padding) get no weight in ``T`` and no importance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("transform", "merge", "prune", "fuse", "bipartite")
SIMILARITIES = ("hidden", "keys")
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
    """One reduction stage: ``(x, [q, k, mask, size]) -> (x', W, index, size')``.

    Args:
        prefix: tokens kept apart at the front (CLS, distillation token).
        keep_count: output tokens ``Mp`` among the ``Np`` other tokens.
        method: ``transform``, ``merge``, ``prune``, ``fuse`` or ``bipartite`` (module docstring).
        temperature: softmax temperature of ``transform``'s assignment (cosine similarities).
        scale: the attention's softmax scale (importance from its CLS query).
        similarity: what the cosine similarities compare: ``hidden`` (the tokens) or ``keys`` (the
            attention's keys, mean over heads; the tokens where there is no attention).
        weighted: average merged tokens by their sizes (ToMe's size-weighted mean) rather than equally.

    ``forward(x, q=None, k=None, mask=None, size=None)``: ``x`` ``(B, N, d)``; ``q``, ``k`` an
    attention over these tokens in ``(B, H, N, D)`` (importance = the CLS row of its softmax; without
    them the token norm), ``mask`` its mask; ``size`` ``(B, N)`` how many original tokens each token
    stands for (ones when absent). Returns ``x'`` ``(B, P + Mp, d)``, the assignment ``W`` ``(B, Np, Mp)``
    (for un-merging), the kept positions ``(B, P + Mp)`` (int64, the prefix first; a merged token's
    is one of its members') for gathering masks, and the sizes ``(B, P + Mp)`` (float32) of the output
    tokens: ``size' = W^T size`` (the prefix's unchanged; ``prune`` keeps the anchors' sizes).
    """

    def __init__(self, *, prefix: int, keep_count: int, method: str = "transform", temperature: float = 0.1,
                 scale: float = 1.0, similarity: str = "hidden", weighted: bool = False) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
        if method == "fuse" and keep_count < 2:
            raise ValueError("method fuse keeps at least one anchor and the fused token (keep_count >= 2)")
        self.prefix, self.keep_count, self.method = int(prefix), int(keep_count), method
        self.temperature, self.scale = float(temperature), float(scale)
        self.similarity, self.weighted = similarity, bool(weighted)

    def extra_repr(self) -> str:
        return (f"prefix={self.prefix}, keep_count={self.keep_count}, method={self.method}, "
                f"temperature={self.temperature:g}, similarity={self.similarity}, weighted={self.weighted}")

    def forward(self, x: torch.Tensor, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, size: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        p, mp = self.prefix, self.keep_count
        xp = x[:, p:]
        size = torch.ones(b, n, device=x.device) if size is None else size.float()
        valid = _valid_keys(mask, b, n)
        vp = torch.ones(b, n - p, device=x.device) if valid is None else valid[:, p:]
        feats = k.float().mean(1)[:, p:] if self.similarity == "keys" and k is not None else xp.float()
        fn = F.normalize(feats, dim=-1)
        importance = None
        if self.method == "bipartite":
            w, kept = _bipartite(fn, vp, mp)
        else:
            importance = self._importance(xp, q, k, mask, valid)
            w, kept = self._anchored(fn, importance)
        sp = size[:, p:] * vp  # padding stands for nothing
        if self.method == "prune":
            t = (kept.unsqueeze(-1) == torch.arange(n - p, device=x.device)).float()  # (B, Mp, Np) one-hot rows
            new_size = size[:, p:].gather(1, kept)
        else:
            mass = w * (sp if self.weighted else vp).unsqueeze(-1)
            if self.method == "fuse":  # the fused token is the attention-weighted mean of its members (EViT)
                mass = mass * importance.unsqueeze(-1).clamp_min(1e-12)
            t = (mass / mass.sum(1, keepdim=True).clamp_min(1e-12)).transpose(1, 2)  # (B, Mp, Np)
            new_size = (w * sp.unsqueeze(-1)).sum(1)
        reduced = (t @ xp.float()).to(x.dtype)
        out = torch.cat([x[:, :p], reduced], dim=1)
        front = torch.arange(p, device=x.device).unsqueeze(0).expand(b, p)
        return out, w.to(x.dtype), torch.cat([front, kept + p], dim=1), torch.cat([size[:, :p], new_size], dim=1)

    def _importance(self, xp, q, k, mask, valid) -> torch.Tensor:
        """``(B, Np)``: the attention the CLS query gives each token (mean over heads), else the token norm."""
        p = self.prefix
        if q is not None and k is not None:
            scores = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * self.scale  # (B, H, 1, N)
            if mask is not None:
                scores = scores.masked_fill(~mask[..., :1, :], float("-inf")) if mask.dtype == torch.bool \
                    else scores + mask[..., :1, :].float()
            return scores.softmax(-1).mean(1)[:, 0, p:]
        importance = xp.float().norm(dim=-1)
        return importance if valid is None else importance * valid[:, p:]

    def _anchored(self, fn: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``W`` and the anchors for the methods that keep the most important tokens as anchors."""
        b, np_, _ = fn.shape
        mp = self.keep_count
        ranked = _tie_broken(importance / importance.amax(-1, keepdim=True).clamp_min(1e-30))
        idx = ranked.topk(mp, dim=-1).indices
        if self.method == "fuse":  # the top Mp - 1 are anchors; every other token is fused into one more token
            own = (idx[:, :mp - 1].unsqueeze(-1) == torch.arange(np_, device=fn.device)).float()  # (B, Mp-1, Np)
            anchor_rows = own.transpose(1, 2)  # (B, Np, Mp-1)
            rest = 1 - anchor_rows.sum(-1, keepdim=True)
            return torch.cat([anchor_rows, rest], dim=-1), idx  # the fused token at its most important member
        an = fn.gather(1, idx.unsqueeze(-1).expand(b, mp, fn.shape[-1]))
        sim = fn @ an.transpose(1, 2)  # (B, Np, Mp) cosine similarities
        if self.method == "transform":
            return (sim / self.temperature).softmax(-1), idx
        hard = _tie_broken(sim)  # merge / prune: the most similar anchor (ties share the row)
        hard = (hard == hard.amax(-1, keepdim=True)).float()
        return hard / hard.sum(-1, keepdim=True), idx


def _bipartite(fn: torch.Tensor, vp: torch.Tensor, mp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching with static shapes: ``W`` ``(B, Np, Mp)`` (one-hot) and the kept positions.

    The tokens alternate between sets A (even positions) and B (odd); each A token's best match is
    its most similar B token; the ``r = Np - Mp`` A tokens with the best matches are merged into their
    match, the other A tokens and every B token stay. Output order: the unmerged A tokens (best
    match last), then B. A padding token (``vp`` 0) is merged first and never merged into.
    """
    b, np_, _ = fn.shape
    na, nb = (np_ + 1) // 2, np_ // 2
    r = np_ - mp
    a, bset = fn[:, 0::2], fn[:, 1::2]
    sim = a @ bset.transpose(1, 2)  # (B, Na, Nb)
    sim = sim - (1 - vp[:, 1::2]).unsqueeze(1) * 4.0  # never into padding
    best, match = _tie_broken(sim).max(-1)
    best = best + (1 - vp[:, 0::2]) * 4.0  # padding first
    order = _tie_broken((best + 1) / 6).topk(na, dim=-1).indices  # A tokens, best match first
    rank = ((order.unsqueeze(-1) == torch.arange(na, device=fn.device)).float()
            * torch.arange(na, device=fn.device, dtype=torch.float32).view(1, na, 1)).sum(1).long()  # (B, Na)
    col_a = torch.where(rank >= r, rank - r, (na - r) + match)
    col_b = (na - r) + torch.arange(nb, device=fn.device).unsqueeze(0).expand(b, nb)
    back = torch.tensor([i // 2 if i % 2 == 0 else na + i // 2 for i in range(np_)], device=fn.device)
    col = torch.cat([col_a, col_b], dim=1).index_select(1, back)  # (B, Np), original order
    w = (col.unsqueeze(-1) == torch.arange(mp, device=fn.device)).float()
    kept_a = order[:, r:] * 2  # positions of the unmerged A tokens
    kept_b = (torch.arange(nb, device=fn.device) * 2 + 1).unsqueeze(0).expand(b, nb)
    return w, torch.cat([kept_a, kept_b], dim=1)


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
