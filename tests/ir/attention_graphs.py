"""Shared by the matcher and rule-driver tests: the attention patterns and exported zoo graphs."""

from __future__ import annotations

import functools

import torch

from ptool.ir.pattern import Const, Op, Scaled, Var
from tests.models import zoo

aten = torch.ops.aten

# The eager attention chain: softmax(scale * q@kT [+ mask]) @ v, seen through layout noise.
SCORES = Scaled(Op(aten.matmul.default, Var("q", noise=True), Var("k", noise=True)))
ATTENTION = Op(
    aten.matmul.default,
    Op(aten.softmax.int, Op(aten.add.Tensor, SCORES, Var("mask"), optional=True, noise=True), -1,
       noise=True, name="probs"),
    Var("v", noise=True),
)
SDPA = Op(aten.scaled_dot_product_attention.default, Var("q"), Var("k"), Var("v"), Var("mask"),
          scale=Const(name="scale"))


def export(module: torch.nn.Module, *args, **kwargs) -> torch.fx.GraphModule:
    """``module`` (in eval mode) exported non-strict, as a GraphModule."""
    return torch.export.export(module.eval(), args, kwargs, strict=False).module()


@functools.cache
def hf_graph(kind: str, impl: str = "eager", output_attentions: bool = False):
    """The zoo's ``kind`` model (2 layers, 4 heads of dim 8) exported, with the inputs it was exported for.

    Cached: copy the GraphModule before mutating it.

    Returns:
        ``(graph_module, args, kwargs)``.
    """
    fixture = getattr(zoo, kind)(attn_implementation=impl)
    kwargs = dict(fixture.example_kwargs)
    if output_attentions:
        kwargs["output_attentions"] = True
    return export(fixture.model, *fixture.example_inputs, **kwargs), fixture.example_inputs, kwargs
