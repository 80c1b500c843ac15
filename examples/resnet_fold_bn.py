"""Fold every BatchNorm of a ResNet-18-shaped network and run it on ONNX Runtime and TVM.

The network is Hugging Face's ResNet built from a config (no download: random weights, with
BatchNorm statistics measured on random images so the folds have something to fold).

    python examples/resnet_fold_bn.py
"""

import tempfile
import time
from pathlib import Path

import torch
from transformers import ResNetConfig, ResNetForImageClassification

import ptool


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    config = ResNetConfig(layer_type="basic", hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], num_labels=10)
    model = ResNetForImageClassification(config)
    model.train()
    with torch.no_grad():  # measure real running statistics, then give BN a random affine
        for _ in range(4):
            model(torch.randn(8, 3, 64, 64))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def median_ms(fn, x, repeat=20):
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    model = build()
    x = torch.randn(1, 3, 224, 224)
    m2 = ptool.transform(model, ["dce", "cse", "constant-fold", "fold-bn"], (x,))
    print(m2.report)
    with tempfile.TemporaryDirectory() as tmp:
        path = ptool.export_onnx(m2, Path(tmp) / "resnet18.onnx")
        print(f"ONNX: {path.name}, {path.stat().st_size / 1e6:.1f} MB")
    ort = ptool.compile(m2, backend="onnxruntime")
    tvm = ptool.compile(m2, backend="tvm")
    with torch.no_grad():
        ref = model(x)
        for name, fn in [("torch eager (original)", model), ("torch (folded)", m2), ("onnxruntime", ort), ("tvm", tvm)]:
            fid = ptool.verify.compare(ref, fn(x))
            print(f"{name:24s} {median_ms(fn, x):8.2f} ms   max rel err {fid.max_rel_error:.1e}")


if __name__ == "__main__":
    main()
