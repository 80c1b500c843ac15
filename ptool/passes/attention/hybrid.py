"""LoLCATs' hybrid: exact softmax over a sliding window of keys, linear attention over the rest.

For query ``i`` with window ``W(i)`` (``|i - j| <= window // 2``; causal: ``i - window < j <= i``):

    o_i = [f_h sum_{j in W} e^{s_ij - c_i} v_j + (1 - f_h) sum_{j not in W} phi(q_i).phi(k_j) v_j]
          / [f_h sum_{j in W} e^{s_ij - c_i}     + (1 - f_h) sum_{j not in W} phi(q_i).phi(k_j)]

with ``s_ij = q_i.k_j * scale``, ``c_i`` the window's max score, one shared normalizer and a
per-head mixing factor ``f_h = sigmoid(w_h)`` (trainable; LoLCATs' ``window_factor``; it starts
at 0.9 here so a fresh conversion leans on the exact window). The linear part outside the window
is the full linear sum (associativity, or the chunked prefix form when causal) minus the in-window
linear terms, so nothing is quadratic: ``O(N window D + N m Dv)``. Padded keys are removed from
both parts; like every linear kernel, masks are read as key padding plus causality.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptool.passes.attention import linear_core as core
from ptool.passes.attention.kernel import AttentionKernel, causal_allowed, key_keep
from ptool.passes.attention.sparse import WindowAttention, _windows

WINDOW_FACTOR_INIT = 2.197  # sigmoid(2.197) = 0.9 on the window


class SlidingWindowHybrid(AttentionKernel):
    """Sliding-window softmax + linear attention elsewhere, one normalizer (LoLCATs).

    Args:
        linear: the linear kernel whose feature map serves the keys outside the window (a
            :class:`~ptool.passes.attention.linear.LinearKernel` with ``features``, normalized).
        window: the window width in tokens.

    Raises:
        ValueError: the linear kernel has no feature map with a normalizer, or ``q_len != kv_len``.
    """

    def __init__(self, linear: AttentionKernel, window: int) -> None:
        super().__init__(linear.shape)
        if not hasattr(linear, "features") or not getattr(linear, "normalize", False):
            raise ValueError(f"a sliding-window hybrid needs a normalized feature-map kernel, not {type(linear).__name__}")
        if linear.shape.q_len != linear.shape.kv_len:
            raise ValueError("a sliding-window hybrid needs self-attention (q_len == kv_len)")
        self.linear = linear
        self.window = int(window)
        self._band = WindowAttention(linear.shape, window=self.window)
        self.window_logit = nn.Parameter(torch.full((linear.shape.heads, 1, 1), WINDOW_FACTOR_INIT))

    def _factor(self) -> torch.Tensor:
        return torch.sigmoid(self.window_logit)

    def forward(self, q, k, v, mask=None):
        b, h, n, _ = q.shape
        keep = key_keep(mask, torch.float32)
        fq, fk = self.linear.features(q, k, keep)
        fk = fk if keep is None else fk * keep
        ones = torch.ones(*v.shape[:-1], 1, dtype=torch.float32, device=v.device)
        v1 = torch.cat([v.float(), ones], dim=-1)  # numerator and normalizer in one pass
        total_lin = core.linear_attention(fq, fk, v1, causal=self.shape.causal, normalize=False,
                                          chunk=getattr(self.linear, "chunk_size", core.DEFAULT_CHUNK))
        # the window, blockwise (as WindowAttention): blocks of c queries x span keys
        c, lo, hi = self._band._plan(n)
        nb = -(-n // c)
        t = nb * c
        span = (hi - lo + 1) * c
        qb = F.pad(q.float(), (0, 0, 0, t - n)).reshape(b, h, nb, c, -1)
        fqb = F.pad(fq, (0, 0, 0, t - n)).reshape(b, h, nb, c, -1)
        kw, fkw, vw = (_windows(x, c, nb, lo, hi) for x in (k.float(), fk, v1))
        i = torch.arange(t, device=q.device).reshape(nb, c, 1)
        j = (torch.arange(nb, device=q.device) * c).reshape(nb, 1, 1) + lo * c + torch.arange(span, device=q.device)
        ok = ((j >= 0) & (j < n) & self._band._rel_ok(i - j)).to(torch.float32)  # (nb, c, span)
        if keep is not None:
            kk = _windows(keep.expand(b, 1, n, 1), c, nb, lo, hi).squeeze(-1).unsqueeze(-2)  # (B, 1, nb, 1, span)
            ok = ok * kk
        scores = (qb @ kw.transpose(-1, -2)) * self.shape.scale
        scores = scores.masked_fill(ok == 0, torch.finfo(torch.float32).min)
        shift = scores.max(dim=-1, keepdim=True).values.detach()
        a_sm = torch.exp(scores - shift) * ok
        a_lin = (fqb @ fkw.transpose(-1, -2)) * ok  # the linear terms inside the window, to remove
        f = self._factor().unsqueeze(-1)  # (H, 1, 1, 1)
        inside = (a_sm @ vw).reshape(b, h, t, -1)[:, :, :n]
        lin_in = (a_lin @ vw).reshape(b, h, t, -1)[:, :, :n]
        mixed = f.squeeze(-1) * inside + (1 - f.squeeze(-1)) * (total_lin - lin_in)
        out = mixed[..., :-1] / (mixed[..., -1:] + core.DEFAULT_EPS)
        return out.to(q.dtype)

    def attention_weights(self, q, k, mask=None):
        """Dense ``(B, H, N, M)`` rows of the same mixture (quadratic; distillation and tests)."""
        n = q.shape[-2]
        keep = key_keep(mask, torch.float32)
        fq, fk = self.linear.features(q, k, keep)
        band = self._band._pattern(n, n, q.device)
        visible = causal_allowed(n, n, q.device) if self.shape.causal else torch.ones_like(band)
        valid = visible.float() if keep is None else visible.float() * keep.transpose(-1, -2)
        inw = band.float() * valid
        scores = ((q.float() @ k.float().transpose(-1, -2)) * self.shape.scale).masked_fill(inw == 0, -math.inf)
        a_sm = torch.exp(scores - scores.max(dim=-1, keepdim=True).values.detach()).nan_to_num(0.0) * inw
        a_ln = (fq @ fk.transpose(-1, -2)) * (1 - band.float()) * valid
        f = self._factor()
        w = f * a_sm + (1 - f) * a_ln
        return (w / (w.sum(-1, keepdim=True) + core.DEFAULT_EPS)).to(q.dtype)
