"""Quantized layers as graph ops: a torch reference, an ONNX lowering to integer kernels, a float decomposition.

The ``quantize`` pass replaces ``aten.linear`` / ``aten.embedding`` nodes by these ops, so the FX
graph says exactly what runs. Each op has

- a **torch implementation**, what ``m2(x)`` runs: for the int8 linears on the CPU a real integer
  kernel (``torch._int_mm``, int8 x int8 -> int32 on VNNI / AMX; about 5x a float32 matmul of
  the same shape here), elsewhere the integer arithmetic written in float (quantize the
  activation, multiply by the stored integer weight, rescale). Both give the same numbers up to
  float32 rounding of the sums. The torch backend runs the int4 linears on torch's packed int4
  CPU kernel instead (:func:`int4_packed_linear`; the weights repacked once when it builds the
  model, bf16 activations: within about 0.3% of the float32 reference);
- an **ONNX translation** (:func:`onnx_translations`, used by ``ptool.export_onnx``) to the ops
  ONNX Runtime runs as integer kernels:

  ==============================  ========================================================
  op                              ONNX
  ==============================  ========================================================
  ``linear_dynamic_int8``         ``DynamicQuantizeLinear`` -> ``MatMulInteger`` (u8 x s8)
                                  -> rescale (ORT fuses it into ``DynamicQuantizeMatMul``)
  ``linear_token_int8``           per-row ``max|x|`` scale -> int8 levels -> ``MatMulInteger``
                                  (s8 x s8) -> rescale by row and by channel
  ``linear_static_int8``          ``QuantizeLinear`` (calibrated scale) -> ``MatMulInteger``
                                  -> rescale (ORT: ``MatMulIntegerToFloat``). A QDQ pair
                                  around ``MatMul`` is not fused by ORT with per-channel
                                  weight scales and ran 1.4x slower than fp32.
  ``linear_int4``                 ``com.microsoft.MatMulNBits`` (4-bit weight-only, blocked)
  ``embedding_int8/int4``         ``Gather`` of the integer rows + unpack + rescale
  ``attention_int8``              the same arithmetic in float ops (levels as floats; the
                                  integer products are exact in float32 up to 1,040 keys)
  ==============================  ========================================================

- a **float decomposition** (:func:`decompositions`) for backends that take the torch graph
  and know no integer kernels (TVM): the same arithmetic in plain aten ops, so the results
  match but run in float;
- a **straight-through gradient** for the linears (:func:`_register_gradients`), so a pass that
  trains after ``quantize`` (repbn's fine-tune, attention distillation) can backpropagate through
  the quantized layers: the rounding of ``x`` counts as the identity (zero outside a static
  grid's range, as in quantization-aware training), ``dy/dx`` is the dequantized weight, and the
  bias gets ``sum(dy)``. The stored integer weights and scales get no gradient.

Storage: int8 weights transposed ``(in, out)`` with one scale per output channel; int4 weights
as MatMulNBits wants them: ``(out, in/2)`` bytes, two unsigned levels per byte (low nibble
first), and per ``group_size`` inputs of each output channel one scale and one 4-bit zero point
(packed the same way).
"""

from __future__ import annotations

import functools
import weakref

import torch

_LIB = "ptool_quant"


# ---------------------------------------------------------------------------------------------
# reference arithmetic (shared by the torch implementations and the float decompositions)


def dynamic_quantize_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX ``DynamicQuantizeLinear``: ``(levels, scale, zero_point)`` over the range of ``x`` and 0."""
    lo = x.min().clamp(max=0)
    hi = x.max().clamp(min=0)
    scale = ((hi - lo) / 255).clamp_min(torch.finfo(torch.float32).tiny)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 255)
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 255), scale, zero_point


def unpack_nibbles(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Unsigned 4-bit values (as float) from bytes holding two each, low nibble first."""
    # floor-division and remainder rather than shift and mask: the same values for bytes, and ops every
    # backend's importer takes (TVM's exported-program frontend has no bitwise_right_shift)
    wide = packed.to(torch.int32)
    high = torch.div(wide, 16, rounding_mode="floor")
    low = (wide - high * 16).to(torch.float32)
    high = high.to(torch.float32)
    values = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return values[..., :width]


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_nibbles` for values in ``[0, 15]`` along the last axis (padded to even)."""
    u = values.to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def _dequantize_groups(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of 4-bit levels minus their per-group zero points, times the per-group scales."""
    groups = scales.shape[-1]
    levels = unpack_nibbles(packed, width)
    shaped = levels.reshape(*levels.shape[:-1], groups, width // groups)
    zero = unpack_nibbles(zeros, groups).unsqueeze(-1)
    return ((shaped - zero) * scales.unsqueeze(-1)).reshape(levels.shape)


def _linear_dynamic_int8(x, weight_t, weight_scale, bias):
    xq, x_scale, x_zero = dynamic_quantize_uint8(x)
    y = ((xq - x_zero) @ weight_t.to(x.dtype)) * (x_scale * weight_scale)
    return y + bias if bias is not None else y


def token_quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 levels (as float) of each row of ``x`` over its own ``max|x|``, and the row scales."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return torch.clamp(torch.round(x / scale), -127, 127), scale


def _linear_token_int8(x, weight_t, weight_scale, bias):
    xq, x_scale = token_quantize_int8(x)
    y = (xq @ weight_t.to(x.dtype)) * x_scale * weight_scale
    return y + bias if bias is not None else y


# ---------------------------------------------------------------------------------------------
# integer kernels: what the torch ops run (torch._int_mm: int8 x int8 -> int32, VNNI / AMX on x86)

_COLUMN_SUMS: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _column_sums(weight_t: torch.Tensor) -> torch.Tensor:
    """``sum_k W[k, n]`` as int32, computed once per stored weight (and again if it is modified);
    an entry goes when its weight is freed."""
    key = id(weight_t)
    cached = _COLUMN_SUMS.get(key)
    if cached is None or cached[0]() is not weight_t or cached[1] != weight_t._version:
        ref = weakref.ref(weight_t, lambda _, key=key: _COLUMN_SUMS.pop(key, None))
        cached = (ref, weight_t._version, weight_t.sum(0, dtype=torch.int32))
        _COLUMN_SUMS[key] = cached
    return cached[2]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


def _int8_linear_dynamic(x, weight_t, weight_scale, bias, column_sums=_column_sums):
    """:func:`_linear_dynamic_int8` on integers: the uint8 levels shifted by 128 into int8 for
    ``_int_mm``, the shift put back exactly as ``(128 - zero) * column sums`` (int32)."""
    xq, x_scale, x_zero = dynamic_quantize_uint8(_rows(x))
    acc = torch._int_mm((xq - 128).to(torch.int8), weight_t)
    acc = acc + (128 - x_zero).to(torch.int32) * column_sums(weight_t)
    y = acc.to(torch.float32) * (x_scale * weight_scale)
    y = y + bias if bias is not None else y
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def _int8_linear_token(x, weight_t, weight_scale, bias):
    """:func:`_linear_token_int8` on integers (``_int_mm`` of the int8 rows and weights)."""
    xq, x_scale = token_quantize_int8(_rows(x))
    acc = torch._int_mm(xq.to(torch.int8), weight_t)
    y = acc.to(torch.float32) * x_scale * weight_scale
    y = y + bias if bias is not None else y
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def _int8_attention(q, k, v, mask, scale: float, causal: bool):
    """:func:`_attention_int8` on integers: two ``_int_mm`` per (batch, head), the softmax between
    them on the int32 scores. Each head is quantized on its own, so under ``torch.compile`` its
    scales are a buffer of their own and the softmax kernel reads scores and scales along rows."""
    batch, rows, cols = q.shape[:-2], q.shape[-2], k.shape[-2]
    q, k, v = (x.reshape(-1, *x.shape[-2:]) for x in (q, k, v))
    extra = _additive_mask(mask, causal, rows, cols, q)
    if extra is not None:  # (..., rows or 1, cols) broadcast to the batch: indexed, never copied
        extra = extra.reshape(*([1] * (len(batch) + 2 - extra.dim())), *extra.shape)
    outs = []
    for i in range(q.shape[0]):
        qq, sq = token_quantize_int8(q[i].float())
        kq, sk = token_quantize_int8(k[i].float())
        vq, sv = token_quantize_int8(v[i].float().transpose(0, 1))
        scores = torch._int_mm(qq.to(torch.int8), kq.to(torch.int8).transpose(0, 1).contiguous()).float()
        scores = scores * (sq * scale) * sk.transpose(0, 1)
        if extra is not None:
            at = [j if n > 1 else 0 for j, n in zip(_unravel(i, batch), extra.shape[:-2])]
            scores = scores + extra[tuple(at)]
        p, sums = probability_levels(scores)
        out = torch._int_mm(p.to(torch.int8), vq.to(torch.int8).transpose(0, 1).contiguous()).float()
        outs.append(out * (sv.transpose(0, 1) / sums))
    return torch.stack(outs).reshape(*batch, rows, -1).to(q.dtype)


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for n in reversed(shape):
        index, j = divmod(index, n)
        out.append(j)
    return out[::-1]


def _linear_static_int8(x, x_scale, x_zero, weight_t, weight_scale, bias):
    xq = torch.clamp(torch.round(x / x_scale) + x_zero, 0, 255)
    y = ((xq - x_zero) * x_scale) @ (weight_t.to(x.dtype) * weight_scale)
    return y + bias if bias is not None else y


def _additive_mask(mask: torch.Tensor | None, causal: bool, rows: int, cols: int,
                   like: torch.Tensor) -> torch.Tensor | None:
    """SDPA's ``attn_mask`` / ``is_causal`` as one additive float term (``-inf`` where a key is hidden)."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, float("-inf")).to(like.dtype)
    if causal:
        seen = torch.ones(rows, cols, dtype=torch.bool, device=like.device).tril(cols - rows)
        hide = torch.where(seen, 0.0, float("-inf")).to(like.dtype)
        mask = hide if mask is None else mask + hide
    return mask


def probability_levels(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 levels (as float) of softmax's numerator ``exp(s - max s)`` (in (0, 1], the row's top
    weight exactly 127) and their row sums: ``softmax(s) ~ levels / sums``. A row hidden whole
    gets zero levels and a sum of 1 (output 0)."""
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    levels = torch.round(torch.exp(scores - top) * 127)
    return levels, levels.sum(-1, keepdim=True).clamp_min(1)


def _attention_int8(q, k, v, mask, scale: float, causal: bool):
    """Softmax attention on int8 operands: q and k per row (token) over ``max|x|``, v per channel,
    the probabilities as :func:`probability_levels`; integer products, float rescale. q, k, v have
    the same leading (batch, head) dimensions (grouped-query heads repeated beforehand)."""
    qq, sq = token_quantize_int8(q)
    kq, sk = token_quantize_int8(k)
    vq, sv = token_quantize_int8(v.transpose(-1, -2))
    scores = (qq @ kq.transpose(-1, -2)) * (sq * scale) * sk.transpose(-1, -2)
    extra = _additive_mask(mask, causal, q.shape[-2], k.shape[-2], scores)
    levels, sums = probability_levels(scores if extra is None else scores + extra)
    return (levels @ vq.transpose(-1, -2)) * sv.transpose(-1, -2) / sums


def _linear_int4(x, packed, scales, zeros, bias, in_features: int):
    weight = _dequantize_groups(packed, scales, zeros, in_features)
    y = x @ weight.to(x.dtype).T
    return y + bias if bias is not None else y


def _embedding_int8(ids, table, scales):
    return table[ids].to(scales.dtype) * scales[ids].unsqueeze(-1)


def _embedding_int4(ids, packed, scales, zeros, width: int):
    return _dequantize_groups(packed[ids], scales[ids], zeros[ids], width)


# ---------------------------------------------------------------------------------------------
# torch custom ops


def _int8_or_reference(kernel, reference, x, *rest):
    """The integer kernel on the CPU; elsewhere (and for empty inputs) the float32 reference, in x's dtype."""
    if x.device.type == "cpu" and x.numel():
        return kernel(x, *rest)
    return reference(x.float(), *rest).to(x.dtype)


@torch.library.custom_op(f"{_LIB}::linear_dynamic_int8", mutates_args=())
def linear_dynamic_int8(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + b`` with ``x`` quantized to uint8 on the fly and ``W`` int8 per output channel."""
    return _int8_or_reference(_int8_linear_dynamic, _linear_dynamic_int8, x, weight_t, weight_scale, bias)


@torch.library.custom_op(f"{_LIB}::linear_token_int8", mutates_args=())
def linear_token_int8(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + b`` with each row of ``x`` quantized to int8 over its own range, ``W`` int8 per output channel."""
    return _int8_or_reference(_int8_linear_token, _linear_token_int8, x, weight_t, weight_scale, bias)


@torch.library.custom_op(f"{_LIB}::linear_static_int8", mutates_args=())
def linear_static_int8(x: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, weight_t: torch.Tensor,
                       weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + b`` with ``x`` quantized to uint8 with calibrated ``(x_scale, x_zero)``."""
    return _linear_static_int8(x.float(), x_scale, x_zero, weight_t, weight_scale, bias).to(x.dtype)  # float32 arithmetic, x's dtype out


@torch.library.custom_op(f"{_LIB}::linear_int4", mutates_args=())
def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """``x @ W.T + b`` with ``W`` stored as 4-bit levels, per-group scales and zero points (weight-only)."""
    return _linear_int4(x.float(), packed, scales, zeros, bias, in_features).to(x.dtype)  # float32 arithmetic, x's dtype out


@torch.library.custom_op(f"{_LIB}::embedding_int8", mutates_args=())
def embedding_int8(ids: torch.Tensor, table: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows of an int8 table with one scale per row."""
    return _embedding_int8(ids, table, scales)


@torch.library.custom_op(f"{_LIB}::embedding_int4", mutates_args=())
def embedding_int4(ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   width: int) -> torch.Tensor:
    """Rows of a 4-bit table with per-group scales and zero points."""
    return _embedding_int4(ids, packed, scales, zeros, width)


@torch.library.custom_op(f"{_LIB}::attention_int8", mutates_args=())
def attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float, causal: bool) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale)`` on int8 operands."""
    if q.device.type == "cpu" and q.numel() and k.shape[-2]:
        return _int8_attention(q, k, v, mask, scale, causal)
    return _attention_int8(q.float(), k.float(), v.float(), mask, scale, causal).to(q.dtype)


def _rows_out(x: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


linear_dynamic_int8.register_fake(lambda x, weight_t, weight_scale, bias: _rows_out(x, weight_t.shape[1]))
linear_token_int8.register_fake(lambda x, weight_t, weight_scale, bias: _rows_out(x, weight_t.shape[1]))
linear_static_int8.register_fake(lambda x, xs, xz, weight_t, weight_scale, bias: _rows_out(x, weight_t.shape[1]))
linear_int4.register_fake(lambda x, packed, scales, zeros, bias, in_features: _rows_out(x, packed.shape[0]))
embedding_int8.register_fake(lambda ids, table, scales: scales.new_empty(*ids.shape, table.shape[1]))
embedding_int4.register_fake(lambda ids, packed, scales, zeros, width: scales.new_empty(*ids.shape, width))
attention_int8.register_fake(lambda q, k, v, mask, scale, causal: q.new_empty(*q.shape[:-1], v.shape[-1]))


def _register_gradients() -> None:
    """Straight-through gradients of the quantized linears (module docstring); embeddings need
    none (their inputs are integer ids)."""

    def bias_grad(grad: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        return grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype) if bias is not None else None

    def setup_int8(ctx, inputs, output):
        x, *grid, weight_t, weight_scale, bias = inputs  # grid: () dynamic, (x_scale, x_zero) static
        ctx.static = bool(grid)
        ctx.save_for_backward(x, weight_t, weight_scale, bias, *grid)

    def backward_int8(ctx, grad):
        x, weight_t, weight_scale, bias, *grid = ctx.saved_tensors
        grad_x = grad @ (weight_t.to(grad.dtype) * weight_scale.to(grad.dtype)).T  # weight_t: (in, out)
        if ctx.static:  # no gradient where the static grid clips x
            x_scale, x_zero = grid
            level = torch.round(x / x_scale) + x_zero
            grad_x = grad_x * ((level >= 0) & (level <= 255)).to(grad_x.dtype)
        return grad_x.to(x.dtype), *([None] * (4 if ctx.static else 2)), bias_grad(grad, bias)

    def setup_int4(ctx, inputs, output):
        x, packed, scales, zeros, bias, ctx.in_features = inputs
        ctx.save_for_backward(x, packed, scales, zeros, bias)

    def backward_int4(ctx, grad):
        x, packed, scales, zeros, bias = ctx.saved_tensors
        weight = _dequantize_groups(packed, scales, zeros, ctx.in_features)  # (out, in)
        return (grad @ weight.to(grad.dtype)).to(x.dtype), None, None, None, bias_grad(grad, bias), None

    linear_dynamic_int8.register_autograd(backward_int8, setup_context=setup_int8)
    linear_token_int8.register_autograd(backward_int8, setup_context=setup_int8)
    linear_static_int8.register_autograd(backward_int8, setup_context=setup_int8)
    linear_int4.register_autograd(backward_int4, setup_context=setup_int4)


_register_gradients()


def integer_kernels() -> dict:
    """The int8 linears as plain torch functions on ``torch._int_mm`` (and the quantized embedding
    gathers), for ``torch.compile``: traced through instead of called as opaque ops, so Inductor
    fuses the activation quantization, the rescale and the row gathers into the neighbouring
    element-wise kernels (and, with freezing, folds the weights' column sums into constants)."""
    ops = torch.ops.ptool_quant

    def dynamic(x, weight_t, weight_scale, bias):
        return _int8_linear_dynamic(x, weight_t, weight_scale, bias,
                                    column_sums=lambda w: w.sum(0, dtype=torch.int32))

    return {ops.linear_dynamic_int8.default: dynamic, ops.linear_token_int8.default: _int8_linear_token,
            ops.embedding_int8.default: _embedding_int8, ops.embedding_int4.default: _embedding_int4,
            ops.attention_int8.default: _int8_attention}


#: Group sizes torch's packed int4 CPU kernel takes.
INT4_PACK_GROUPS = (32, 64, 128, 256)


def int4_packable(packed: torch.Tensor, scales: torch.Tensor, in_features: int) -> bool:
    """Whether torch's packed int4 CPU kernel can run a ``linear_int4`` stored so: weights on the
    CPU, output features a multiple of 16, a group size of :data:`INT4_PACK_GROUPS`."""
    groups = scales.shape[-1]
    return (packed.device.type == "cpu" and packed.shape[0] % 16 == 0 and in_features % groups == 0
            and in_features // groups in INT4_PACK_GROUPS)


def pack_int4_for_cpu(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``linear_int4`` weight in the layout of torch's packed int4 CPU kernel (done once, when a
    backend builds the model): the levels repacked by ``aten._convert_weight_to_int4pack_for_cpu``,
    and ``(groups, out, 2)`` bf16 scales and offsets. The kernel computes ``(level - 8) * scale +
    offset``, ptool's layers ``(level - zero) * scale``: the offset is ``(8 - zero) * scale``."""
    levels = unpack_nibbles(packed, in_features).to(torch.int32)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 2)
    zero = unpack_nibbles(zeros, scales.shape[-1])
    scales_and_zeros = torch.stack([scales, (8 - zero) * scales], -1).transpose(0, 1)
    return weight, scales_and_zeros.to(torch.bfloat16).contiguous()


def int4_packed_linear(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor,
                       bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """``linear_int4`` on torch's packed int4 CPU kernel (weights from :func:`pack_int4_for_cpu`).
    The activation goes in as bf16 and the product comes out bf16: the kernel's fast path (its
    float32 path ran 30-70x slower here). The bias is added in float32; x's dtype out."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight, group_size, scales_and_zeros).float()
    y = y + bias if bias is not None else y
    return y.reshape(*x.shape[:-1], scales_and_zeros.shape[1]).to(x.dtype)


def decompositions() -> dict:
    """Float decompositions of the ops, for ``ExportedProgram.run_decompositions`` (TVM's route)."""
    ops = torch.ops.ptool_quant
    return {
        ops.linear_dynamic_int8.default: _linear_dynamic_int8,
        ops.linear_token_int8.default: _linear_token_int8,
        ops.linear_static_int8.default: _linear_static_int8,
        ops.linear_int4.default: _linear_int4,
        ops.embedding_int8.default: _embedding_int8,
        ops.embedding_int4.default: _embedding_int4,
        ops.attention_int8.default: _attention_int8,
    }


def is_quant_op(target: object) -> bool:
    return getattr(target, "namespace", None) == _LIB


# ---------------------------------------------------------------------------------------------
# ONNX translations (onnxscript, traced by torch.onnx's exporter)


def _register_contrib_schema() -> None:
    """Declare ``com.microsoft.MatMulNBits`` to ``onnx.defs`` so onnxscript can emit it (ORT runs it)."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("MatMulNBits", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter(n, "T", param_option=optional)
                for n in ("A", "B", "scales", "zero_points", "g_idx", "bias")],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(uint8)", "tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "", required=False)
                    for a in ("K", "N", "bits", "block_size", "accuracy_level")],
    )
    onnx.defs.register_schema(schema)


@functools.cache
def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: each op -> its ONNX integer form."""
    import numpy as np
    import onnxscript
    from onnxscript import ir
    from onnxscript import opset18 as op

    _register_contrib_schema()
    microsoft = onnxscript.values.Opset("com.microsoft", 1)

    def const(value, dtype):
        return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

    def add_bias(y, bias):
        return y if bias is None else op.Add(y, bias)

    def linear_dynamic(x, weight_t, weight_scale, bias):
        xq, x_scale, x_zero = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(xq, weight_t, x_zero, const(0, np.int8))
        return add_bias(op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.Mul(x_scale, weight_scale)), bias)

    def token_levels(x):  # per-row symmetric int8 levels (as float) over max|x|, and the row scales
        peak = op.ReduceMax(op.Abs(x), const([-1], np.int64), keepdims=1)
        scale = op.Div(op.Max(peak, const(np.finfo(np.float32).tiny, np.float32)), const(127.0, np.float32))
        return op.Clip(op.Round(op.Div(x, scale)), const(-127.0, np.float32), const(127.0, np.float32)), scale

    def linear_token(x, weight_t, weight_scale, bias):
        levels, x_scale = token_levels(x)
        acc = op.MatMulInteger(op.Cast(levels, to=ir.DataType.INT8), weight_t, const(0, np.int8), const(0, np.int8))
        return add_bias(op.Mul(op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), x_scale), weight_scale), bias)

    def linear_static(x, x_scale, x_zero, weight_t, weight_scale, bias):
        zero = op.Cast(x_zero, to=ir.DataType.UINT8)
        acc = op.MatMulInteger(op.QuantizeLinear(x, x_scale, zero), weight_t, zero, const(0, np.int8))
        return add_bias(op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), op.Mul(x_scale, weight_scale)), bias)

    def linear_int4(x, packed, scales, zeros, bias, in_features: int):
        out_features = packed.shape[0]
        groups = scales.shape[1]
        block = in_features // groups
        flat = const([-1], np.int64)
        blob = op.Reshape(packed, const([out_features, groups, block // 2], np.int64))
        return microsoft.MatMulNBits(x, blob, op.Reshape(scales, flat), op.Reshape(zeros, flat), None, bias,
                                     K=in_features, N=out_features, bits=4, block_size=block)

    def embedding_int8(ids, table, scales):
        rows = op.Cast(op.Gather(table, ids), to=ir.DataType.FLOAT)
        return op.Mul(rows, op.Unsqueeze(op.Gather(scales, ids), const([-1], np.int64)))

    def nibbles(packed_rows, count: int):  # (..., n) bytes -> (..., count) float values
        axis = const([-1], np.int64)
        low = op.Cast(op.BitwiseAnd(packed_rows, const(15, np.uint8)), to=ir.DataType.FLOAT)
        high = op.Cast(op.BitShift(packed_rows, const(4, np.uint8), direction="RIGHT"), to=ir.DataType.FLOAT)
        both = op.Concat(op.Unsqueeze(low, axis), op.Unsqueeze(high, axis), axis=-1)
        shape = op.Concat(op.Shape(packed_rows, end=-1), const([-1], np.int64), axis=0)
        values = op.Reshape(both, shape)
        return op.Slice(values, const([0], np.int64), const([count], np.int64), axis)

    def embedding_int4(ids, packed, scales, zeros, width: int):
        groups = scales.shape[1]
        shape = op.Shape(ids)
        axis = const([-1], np.int64)
        levels = op.Reshape(nibbles(op.Gather(packed, ids), width),
                            op.Concat(shape, const([groups, width // groups], np.int64), axis=0))
        zero = op.Unsqueeze(nibbles(op.Gather(zeros, ids), groups), axis)
        scaled = op.Mul(op.Sub(levels, zero), op.Unsqueeze(op.Gather(scales, ids), axis))
        return op.Reshape(scaled, op.Concat(shape, const([width], np.int64), axis=0))

    def attention_int8(q, k, v, mask, scale: float, causal: bool):
        last = const([-1], np.int64)
        qq, sq = token_levels(q)
        kq, sk = token_levels(k)
        vq, sv = token_levels(op.Transpose(v, perm=[0, 1, 3, 2]))
        scores = op.Mul(op.Mul(op.MatMul(qq, op.Transpose(kq, perm=[0, 1, 3, 2])), op.Mul(sq, const(scale, np.float32))),
                        op.Transpose(sk, perm=[0, 1, 3, 2]))
        hidden = const(float("-inf"), np.float32)
        if mask is not None:
            is_bool = mask.dtype == ir.DataType.BOOL
            scores = op.Add(scores, op.Where(mask, const(0.0, np.float32), hidden) if is_bool else mask)
        if causal:
            grid = op.Concat(op.Shape(q, start=-2, end=-1), op.Shape(k, start=-2, end=-1), axis=0)
            seen = op.Trilu(op.ConstantOfShape(grid, value=ir.tensor(np.asarray([1], np.int64))),
                            op.Sub(op.Shape(k, start=-2, end=-1), op.Shape(q, start=-2, end=-1)), upper=0)
            scores = op.Add(scores, op.Where(op.Cast(seen, to=ir.DataType.BOOL), const(0.0, np.float32), hidden))
        top = op.ReduceMax(scores, last, keepdims=1)
        top = op.Where(op.IsInf(top), const(0.0, np.float32), top)
        levels = op.Round(op.Mul(op.Exp(op.Sub(scores, top)), const(127.0, np.float32)))
        sums = op.Max(op.ReduceSum(levels, last, keepdims=1), const(1.0, np.float32))
        out = op.MatMul(levels, op.Transpose(vq, perm=[0, 1, 3, 2]))
        return op.Div(op.Mul(out, op.Transpose(sv, perm=[0, 1, 3, 2])), sums)

    ops = torch.ops.ptool_quant
    return {
        ops.linear_dynamic_int8.default: linear_dynamic,
        ops.linear_token_int8.default: linear_token,
        ops.linear_static_int8.default: linear_static,
        ops.linear_int4.default: linear_int4,
        ops.embedding_int8.default: embedding_int8,
        ops.embedding_int4.default: embedding_int4,
        ops.attention_int8.default: attention_int8,
    }
