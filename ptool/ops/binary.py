"""``torch.ops.ptool_shift.binary_attention``: Hamming-similarity attention on packed binary codes.

The op is the graph form of :func:`ptool.ops.shift_arith.binary_attention_reference` (the
definition; read its docstring for the arithmetic). It has

- a **torch implementation** (what ``m2(x)`` runs), vectorised: codes unpacked to +-1, values
  quantized to int8 per column with :func:`~ptool.ops.shift_arith.quantize_columns_int8`,
  the integer sums done by float matmuls on exact small integers, the float epilogue as in the
  reference. It equals the reference bit for bit (tests);
- a **fake kernel** (shapes only) for ``torch.export``;
- an **ONNX translation** (:func:`onnx_translations`, collected by ``ptool.export_onnx``): bits
  unpacked with ``BitwiseAnd`` against the 32 one-bit masks (signed int32 words need no shift),
  the same float matmuls, the same epilogue, so ONNX Runtime gives the same result;
- a **gradient** for ``v`` only (codes are integers): the straight-through gradient of the
  value quantization, ``dv = W^T dout`` with ``W`` the normalized Hamming rows. The hash that
  makes the codes is trained through a float surrogate by the kernel, not through this op.

Exactness. Every intermediate is an integer with ``|x| <= 2 * 127 * bits * M`` (``M`` keys): a
float32 matmul sums such integers exactly while that is ``<= 2**24``, i.e. ``bits * M <= 66 052``
(64 bits x 1 032 keys, 16 bits x 4 128 keys); past it the sums run in float64 (exact to
``2**53``). The integer results are then rounded to float32 exactly as the reference's
``int32 -> float32`` casts round them, so the choice of float type never changes the output.
"""

from __future__ import annotations

import functools

import torch

from ptool.ops.shift_arith import INT8_MAX, quantize_columns_int8, unpack_codes

_LIB = "ptool_shift"
FLOAT32_EXACT_LIMIT = 2**24
"""Integers up to this magnitude are exact in float32 (and so are their sums that stay below it)."""


def exact_float_dtype(bits: int, keys: int) -> torch.dtype:
    """float32 where every partial sum of the op stays exact (module docstring), else float64."""
    return torch.float32 if 2 * INT8_MAX * bits * keys <= FLOAT32_EXACT_LIMIT else torch.float64


def _keep_rows(key_keep: torch.Tensor | None, k_codes: torch.Tensor) -> torch.Tensor:
    if key_keep is None:
        return torch.ones(k_codes.shape[0], k_codes.shape[2], dtype=torch.bool, device=k_codes.device)
    return key_keep.bool()


def _binary_attention(q_codes: torch.Tensor, k_codes: torch.Tensor, v: torch.Tensor,
                      key_keep: torch.Tensor | None, bits: int) -> torch.Tensor:
    dt = exact_float_dtype(bits, k_codes.shape[-2])
    keep = _keep_rows(key_keep, k_codes)
    keep_f = keep[:, None, :, None].to(dt)  # (B, 1, M, 1)
    v_int, sv = quantize_columns_int8(v * keep[:, None, :, None].to(v.dtype))
    v_kept = v_int.to(dt) * keep_f
    h_k = unpack_codes(k_codes, bits).to(dt) * keep_f
    h_q = unpack_codes(q_codes, bits).to(dt)
    kv = h_k.transpose(-1, -2) @ v_kept  # (B, H, bits, Dv): additions/subtractions of v_int rows
    ksum = h_k.sum(-2, keepdim=True)  # (B, H, 1, bits)
    vsum = v_kept.sum(-2, keepdim=True)  # (B, H, 1, Dv)
    count = keep.to(dt).sum(-1)[:, None, None, None]  # (B, 1, 1, 1)
    num = bits * vsum + h_q @ kv
    den = (bits * count + h_q @ ksum.transpose(-1, -2)).clamp_min(1)  # (B, H, N, 1)
    return (num.to(torch.float32) / den.to(torch.float32)) * sv


@torch.library.custom_op(f"{_LIB}::binary_attention", mutates_args=())
def binary_attention(q_codes: torch.Tensor, k_codes: torch.Tensor, v: torch.Tensor,
                     key_keep: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Hamming-similarity linear attention on packed codes (``arith.binary_attention_reference``).

    Args:
        q_codes: ``(B, H, N, W)`` int32 words of the query codes (``W = ceil(bits / 32)``).
        k_codes: ``(B, H, M, W)`` int32 words of the key codes.
        v: ``(B, H, M, Dv)`` float values.
        key_keep: ``(B, M)`` bool, False for padded keys, or None (every key kept).
        bits: code length ``b``.

    Returns:
        ``(B, H, N, Dv)`` float32.
    """
    return _binary_attention(q_codes, k_codes, v, key_keep, bits)


@binary_attention.register_fake
def _(q_codes, k_codes, v, key_keep, bits):
    return v.new_empty(*q_codes.shape[:3], v.shape[-1], dtype=torch.float32)


def hamming_rows(q_codes: torch.Tensor, k_codes: torch.Tensor, key_keep: torch.Tensor | None,
                 bits: int) -> torch.Tensor:
    """The ``(B, H, N, M)`` float32 weights the op applies to the (quantized) values (quadratic)."""
    keep = _keep_rows(key_keep, k_codes)[:, None, None, :].to(torch.float64)
    h_q = unpack_codes(q_codes, bits).to(torch.float64)
    h_k = unpack_codes(k_codes, bits).to(torch.float64)
    sim = (bits + h_q @ h_k.transpose(-1, -2)) * keep
    return (sim / sim.sum(-1, keepdim=True).clamp_min(1)).to(torch.float32)


def _setup(ctx, inputs, output):
    q_codes, k_codes, v, key_keep, ctx.bits = inputs
    ctx.v_dtype = v.dtype
    ctx.save_for_backward(q_codes, k_codes, key_keep)


def _backward(ctx, grad):
    q_codes, k_codes, key_keep = ctx.saved_tensors
    rows = hamming_rows(q_codes, k_codes, key_keep, ctx.bits)
    return None, None, (rows.transpose(-1, -2) @ grad.float()).to(ctx.v_dtype), None, None


binary_attention.register_autograd(_backward, setup_context=_setup)


def is_binary_op(target: object) -> bool:
    """Whether an FX node target is this module's op."""
    return target is torch.ops.ptool_shift.binary_attention.default


# ---------------------------------------------------------------------------------------------
# ONNX translation (onnxscript, traced by torch.onnx's exporter)


def _static_keys(k_codes) -> int | None:
    shape = getattr(k_codes, "shape", None)
    try:
        keys = shape[2] if shape is not None else None
    except (IndexError, TypeError):
        return None
    return keys if isinstance(keys, int) else None


@functools.cache
def onnx_translations() -> dict:
    """``custom_translation_table`` entries for ``torch.onnx.export``: the op -> its ONNX form."""
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset18 as op

    def const(value, dtype):
        return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

    def signs(codes, bits: int, float_type, np_float):
        """int32 words ``(..., W)`` -> +-1 ``(..., bits)`` in ``float_type``."""
        words = (bits + 31) // 32
        one_bit = np.array([1 << c for c in range(32)], dtype=np.uint32).view(np.int32)  # bit 31 = INT32_MIN
        hit = op.Not(op.Equal(op.BitwiseAnd(op.Unsqueeze(codes, const([-1], np.int64)), const(one_bit, np.int32)),
                              const(0, np.int32)))  # (..., W, 32)
        h = op.Where(hit, const(1, np_float), const(-1, np_float))
        flat = op.Reshape(h, const([0, 0, 0, words * 32], np.int64))
        return op.Slice(flat, const([0], np.int64), const([bits], np.int64), const([-1], np.int64))

    def binary_attention_onnx(q_codes, k_codes, v, key_keep, bits: int):
        keys = _static_keys(k_codes)
        exact32 = keys is not None and exact_float_dtype(bits, keys) == torch.float32
        float_type, np_float = (ir.DataType.FLOAT, np.float32) if exact32 else (ir.DataType.DOUBLE, np.float64)
        rows = const([-2], np.int64)
        h_q = signs(q_codes, bits, float_type, np_float)
        h_k = signs(k_codes, bits, float_type, np_float)
        if key_keep is None:
            vm = v
            count = op.Cast(op.Slice(op.Shape(k_codes), const([2], np.int64), const([3], np.int64)), to=float_type)
        else:
            keep = op.Unsqueeze(key_keep, const([1, 3], np.int64))  # (B, 1, M, 1)
            vm = op.Mul(v, op.Cast(keep, to=ir.DataType.FLOAT))
            keep_f = op.Cast(keep, to=float_type)
            h_k = op.Mul(h_k, keep_f)
            count = op.ReduceSum(keep_f, const([2], np.int64), keepdims=1)  # (B, 1, 1, 1)
        amax = op.ReduceMax(op.Abs(vm), rows, keepdims=1)
        sv = op.Max(op.Div(amax, const(INT8_MAX, np.float32)), const(np.finfo(np.float32).tiny, np.float32))
        v_int = op.Clip(op.Round(op.Div(vm, sv)), const(-INT8_MAX, np.float32), const(INT8_MAX, np.float32))
        v_kept = op.Cast(v_int, to=float_type)  # padded rows are already 0
        kv = op.MatMul(op.Transpose(h_k, perm=[0, 1, 3, 2]), v_kept)
        ksum = op.ReduceSum(h_k, rows, keepdims=1)
        vsum = op.ReduceSum(v_kept, rows, keepdims=1)
        b = const(bits, np_float)
        num = op.Add(op.Mul(b, vsum), op.MatMul(h_q, kv))
        den = op.Max(op.Add(op.Mul(b, count), op.MatMul(h_q, op.Transpose(ksum, perm=[0, 1, 3, 2]))),
                     const(1, np_float))
        return op.Mul(op.Div(op.Cast(num, to=ir.DataType.FLOAT), op.Cast(den, to=ir.DataType.FLOAT)), sv)

    return {torch.ops.ptool_shift.binary_attention.default: binary_attention_onnx}
