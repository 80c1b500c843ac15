"""The shift linear layer as a graph op: ``torch.ops.ptool_shift.shift_linear(x, sign, exp, alpha, bias)``.

The arithmetic is :mod:`ptool.ops.shift_arith` (the definition every backend matches):

    x_int, sx = quantize_rows_int8(x)                                  # per row, symmetric int8
    acc       = sum_t sign[t] * (x_int << exp[t])   summed over K      # int32, exact
    y         = acc * sx * alpha + bias                                # float32

with ``x (..., K)`` float32, ``sign (T, N, K)`` int8 in {-1, 0, 1}, ``exp (T, N, K)`` int8 in
``[0, MAX_EXP]``, ``T`` in {1, 2}, ``alpha (N,)`` float32 and ``bias (N,)`` float32 or None.

The op has

- a **torch implementation** (what ``m2(x)`` runs): ``W_int = sum_t sign_t * 2**exp_t`` as
  floats and one float matmul. Every product and partial sum is an integer; float32 holds them
  exactly while ``|acc| < 2**24``, which ``127 * max|W_int| * K`` bounds: K < 2064 with one
  term (``|W_int| <= 64``), K < 1376 with two (``<= 96``). Wider layers use float64 (exact below
  ``2**53``). So ``acc`` equals :func:`~ptool.ops.shift_arith.matshift_reference` bit for
  bit, and so does the float epilogue (same float32 ops in the same order);
- a **fake kernel** for ``torch.export``;
- a **straight-through gradient** (like :mod:`ptool.ops.quant`): the rounding of ``x``
  counts as the identity, ``dy/dx`` is the dequantized weight ``alpha * W_int``, the bias gets
  ``sum(dy)``; the codes and ``alpha`` get none. Distillation can train through the layer;
- a **float decomposition** (:func:`decompositions`) in plain aten ops for backends that take
  the torch graph and have no kernel of their own for it;
- an **ONNX translation** (:func:`onnx_translations`): the row quantization in float ops,
  ``MatMulInteger`` (int8 x int8 -> int32) against ``W_int`` (int8, transposed to ``(K, N)``;
  computed from ``sign``/``exp`` by constant ops that the exporter or ONNX Runtime folds into
  one initializer), then ``Cast`` and the same float epilogue. ONNX ``BitShift`` is unsigned
  only and has no fused shift-GEMM (METHODS 5.4), so ORT runs the power-of-two weights as the
  int8 matmul they equal.
"""

from __future__ import annotations

import functools

import torch

from ptool.ops.shift_arith import INT8_MAX, MAX_EXP, quantize_rows_int8, shift_weight_terms_int

_LIB = "ptool_shift"

#: float32 represents every integer below this exactly.
_FLOAT32_EXACT = 2**24


def max_weight_level(terms: int) -> int:
    """The largest ``|W_int|`` with ``terms`` power-of-two terms (exp2 < exp1 for two terms)."""
    return 2**MAX_EXP + (2 ** (MAX_EXP - 1) if terms == 2 else 0)


def accumulator_dtype(terms: int, in_features: int) -> torch.dtype:
    """float32 when every partial sum of ``acc`` stays below ``2**24`` (exact), else float64."""
    bound = INT8_MAX * max_weight_level(terms) * in_features
    return torch.float32 if bound < _FLOAT32_EXACT else torch.float64


def dequantized_weight(sign: torch.Tensor, exp: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``alpha[n] * W_int[n, k]`` as float32 ``(N, K)``: the float weight the layer stands for."""
    return shift_weight_terms_int(sign, exp).to(torch.float32) * alpha.to(torch.float32)[:, None]


def _shift_linear(x: torch.Tensor, sign: torch.Tensor, exp: torch.Tensor, alpha: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    x_int, sx = quantize_rows_int8(x)
    acc_dtype = accumulator_dtype(sign.shape[0], sign.shape[-1])
    w_int = shift_weight_terms_int(sign, exp).to(acc_dtype)
    acc = (x_int.to(acc_dtype) @ w_int.T).to(torch.float32)  # integer-valued, exact (module docstring)
    y = acc * sx * alpha
    return y + bias if bias is not None else y


@torch.library.custom_op(f"{_LIB}::shift_linear", mutates_args=())
def shift_linear(x: torch.Tensor, sign: torch.Tensor, exp: torch.Tensor, alpha: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``y = (sum_k x_int * sign * 2**exp) * sx * alpha + bias`` with ``x`` quantized per row to int8."""
    return _shift_linear(x, sign, exp, alpha, bias)


shift_linear.register_fake(lambda x, sign, exp, alpha, bias: x.new_empty(*x.shape[:-1], sign.shape[1]))


def _register_gradient() -> None:
    """Straight-through gradient (module docstring)."""

    def setup(ctx, inputs, output):
        x, sign, exp, alpha, bias = inputs
        ctx.save_for_backward(x, sign, exp, alpha, bias)

    def backward(ctx, grad):
        x, sign, exp, alpha, bias = ctx.saved_tensors
        grad_x = grad @ dequantized_weight(sign, exp, alpha).to(grad.dtype)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype) if bias is not None else None
        return grad_x.to(x.dtype), None, None, None, grad_bias

    shift_linear.register_autograd(backward, setup_context=setup)


_register_gradient()


def decompositions() -> dict:
    """Float decomposition of the op, for ``ExportedProgram.run_decompositions``."""
    return {torch.ops.ptool_shift.shift_linear.default: _shift_linear}


def is_shift_op(target: object) -> bool:
    return getattr(target, "namespace", None) == _LIB


@functools.cache
def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: ``shift_linear`` -> its int8 ONNX form."""
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset18 as op

    def const(value, dtype):
        return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

    def weight_int_t(sign, exp):
        """``W_int.T`` int8 ``(K, N)`` from the stored codes (constant: folded before it runs)."""
        power = op.Cast(op.BitShift(const(1, np.uint8), op.Cast(exp, to=ir.DataType.UINT8), direction="LEFT"),
                        to=ir.DataType.INT32)
        terms = op.Mul(op.Cast(sign, to=ir.DataType.INT32), power)
        w_int = op.ReduceSum(terms, const([0], np.int64), keepdims=0)  # (N, K), |w| <= 96
        return op.Cast(op.Transpose(w_int, perm=[1, 0]), to=ir.DataType.INT8)

    def shift_linear_onnx(x, sign, exp, alpha, bias):
        amax = op.ReduceMax(op.Abs(x), const([-1], np.int64), keepdims=1)
        sx = op.Max(op.Div(amax, const(INT8_MAX, np.float32)), const(np.finfo(np.float32).tiny, np.float32))
        rounded = op.Round(op.Div(x, sx))  # round half to even, as torch.round
        x_int = op.Cast(op.Clip(rounded, const(-INT8_MAX, np.float32), const(INT8_MAX, np.float32)),
                        to=ir.DataType.INT8)
        acc = op.MatMulInteger(x_int, weight_int_t(sign, exp))
        y = op.Mul(op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), sx), alpha)
        return y if bias is None else op.Add(y, bias)

    return {torch.ops.ptool_shift.shift_linear.default: shift_linear_onnx}
