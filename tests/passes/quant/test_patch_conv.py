"""Non-overlapping convolutions as Linears over patches (:mod:`ptool.passes.quant.patch_conv`) and
``quantize`` taking a vision transformer's patch embedding through them."""

from __future__ import annotations

import torch
import torch.nn as nn

import ptool
from ptool.ir.graph import is_op, module_path
from ptool.passes.quant.patch_conv import linearize_patch_convolutions
from tests.models import zoo

aten = torch.ops.aten


class Convs(nn.Module):
    """One conv of each geometry: patch (kernel == stride), overlapping, padded, grouped."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.overlapping = nn.Conv2d(8, 8, 3, stride=1)
        self.padded = nn.Conv2d(8, 8, 2, stride=2, padding=1)
        self.grouped = nn.Conv2d(8, 8, 2, stride=2, groups=2)
        self.unbiased = nn.Conv2d(3, 4, 2, stride=2, bias=False)

    def forward(self, x):
        y = self.patch(x)  # (B, 8, 4, 6) from (B, 3, 16, 24): rectangular
        return self.overlapping(torch.relu(y)).sum() + self.padded(y).sum() + self.grouped(y).sum(), self.unbiased(x)


def _graph(model: nn.Module, *args):
    return ptool.transform(model.eval(), ["dce"], args).graph_module


def _convs(gm) -> int:
    return sum(is_op(n, aten.conv2d) for n in gm.graph.nodes)


def test_only_non_overlapping_convs_become_linears_and_the_outputs_stay_the_same():
    torch.manual_seed(0)
    model, x = Convs(), torch.randn(2, 3, 16, 24)
    gm = _graph(model, x)
    assert _convs(gm) == 5
    assert linearize_patch_convolutions(gm, "test") == ["patch", "unbiased"]
    assert _convs(gm) == 3  # overlapping, padded and grouped stay convolutions
    with torch.no_grad():
        want, got = model(x), gm(x)
    for w, g in zip(want, got):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an image in channels-last memory order: the patches are gathered by reshape
        for w, g in zip(want, gm(x.contiguous(memory_format=torch.channels_last))):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_kept_conv_is_left_alone():
    gm = _graph(Convs(), torch.randn(1, 3, 16, 24))
    assert linearize_patch_convolutions(gm, "test", keep=lambda node: module_path(node) == "patch") == ["unbiased"]


def test_vit_patch_embedding_is_exact_as_a_linear():
    fx = zoo.vit()
    gm = _graph(fx.model, *fx.example_inputs)
    assert linearize_patch_convolutions(gm, "test") == ["vit.embeddings.patch_embeddings.projection"]
    assert _convs(gm) == 0
    with torch.no_grad():
        want, got = fx.model(*fx.example_inputs).logits, gm(*fx.example_inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_quantize_runs_the_vit_patch_embedding_on_the_int8_matmul():
    fx = zoo.vit()
    spec = "quantize:activations=per-token"
    m2 = ptool.transform(fx.model, [spec], fx.example_inputs)
    record = m2.report.records[-1]
    assert record.notes["patch_convolutions"] == ["vit.embeddings.patch_embeddings.projection"]
    assert _convs(m2.graph_module) == 0
    int8 = [n for n in m2.graph_module.graph.nodes if n.target is torch.ops.ptool_quant.linear_token_int8.default]
    assert any("patch_embeddings" in str(n.meta.get("nn_module_stack", {})) for n in int8)
    with torch.no_grad():
        want, got = fx.model(*fx.example_inputs).logits, m2(*fx.example_inputs).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99

    kept = ptool.transform(fx.model, [f"{spec},exclude=*patch_embeddings*"], fx.example_inputs)
    assert _convs(kept.graph_module) == 1 and "patch_convolutions" not in kept.report.records[-1].notes
    weight_only = ptool.transform(fx.model, ["quantize:mode=int4-weight,group_size=16"], fx.example_inputs)
    assert _convs(weight_only.graph_module) == 1  # int4 weight-only leaves convolutions as they are
