"""Relax lowering of the ``ptool_shift`` ops onto the TIR kernels of :mod:`.shiftadd`.

``from_exported_program(ep, custom_convert_map=convert_map(ep))`` hands each op node to a
converter ``(node, importer) -> relax.Expr``. The converters build, with the importer's block
builder, the arithmetic of :mod:`ptool.ops.shift_arith`:

- ``shift_linear``: per-row int8 quantization in Relax ops (``round`` is round-half-to-even, as
  ``torch.round``), the codes transposed to k-major (constant: folded at build time), the
  integer accumulator from :func:`.shiftadd.matshift` (or :func:`.shiftadd.matadd` when every
  exponent is 0: ternary / binary weights) through ``call_tir``, then ``acc * sx * alpha + bias``
  in float32, in the op's order. The accumulator is exact; the epilogue is the same float32 ops.
- ``binary_attention``: the values quantized per column in Relax, then two additive kernels per
  (batch, head): :func:`.shiftadd.masked_accumulate` for ``kv`` (with the keep mask appended as
  one more value column, so the same pass also yields ``ksum``) and :func:`.shiftadd.sign_matmul`
  for ``h_q @ [kv | ksum]``; the float epilogue as in the reference.

Kernels are added to the module once per distinct shape (the block builder deduplicates equal
PrimFuncs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from tvm import relax, tirx

from ptool.backends.tvm_kernels import shiftadd
from ptool.ops.shift_arith import INT8_MAX

_OPAQUE = 8  # relax OpPatternKind.kOpaque
_TINY = float(np.finfo(np.float32).tiny)


def convert_map(ep: torch.export.ExportedProgram) -> dict[str, Callable[[Any, Any], relax.Expr]]:
    """``custom_convert_map`` entries for the ``ptool_shift`` ops present in ``ep`` (may be empty)."""
    present = {str(node.target.__name__) for node in ep.graph.nodes
               if node.op == "call_function" and getattr(node.target, "namespace", None) == "ptool_shift"}
    converters = {
        "shift_linear.default": lambda node, importer: _shift_linear(node, importer, _constants(ep)),
        "binary_attention.default": _binary_attention,
    }
    return {name: conv for name, conv in converters.items() if name in present}


def _constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> value for the program's parameters, buffers and constants."""
    values = {**ep.state_dict, **ep.constants}
    return {spec.arg.name: values[spec.target] for spec in ep.graph_signature.input_specs
            if spec.target is not None and spec.target in values}


def _add_kernel(bb: relax.BlockBuilder, func: tirx.PrimFunc, name: str) -> relax.GlobalVar:
    """Add a kernel to the module under construction: its own ``main`` symbol dropped (the module
    names it), marked opaque so that operator fusion leaves the scheduled loop nest alone."""
    return bb.add_func(func.without_attr("global_symbol").with_attr("op_pattern", _OPAQUE), name)


def _shape(expr: relax.Expr) -> list[tirx.PrimExpr]:
    return list(expr.ty.shape.values)


def _static(dim: tirx.PrimExpr) -> int | None:
    return int(dim.value) if isinstance(dim, tirx.IntImm) else None


def _quantize_int8(bb: relax.BlockBuilder, x: relax.Expr, axis: int) -> tuple[relax.Expr, relax.Expr]:
    """``arith.quantize_rows_int8`` (axis=-1) / ``quantize_columns_int8`` (axis=-2) in Relax ops."""
    op = relax.op
    amax = bb.emit(op.max(op.abs(x), axis=[axis], keepdims=True))
    scale = bb.emit(op.maximum(op.divide(amax, relax.const(float(INT8_MAX), "float32")),
                               relax.const(_TINY, "float32")))
    rounded = op.round(op.divide(x, scale))
    x_int = bb.emit(op.astype(op.clip(rounded, -INT8_MAX, INT8_MAX), "int8"))
    return x_int, scale


def _shift_linear(node: Any, importer: Any, constants: Mapping[str, torch.Tensor]) -> relax.Expr:
    """``y = matshift(x_int, codes) * sx * alpha + bias`` (module docstring)."""
    op = relax.op
    bb = importer.block_builder
    x, sign, exp, alpha, bias = importer.retrieve_args(node)
    terms, n, k = (int(d) for d in _shape(sign))
    lead = _shape(x)[:-1]
    x_int, sx = _quantize_int8(bb, bb.emit(op.reshape(x, [-1, k])), axis=-1)
    rows = _shape(x_int)[0]
    sign_km = bb.emit(op.permute_dims(sign, [0, 2, 1]))
    if _all_zero(constants.get(getattr(node.args[2], "name", ""))):
        kernel = _add_kernel(bb, shiftadd.matadd(None, n, k, terms), "ptool_matadd")
        args = [x_int, sign_km]
    else:
        kernel = _add_kernel(bb, shiftadd.matshift(None, n, k, terms), "ptool_matshift")
        args = [x_int, sign_km, bb.emit(op.permute_dims(exp, [0, 2, 1]))]
    acc = bb.emit(relax.call_tir(kernel, args, relax.TensorType((rows, n), "int32")))
    y = op.multiply(op.multiply(op.astype(acc, "float32"), sx), alpha)
    if bias is not None:
        y = op.add(y, bias)
    return bb.emit(op.reshape(y, [*lead, n]))


def _all_zero(value: torch.Tensor | None) -> bool:
    return value is not None and not bool(value.any())


def _binary_attention(node: Any, importer: Any) -> relax.Expr:
    """``arith.binary_attention_reference`` with the two integer products on additive kernels."""
    op = relax.op
    bb = importer.block_builder
    q_codes, k_codes, v, key_keep, bits = importer.retrieve_args(node)
    bits = int(bits)
    batch, heads, queries, words = _shape(q_codes)
    keys, dv = _shape(v)[2], int(_shape(v)[3])
    if key_keep is None:
        keep_i8 = bb.emit(op.ones((batch, heads, keys, 1), "int8"))
    else:
        keep = op.reshape(key_keep, [batch, 1, keys, 1])
        v = bb.emit(op.multiply(v, op.astype(keep, "float32")))
        keep_i8 = bb.emit(op.broadcast_to(op.astype(keep, "int8"), (batch, heads, keys, 1)))
    v_int, sv = _quantize_int8(bb, v, axis=-2)  # padded rows are 0 in v, so 0 in v_int
    # value columns | keep | zero padding to whole 16-lane vectors
    width = -(-(dv + 1) // shiftadd.VECTOR_LANES) * shiftadd.VECTOR_LANES
    parts = [v_int, keep_i8]
    if width > dv + 1:
        parts.append(op.zeros((batch, heads, keys, width - dv - 1), "int8"))
    groups = batch * heads
    v_ext = bb.emit(op.reshape(op.concat(parts, axis=-1), [groups, keys, width]))
    kv_kernel = _add_kernel(bb, shiftadd.masked_accumulate(None, None, width, bits), "ptool_masked_accumulate")
    kv_ext = bb.emit(relax.call_tir(kv_kernel, [op.reshape(k_codes, [groups, keys, words]), v_ext],
                                    relax.TensorType((groups, bits, width), "int32")))  # [kv | ksum | 0]
    q_kernel = _add_kernel(bb, shiftadd.sign_matmul(None, None, width, bits), "ptool_sign_matmul")
    hq_kv = bb.emit(relax.call_tir(q_kernel, [op.reshape(q_codes, [groups, queries, words]), kv_ext],
                                   relax.TensorType((groups, queries, width), "int32")))
    sums = op.sum(op.astype(v_ext, "int32"), axis=[1], keepdims=True)  # [vsum | count | 0]
    num_ext = bb.emit(op.add(op.multiply(sums, relax.const(bits, "int32")), hq_kv))
    num_ext = bb.emit(op.reshape(num_ext, [batch, heads, queries, width]))
    num = op.strided_slice(num_ext, axes=[3], begin=[0], end=[dv])
    den = op.maximum(op.strided_slice(num_ext, axes=[3], begin=[dv], end=[dv + 1]), relax.const(1, "int32"))
    out = op.multiply(op.divide(op.astype(num, "float32"), op.astype(den, "float32")), sv)
    return bb.emit(out)
