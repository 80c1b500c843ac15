"""The int8 linears on oneDNN's pre-packed u8 x s8 matmul (``onednn::qlinear_pointwise``), for frozen graphs.

oneDNN's quantized linear takes uint8 activations and a weight reordered once into the blocked
layout of its VNNI / AMX kernel. The reorder (``onednn::qlinear_prepack``) sits in the graph on the
stored weight: under Inductor's freezing it is folded into a constant, so it runs once, at build
time; without freezing it would run on every call. The torch backend uses these kernels in frozen
CPU compiles, ``torch.compile`` and AOTInductor (which stores the reordered weights in its
library). Under ``torch.compile`` a traced ``torch._int_mm`` on frozen weights is rewritten into a
slow kernel; under AOTInductor ``_int_mm`` stays fast, but these ran ViT-B/16 int8 5% faster (59.9 vs
63.0 ms) and BERT-base seq 512 as fast (163 vs 164 ms). Alone, on ViT-B/16's linear shapes (197
rows), they run 1.0-1.6x ``_int_mm``.

The arithmetic is that of :mod:`ptool.ops.quant`'s ``_int_mm`` kernels: the same integer levels and
int32 sums, the same rescale (in another float32 order, so within float32 rounding of them).
Symmetric int8 activation levels go in shifted by 128 with a zero point of 128, which oneDNN takes
out exactly.
"""

from __future__ import annotations

import functools
import platform

import torch

from ptool.ops.quant import _rows, dynamic_quantize_uint8, token_quantize_int8


@functools.cache
def available() -> bool:
    """Whether this torch has oneDNN's quantized linear on this CPU (x86 builds with oneDNN)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.onednn, "qlinear_pointwise") or not hasattr(torch.ops.onednn, "qlinear_prepack"):
        return False
    _register_prepack_shape()
    return True


def _register_prepack_shape() -> None:
    """Give ``qlinear_prepack`` the shape function ``torch.export`` and Dynamo trace with (torch ships
    none: its own quantization flow inserts the op after tracing). The real op returns an opaque
    oneDNN tensor of shape ``(in, out)``; only ``qlinear_pointwise`` reads it."""
    try:
        torch.library.register_fake("onednn::qlinear_prepack")(
            lambda weight, x_shape: weight.new_empty(weight.shape[1], weight.shape[0]))
    except RuntimeError:  # a later torch ships one
        pass


def _prepacked(weight_t: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(weight_t.t().contiguous(), None)


def _channel_scales(weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales = weight_scale.reshape(-1).float()
    return scales, torch.zeros(scales.shape, dtype=torch.long)


def linear_token_int8(x, weight_t, weight_scale, bias):
    """``linear_token_int8``: per-row symmetric levels as uint8 around 128, oneDNN's int32 sums
    rescaled by channel inside the kernel, by row and biased after it."""
    levels, x_scale = token_quantize_int8(_rows(x))
    scales, zeros = _channel_scales(weight_scale)
    y = torch.ops.onednn.qlinear_pointwise(
        (levels + 128).to(torch.uint8), 1.0, 128, _prepacked(weight_t), scales, zeros, None,
        1.0, 0, torch.float32, "none", [], "") * x_scale
    y = y + bias if bias is not None else y
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def linear_dynamic_int8(x, weight_t, weight_scale, bias):
    """``linear_dynamic_int8``: ONNX's ``DynamicQuantizeLinear`` levels (one scale and zero point for
    the tensor), the rescale and the bias inside oneDNN's kernel."""
    levels, x_scale, x_zero = dynamic_quantize_uint8(_rows(x))
    scales, zeros = _channel_scales(weight_scale)
    y = torch.ops.onednn.qlinear_pointwise.tensor(
        levels.to(torch.uint8), x_scale, x_zero.to(torch.int32), _prepacked(weight_t), scales, zeros,
        None if bias is None else bias.float(), 1.0, 0, torch.float32, "none", [], "")
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def prepacked_kernels() -> dict:
    """ptool's int8 linear ops -> these kernels (what replaces the ``_int_mm`` ones in a frozen graph)."""
    ops = torch.ops.ptool_quant
    return {ops.linear_dynamic_int8.default: linear_dynamic_int8, ops.linear_token_int8.default: linear_token_int8}
