"""The integer arithmetic of the shift-add layers: the definition every backend must match bit for bit.

Shift linear (``shift-linear``). A weight row ``w[n, :]`` becomes a per-channel float scale
``alpha[n]`` times small integers that are signed powers of two:

    W_int[n, k] = sign1[n, k] * 2**exp1[n, k]  (+ sign2[n, k] * 2**exp2[n, k] with terms=2)

with ``sign`` in {-1, 0, +1} (int8) and ``exp`` in [0, MAX_EXP] (int8), so ``|W_int| <= 127`` and
the layer is also an ordinary int8 matmul (what ONNX Runtime runs). Ternary and binary modes are
``exp == 0`` everywhere (``sign`` in {-1, 0, 1} / {-1, 1}). Activations are quantized per row
(per token) to int8, symmetric: ``x_int = clamp(round(x / sx), -127, 127)`` with
``sx = max|x| / 127``. Then

    acc[m, n] = sum_k sign1[n, k] * (x_int[m, k] << exp1[n, k]) (+ the second term)   (int32)
    y[m, n]   = acc[m, n] * sx[m] * alpha[n] + bias[n]                                (float32)

The inner loop is shifts and additions. ``|acc| <= 127 * 127 * K`` fits int32 for K < 133 000.

Binary codes (``binary-attention``). A code is ``b`` signs ``h in {-1, +1}`` stored as bits
(bit c set <=> h[c] = +1), packed little-endian into int32 words. ``h . h' = b - 2 * popcount(h xor h')``.
Values are quantized to int8 per (head, channel) column; the additive kernel is

    kv[c, n] = sum_j h[j, c] * v_int[j, n]            (int32; add or subtract, no multiply)
"""

from __future__ import annotations

import torch

MAX_EXP = 6  # 2**6 = 64; two terms with exp2 < exp1 stay <= 96 < 127
INT8_MAX = 127


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: ``(x_int as int8, sx as float32 with a trailing 1-dim)``."""
    amax = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    sx = (amax / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    x_int = torch.clamp(torch.round(x.to(torch.float32) / sx), -INT8_MAX, INT8_MAX).to(torch.int8)
    return x_int, sx


def shift_weight_int(sign: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """``sign * 2**exp`` as int32 (one term)."""
    return sign.to(torch.int32) * torch.bitwise_left_shift(torch.ones_like(exp, dtype=torch.int32), exp.to(torch.int32))


def matshift_reference(x_int: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``acc[m, n] = sum_k sum_t sign_t[n, k] * (x_int[m, k] << exp_t[n, k])`` as int32, exactly (int64 inside)."""
    w = sum(shift_weight_int(s, e).to(torch.int64) for s, e in terms)
    acc = x_int.to(torch.int64) @ w.T
    return acc.to(torch.int32)


def pack_codes(h: torch.Tensor) -> torch.Tensor:
    """Signs ``(..., b)`` (+1 / -1) -> int32 words ``(..., ceil(b / 32))``, bit c set where h[c] > 0."""
    bits = (h > 0).to(torch.int64)
    b = bits.shape[-1]
    words = (b + 31) // 32
    bits = torch.nn.functional.pad(bits, (0, words * 32 - b)).reshape(*bits.shape[:-1], words, 32)
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64), torch.arange(32))
    packed = (bits * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def code_dot_reference(q_codes: torch.Tensor, k_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``h_q . h_k = bits - 2 * popcount(q xor k)`` for packed codes ``(M, W)``, ``(N, W)`` -> int32 ``(M, N)``."""
    x = torch.bitwise_xor(q_codes[:, None, :].to(torch.int64) & 0xFFFFFFFF, k_codes[None, :, :].to(torch.int64) & 0xFFFFFFFF)
    count = torch.zeros(x.shape[:2], dtype=torch.int64)
    for bit in range(32):
        count += ((x >> bit) & 1).sum(-1)
    return (bits - 2 * count).to(torch.int32)


def masked_accumulate_reference(h: torch.Tensor, v_int: torch.Tensor) -> torch.Tensor:
    """``kv[c, n] = sum_j h[j, c] * v_int[j, n]`` for signs ``h (J, C)`` and integers ``v_int (J, N)`` -> int32."""
    return (h.to(torch.int64).T @ v_int.to(torch.int64)).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words ``(..., W)`` -> signs ``(..., bits)`` as int32 (+1 / -1)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32)
    bit = (words[..., None] >> shifts) & 1  # (..., W, 32)
    bit = bit.reshape(*packed.shape[:-1], -1)[..., :bits]
    return (2 * bit - 1).to(torch.int32)


def quantize_columns_int8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column symmetric int8 over the token axis (-2): ``(v_int int8, sv float32 (..., 1, Dv))``."""
    amax = v.abs().amax(dim=-2, keepdim=True).to(torch.float32)
    sv = (amax / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    v_int = torch.clamp(torch.round(v.to(torch.float32) / sv), -INT8_MAX, INT8_MAX).to(torch.int8)
    return v_int, sv


def binary_attention_reference(q_codes: torch.Tensor, k_codes: torch.Tensor, v: torch.Tensor,
                               key_keep: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Hamming-similarity linear attention on packed codes, integer inside, float out.

    ``q_codes (B, H, N, W)``, ``k_codes (B, H, M, W)`` int32 words; ``v (B, H, M, Dv)`` float;
    ``key_keep (B, M)`` bool (False = padding) or None. Similarity ``bits + h_q . h_k`` (twice
    ``bits - Hamming``, never negative). With ``v_int, sv = quantize_columns_int8(v)`` (over kept
    keys; padded rows zeroed first):

        kv[c, n] = sum_j keep_j h_k[j, c] v_int[j, n]    ksum[c] = sum_j keep_j h_k[j, c]
        vsum[n]  = sum_j keep_j v_int[j, n]              count   = sum_j keep_j
        num[i, n] = bits * vsum[n] + sum_c h_q[i, c] kv[c, n]          (int32)
        den[i]    = max(bits * count + sum_c h_q[i, c] ksum[c], 1)    (int32)
        out[i, n] = (num[i, n] / den[i]) * sv[n]                       (float32)
    """
    h_q = unpack_codes(q_codes, bits).to(torch.int64)
    h_k = unpack_codes(k_codes, bits).to(torch.int64)
    keep = torch.ones(h_k.shape[0], h_k.shape[2], dtype=torch.bool) if key_keep is None else key_keep.bool()
    keep64 = keep[:, None, :, None].to(torch.int64)
    v_int, sv = quantize_columns_int8(v * keep[:, None, :, None].to(v.dtype))
    v64 = v_int.to(torch.int64) * keep64
    kv = (h_k * keep64).transpose(-1, -2) @ v64  # (B, H, bits, Dv)
    ksum = (h_k * keep64).sum(-2)  # (B, H, bits)
    vsum = v64.sum(-2)  # (B, H, Dv)
    count = keep.to(torch.int64).sum(-1)[:, None, None]  # (B, 1, 1)
    num = bits * vsum[..., None, :] + h_q @ kv
    den = (bits * count + (h_q * ksum[..., None, :]).sum(-1)).clamp_min(1)
    return (num.to(torch.int32).to(torch.float32) / den.to(torch.int32).to(torch.float32)[..., None]) * sv


def shift_weight_terms_int(sign: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """``W_int = sum_t sign[t] * 2**exp[t]`` for stacked terms ``(T, N, K)`` -> int32 ``(N, K)``."""
    return shift_weight_int(sign, exp).sum(0, dtype=torch.int32)
