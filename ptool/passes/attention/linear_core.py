"""The linear-attention core shared by every feature map: parallel, chunked-causal and recurrent.

Given feature maps ``fq = phi(q)`` ``(B, H, N, m)`` and ``fk = phi(k)`` ``(B, H, M, m)``:

* **non-causal** (associativity): ``S = fk^T v`` ``(m, Dv)`` and ``z = sum_j fk_j`` first, then
  ``o_i = fq_i S / (fq_i . z + eps)`` - cost ``O(N m Dv)``, never the ``N x M`` matrix;
* **causal** (chunked): the sequence is cut into chunks of ``C`` tokens; inside a chunk the masked
  quadratic form (``C x C``), across chunks the running state ``(S, z)`` of all earlier chunks
  (an exclusive prefix sum over chunk summaries). Cost ``O(N C m + N m Dv)``, memory
  ``O(N/C * m * Dv)``; no ``(N, m, Dv)`` cumsum tensor and no Python loop, so it exports to ONNX as
  plain MatMul / CumSum;
* **recurrent** (decode): one token at a time with the constant-size state ``(S, z)`` in place of
  a KV cache.

All three agree with :func:`quadratic_linear_attention` (the masked ``fq fk^T`` reference).
Sums are taken in float32 (the denominators can approach 0); ``eps`` guards the division.
Padded keys are removed by zeroing their features (``keep``), as LoLCATs does: an additive
``-inf`` mask means nothing to a linear kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_EPS = 1e-6
DEFAULT_CHUNK = 64


def _apply_keep(fk: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return fk if keep is None else fk * keep.to(fk.dtype)


def linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     keep: torch.Tensor | None = None, normalize: bool = True, eps: float = DEFAULT_EPS,
                     chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``sum_j (fq_i . fk_j) v_j`` [``/ sum_j fq_i . fk_j``] without the quadratic matrix.

    Args:
        fq, fk: query / key features ``(B, H, N, m)`` / ``(B, H, M, m)``.
        v: values ``(B, H, M, Dv)``.
        causal: query ``i`` sees keys ``j <= i`` (self-attention: ``N == M``).
        keep: ``(B, 1|H, M, 1)`` 0/1 key factor (padding), or None.
        normalize: divide by the row sum (``False``: TransNormer's NormAttention numerator only).
        eps: added to the denominator.
        chunk: chunk length of the causal form.

    Returns:
        ``(B, H, N, Dv)`` in ``v``'s dtype.
    """
    dtype = v.dtype
    fq, fk, v = fq.float(), _apply_keep(fk.float(), keep), v.float()
    if not causal:
        kv = fk.transpose(-1, -2) @ v  # (B, H, m, Dv)
        out = fq @ kv
        if normalize:
            z = fk.sum(-2, keepdim=True).transpose(-1, -2)  # (B, H, m, 1)
            out = out / (fq @ z + eps)
        return out.to(dtype)
    return _chunked_causal(fq, fk, v, normalize=normalize, eps=eps, chunk=chunk).to(dtype)


def _chunked_causal(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, *, normalize: bool, eps: float,
                    chunk: int) -> torch.Tensor:
    n = fq.shape[-2]
    if fk.shape[-2] != n:
        raise ValueError(f"causal linear attention needs as many keys as queries, got {fk.shape[-2]} and {n}")
    c = max(1, min(chunk, n))
    pad = (-n) % c
    if pad:  # zero features add nothing to any sum
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    b, h, total, m = fq.shape
    nc = total // c
    fq_c = fq.reshape(b, h, nc, c, m)
    fk_c = fk.reshape(b, h, nc, c, m)
    v_c = v.reshape(b, h, nc, c, v.shape[-1])
    tri = torch.ones(c, c, dtype=torch.bool, device=fq.device).tril()
    scores = (fq_c @ fk_c.transpose(-1, -2)).masked_fill(~tri, 0.0)  # (B, H, nc, C, C) inside chunks
    kv = fk_c.transpose(-1, -2) @ v_c  # (B, H, nc, m, Dv): each chunk's summary
    kv_before = torch.cumsum(kv, dim=2) - kv  # state from strictly earlier chunks
    out = scores @ v_c + fq_c @ kv_before
    if normalize:
        zc = fk_c.sum(-2)  # (B, H, nc, m)
        z_before = (torch.cumsum(zc, dim=2) - zc).unsqueeze(-1)
        den = scores.sum(-1, keepdim=True) + fq_c @ z_before
        out = out / (den + eps)
    return out.reshape(b, h, total, -1)[:, :, :n]


def quadratic_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                               keep: torch.Tensor | None = None, normalize: bool = True,
                               eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The same attention through the materialized ``(N, M)`` weights: the reference for tests."""
    dtype = v.dtype
    fq, fk, v = fq.double(), _apply_keep(fk.double(), keep), v.double()
    a = fq @ fk.transpose(-1, -2)
    if causal:
        n, m = a.shape[-2:]
        a = a.masked_fill(~torch.ones(n, m, dtype=torch.bool, device=a.device).tril(m - n), 0.0)
    out = a @ v
    if normalize:
        out = out / (a.sum(-1, keepdim=True) + eps)
    return out.to(dtype)


def linear_weights(fq: torch.Tensor, fk: torch.Tensor, *, causal: bool = False, keep: torch.Tensor | None = None,
                   eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The normalized ``(B, H, N, M)`` attention rows a linear kernel implies (for distillation)."""
    a = fq.float() @ _apply_keep(fk.float(), keep).transpose(-1, -2)
    if causal:
        n, m = a.shape[-2:]
        a = a.masked_fill(~torch.ones(n, m, dtype=torch.bool, device=a.device).tril(m - n), 0.0)
    return a / (a.sum(-1, keepdim=True) + eps)


def init_state(fk_like: torch.Tensor, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty decode state ``(S (B, H, m, Dv), z (B, H, m))`` for features shaped like ``fk_like``."""
    b, h, _, m = fk_like.shape
    return (torch.zeros(b, h, m, value_dim, dtype=torch.float32, device=fk_like.device),
            torch.zeros(b, h, m, dtype=torch.float32, device=fk_like.device))


def recurrent_step(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], *,
                   normalize: bool = True, eps: float = DEFAULT_EPS,
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One causal decode step: add token ``t``'s key/value to the state, then read it with ``q_t``.

    Args:
        fq, fk: ``(B, H, 1, m)`` features of the new token; v: ``(B, H, 1, Dv)``.
        state: ``(S, z)`` from :func:`init_state` or the previous step.

    Returns:
        ``(o_t (B, H, 1, Dv), new_state)``.
    """
    s, z = state
    fq32, fk32 = fq.float(), fk.float()
    s = s + fk32.transpose(-1, -2) @ v.float()
    z = z + fk32.squeeze(-2)
    out = fq32 @ s
    if normalize:
        out = out / (fq32 @ z.unsqueeze(-1) + eps)
    return out.to(v.dtype), (s, z)
