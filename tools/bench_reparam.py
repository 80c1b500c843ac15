"""Benchmark the re-parameterization passes: original vs re-parameterized, torch eager and ORT.

Writes (or replaces) the "Re-parameterization" section of ``BENCHMARKS.md`` and the ``reparam``
key of ``BENCHMARKS.json``; run it after ``tools/bench.py`` (which rewrites both files).

Models (no downloads):
- ``repvgg-a0``: a RepVGG-A0-shaped network (widths 48/48/96/192/1280, depths 1/2/4/14/1) built
  here, BatchNorm statistics measured on random images; pipeline ``fold-bn, merge-branches``.
- ``vit-small``: Hugging Face ``ViTModel`` with the ViT-S/16 config (random weights, randomized
  LayerNorm affines), 224 px; pipeline ``fold-affine``.
- ``digits-vit``: the small ViT trained on scikit-learn's digits by ``tests/models/digits_vit.py``;
  pipeline ``repbn:finetune_steps=200`` (calibrated on the training images; test accuracy
  before/after is the fidelity figure).

    .venv/bin/python tools/bench_reparam.py
"""

from __future__ import annotations

import pathlib
import sys
from dataclasses import dataclass

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ptool  # noqa: E402
from ptool.benchmark import measure_interleaved  # noqa: E402
from _sections import write_section  # noqa: E402  (tools/ is on sys.path when run as a script)



class RepVGGBlock(nn.Module):
    """3x3 conv+BN || 1x1 conv+BN || identity BN (when shapes allow), summed, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.one = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


def repvgg_a0() -> nn.Module:
    torch.manual_seed(0)
    widths, depths = (48, 48, 96, 192, 1280), (1, 2, 4, 14, 1)
    blocks, cin = [], 3
    for width, depth in zip(widths, depths):
        for i in range(depth):
            blocks.append(RepVGGBlock(cin, width, stride=2 if i == 0 else 1))
            cin = width
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))
    model.train()
    with torch.no_grad():  # measured statistics and a random affine, like a trained network's
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.momentum = None
        for _ in range(2):
            model(torch.randn(8, 3, 224, 224))
        gen = torch.Generator().manual_seed(0)
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) * 0.5 + 0.25)
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
    return model.eval()


def vit_small() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                    intermediate_size=1536, image_size=224, patch_size=16)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


@dataclass
class Row:
    model: str
    pipeline: str
    nodes: str
    params: str
    fidelity: str
    timings: dict  # backend -> (original ms, transformed ms)


def _bench(name, model, passes, args, *, calibration=None, fidelity=None) -> Row:
    print(f"[{name}] transforming with {passes}", flush=True)
    m2 = ptool.transform(model, passes, args, calibration=calibration)
    first, last = m2.report[0], m2.report[-1]
    ort_orig = ptool.compile(model, backend="onnxruntime", example_inputs=args)
    ort_new = ptool.compile(m2, backend="onnxruntime")
    print(f"[{name}] timing", flush=True)
    t = measure_interleaved({"torch-orig": model, "torch-new": m2, "ort-orig": ort_orig, "ort-new": ort_new},
                            args, repeat=30, warmup=3)
    if fidelity is None:
        fid = m2.report.total
        fidelity = f"max rel err {fid.max_rel_error:.1e}, cosine {fid.cosine:.6f}"
    return Row(name, ", ".join(passes), f"{first.nodes_before} -> {last.nodes_after}",
               f"{first.params_before:,} -> {last.params_after:,}", fidelity,
               {"torch": (t["torch-orig"].median_ms, t["torch-new"].median_ms),
                "onnxruntime": (t["ort-orig"].median_ms, t["ort-new"].median_ms)})


def _digits_row() -> Row:
    from tests.models.digits_vit import accuracy, digits_vit

    d = digits_vit(0)
    data = d.data
    batch = torch.export.Dim("batch", min=1, max=1024)  # calibration batches differ from the example's size
    m2 = ptool.transform(d.model, ["repbn:finetune_steps=200,lr=0.003"], d.example_inputs,
                         calibration=data.train_batches(64), dynamic_shapes=({0: batch},))
    acc_after = accuracy(m2, data.x_test, data.y_test)
    fidelity = f"test accuracy {d.test_accuracy * 100:.2f}% -> {acc_after * 100:.2f}%"
    args = (data.x_test[:64],)
    ort_orig = ptool.compile(d.model, backend="onnxruntime", example_inputs=args)
    ort_new = ptool.compile(m2, backend="onnxruntime", example_inputs=args)
    t = measure_interleaved({"torch-orig": d.model, "torch-new": m2, "ort-orig": ort_orig, "ort-new": ort_new},
                            args, repeat=50, warmup=5)
    first, last = m2.report[0], m2.report[-1]
    return Row("digits-vit (batch 64)", "repbn:finetune_steps=200", f"{first.nodes_before} -> {last.nodes_after}",
               f"{first.params_before:,} -> {last.params_after:,}", fidelity,
               {"torch": (t["torch-orig"].median_ms, t["torch-new"].median_ms),
                "onnxruntime": (t["ort-orig"].median_ms, t["ort-new"].median_ms)})


def _markdown(rows: list[Row]) -> str:
    lines = ["## Re-parameterization (`tools/bench_reparam.py`)", "",
             "Original vs re-parameterized model, each backend timed side by side in one run "
             "(round-robin, median of 30-50 calls, batch 1 unless stated).", "",
             "| model | pipeline | nodes | weights | fidelity | torch orig ms | torch new ms | torch speedup | ORT orig ms | ORT new ms | ORT speedup |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        (to, tn), (oo, on) = r.timings["torch"], r.timings["onnxruntime"]
        lines.append(f"| {r.model} | `{r.pipeline}` | {r.nodes} | {r.params} | {r.fidelity} | {to:.2f} | {tn:.2f} | "
                     f"{to / tn:.2f}x | {oo:.2f} | {on:.2f} | {oo / on:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    rows = [
        _bench("repvgg-a0 (224 px)", repvgg_a0(), ["fold-bn", "merge-branches"], (torch.randn(1, 3, 224, 224),)),
        _bench("vit-small (224 px)", vit_small(), ["fold-affine"], (torch.randn(1, 3, 224, 224),)),
        _digits_row(),
    ]
    section = write_section("reparam", _markdown(rows), [r.__dict__ for r in rows])
    print(section)


if __name__ == "__main__":
    main()
