"""FLOPs estimate from shape metadata: hand-counted cases per op kind."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptool.frontends.torch_export import capture
from ptool.ir.flops import estimate_flops, format_flops


def _flops(model: nn.Module, *args: torch.Tensor) -> int:
    return estimate_flops(capture(model.eval(), args).graph_module).total


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _Bmm(nn.Module):
    def forward(self, a, b):
        return torch.bmm(a, b) + torch.matmul(a, b)


def test_linear():
    assert _flops(nn.Linear(8, 5), torch.randn(3, 4, 8)) == 2 * (3 * 4 * 5) * 8


def test_conv_and_grouped_conv():
    assert _flops(nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5)) == 2 * (2 * 6 * 5 * 5) * (4 * 9)
    assert _flops(nn.Conv2d(4, 8, 3, groups=4), torch.randn(1, 4, 5, 5)) == 2 * (8 * 3 * 3) * (1 * 9)


def test_conv_transpose():
    # every input element feeds C_out/groups * k outputs
    assert _flops(nn.ConvTranspose2d(4, 6, 2, stride=2), torch.randn(1, 4, 3, 3)) == 2 * (4 * 3 * 3) * (6 * 4)


def test_attention_and_batched_matmul():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    assert _flops(_Attention(), q, k, v) == 2 * 6 * 5 * 7 * (8 + 4)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert _flops(_Bmm(), a, b) == 2 * (2 * 2 * 3 * 5 * 4)


def test_embedding_is_free():
    assert _flops(nn.Embedding(10, 4), torch.tensor([[1, 2, 3]])) == 0


def test_format():
    assert format_flops(2.5e9) == "2.50 GFLOPs"
    assert format_flops(12) == "12 FLOPs"


def test_quantized_linears_and_attention_count_the_same_products_as_float_ones():
    import ptool
    from tests.models import zoo

    fixture = zoo.bert()
    floats = ptool.transform(fixture.model, [], fixture.example_inputs)
    for spec in ("quantize", "quantize:activations=per-token", "quantize:mode=int4-weight",
                 "quantize:activations=per-token,attention=int8"):
        quantized = ptool.transform(fixture.model, [spec], fixture.example_inputs)
        assert estimate_flops(quantized.graph_module).total == estimate_flops(floats.graph_module).total
