"""Sweep timm architectures through ptool's exact pipeline: re-parameterization to a fixpoint vs each
model's own ``reparameterize``, softmax attention found or reported, exactness on torch, ORT and TVM.

timm needs torchvision, and the registry's torchvision is a CUDA build whose C++ ops do not load on
the CPU torch; so timm and torchvision live in their own folder (``~/.cache/ptool/timm-site``,
installed here with ``--no-deps`` on first use, never in the project's environment), each model runs
in a child process, and torchvision's meta-kernel registrations (the part that needs its ops) are
stubbed out before the import. Weights are random (no downloads), BatchNorm statistics randomized so
that folds change the weights.

Per model: ``ptool.transform(model, ["fold-bn", "merge-branches", "fold-affine"], fixpoint=True)``;
convolutions and BatchNorms left in its graph against the same counts in the graph of timm's
``reparameterize_model(model)``; softmaxes whose output feeds a matmul, and how many of those the
attention site finder converts or reports (``linear-attention``'s sites plus its skips); the max abs
error of the transformed model vs the original on torch, of ONNX Runtime vs the transformed torch
model, and of TVM (``--tvm``) vs it, each relative to the output's scale.

    .venv/bin/python tools/zoo.py                 # the default sweep, writes BENCHMARKS.md "zoo"
    .venv/bin/python tools/zoo.py --models repvit_m0_9,levit_128s --tvm
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SITE = pathlib.Path.home() / ".cache" / "ptool" / "timm-site"
REQUIREMENTS = ("timm==1.0.31", "torchvision==0.28.0")
EXACT = ["fold-bn", "merge-branches", "fold-affine"]

#: The issue's models first, then a spread of conv nets and transformers.
DEFAULT_MODELS = (
    "swin_tiny_patch4_window7_224", "maxvit_tiny_tf_224", "cait_xxs24_224", "xcit_nano_12_p16_224", "coat_tiny",
    "levit_128s", "mobileone_s0", "repvit_m0_9", "repvgg_a0", "fastvit_t8",
    "resnet18", "resnet50", "mobilenetv2_100", "mobilenetv3_small_100", "efficientnet_b0", "regnetx_002",
    "ghostnet_100", "convnext_atto", "densenet121", "vgg11_bn", "dla34", "hrnet_w18_small", "rexnet_100",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "pvt_v2_b0", "efficientformer_l1", "mobilevit_xxs",
    "poolformer_s12", "edgenext_xx_small",
)


def ensure_site() -> None:
    """timm and torchvision in their own folder (no dependencies pulled: torch stays the project's)."""
    if (SITE / "timm").is_dir() and (SITE / "torchvision").is_dir():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(SITE),
                    *REQUIREMENTS], check=True)


def _child_setup() -> None:
    import types

    sys.path.insert(0, str(SITE))
    sys.path.insert(0, str(ROOT))
    # torchvision registers meta kernels for its C++ ops at import; those ops are absent from this build
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")


def _randomize_batchnorm(model, seed: int = 0) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 0.5 + 0.75)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 + 0.75)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.2 - 0.1)


def _counts(gm) -> dict:
    from ptool.ir.graph import op_histogram

    hist = op_histogram(gm)
    convs = sum(v for k, v in hist.items() if k in ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution"))
    bns = sum(v for k, v in hist.items() if "batch_norm" in k)
    return {"convs": convs, "batch_norms": bns}


def _softmax_into_matmul(gm) -> int:
    """Softmax attentions: softmaxes whose output reaches a matmul-like op (through views, casts,
    dropout), and fused ``scaled_dot_product_attention`` calls."""
    import torch

    aten = torch.ops.aten
    matmuls = {aten.matmul, aten.bmm, aten.mm, aten.einsum, aten.baddbmm}
    see_through = {aten.view, aten.reshape, aten.permute, aten.transpose, aten.dropout, aten.to, aten._to_copy,
                   aten.contiguous, aten.clone, aten.expand, aten.unsqueeze, aten.squeeze, aten.flatten,
                   aten.linear}  # talking heads mix the probabilities across heads before the matmul

    def reaches(node, depth=0) -> bool:
        for user in node.users:
            packet = getattr(user.target, "overloadpacket", None)
            if packet in matmuls or (packet in see_through and depth < 8 and reaches(user, depth + 1)):
                return True
        return False

    packets = [(n, getattr(n.target, "overloadpacket", None)) for n in gm.graph.nodes]
    softmaxes = [n for n, p in packets if p in (aten.softmax, aten._softmax)]
    fused = [n for n, p in packets if p is aten.scaled_dot_product_attention]
    return sum(1 for n in softmaxes if reaches(n)) + len(fused)


def _rel(a, b) -> float:

    a, b = a.float(), b.float()
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def run_one(name: str, tvm: bool) -> dict:
    """One model, in this (child) process."""
    _child_setup()
    import copy
    import warnings

    import timm
    import torch

    import ptool

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    row: dict = {"model": name}
    model = timm.create_model(name, pretrained=False).eval()
    _randomize_batchnorm(model)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(1, *size)
    with torch.no_grad():
        want = model(x)
    t0 = time.perf_counter()
    m2 = ptool.transform(model, EXACT, (x,), fixpoint=True)
    row["transform_s"] = round(time.perf_counter() - t0, 1)
    row["rounds"] = max(r.round for r in m2.report)
    row["ptool"] = _counts(m2.graph_module)
    row["original"] = _counts(ptool.transform(model, [], (x,)).graph_module)
    rep = copy.deepcopy(model)
    try:
        from timm.utils.model import reparameterize_model

        rep = reparameterize_model(rep)
        row["timm_reparameterize"] = _counts(ptool.transform(rep, [], (x,)).graph_module)
    except Exception as e:  # noqa: BLE001 - a model timm cannot re-parameterize
        row["timm_reparameterize"] = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
    with torch.no_grad():
        got = m2(x)
    row["torch_rel_err"] = _rel(got, want)
    row["softmax_into_matmul"] = _softmax_into_matmul(m2.graph_module)
    if row["softmax_into_matmul"]:
        try:
            lin = ptool.transform(m2, ["linear-attention:feature_map=elu,transfer_steps=0"], (x,), calibration=[(x,)],
                                  verify=False)
            rec = lin.report[0]
            row["attention"] = {"converted": rec.rewritten, "reported_skips": len(rec.skipped),
                                "reasons": sorted({s.reason[:90] for s in rec.skipped})[:4]}
        except Exception as e:  # noqa: BLE001
            row["attention"] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    try:
        ort = ptool.compile(m2, backend="onnxruntime")
        row["ort_rel_err"] = _rel(ort(x), got)
    except Exception as e:  # noqa: BLE001
        row["ort_rel_err"] = f"failed: {type(e).__name__}: {str(e)[:100]}"
    if tvm:
        try:
            t0 = time.perf_counter()
            built = ptool.compile(m2, backend="tvm")
            row["tvm_rel_err"] = _rel(built(x), got)
            row["tvm_build_s"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # noqa: BLE001
            row["tvm_rel_err"] = f"failed: {type(e).__name__}: {str(e)[:100]}"
    return row


def render(rows: list[dict], fingerprint: str) -> str:
    lines = ["## timm architectures through the exact pipeline (`tools/zoo.py`)", "",
             f"Device: {fingerprint}. Random weights, randomized BatchNorm statistics, batch 1 at each model's "
             f"input size. Pipeline `{', '.join(EXACT)}` run to a fixpoint. *convs / BNs*: left in the graph "
             "(original -> ptool; timm's own `reparameterize_model` for comparison). *attention*: softmaxes feeding "
             "a matmul plus fused `scaled_dot_product_attention` calls, and how many `linear-attention` converts or "
             "reports as skipped. Errors: max abs error over "
             "the output's max abs (torch: transformed vs original; ORT / TVM: vs the transformed torch model).", "",
             "| model | convs orig -> ptool (timm) | BNs orig -> ptool (timm) | rounds | softmax->matmul | attention "
             "converted / reported | torch err | ORT err | TVM err |",
             "|---|---|---|---:|---:|---|---:|---:|---:|"]

    def fmt(v) -> str:
        return f"{v:.1e}" if isinstance(v, float) else ("–" if v is None else str(v)[:60])

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error'][:100]} | | | | | | | |")
            continue
        timm_counts = r.get("timm_reparameterize", {})
        tc = timm_counts.get("convs", "–") if "error" not in timm_counts else "n/a"
        tb = timm_counts.get("batch_norms", "–") if "error" not in timm_counts else "n/a"
        att = r.get("attention")
        att_text = "–" if att is None else (att.get("error", "")[:60] if "error" in att else
                                            f"{att['converted']} / {att['reported_skips']}")
        lines.append(f"| {r['model']} | {r['original']['convs']} -> {r['ptool']['convs']} ({tc}) | "
                     f"{r['original']['batch_norms']} -> {r['ptool']['batch_norms']} ({tb}) | {r['rounds']} | "
                     f"{r['softmax_into_matmul']} | {att_text} | {fmt(r['torch_rel_err'])} | "
                     f"{fmt(r.get('ort_rel_err'))} | {fmt(r.get('tvm_rel_err'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--tvm", action="store_true", help="also build each model with TVM (minutes per model)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model, JSON on stdout
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.tvm)))
        return
    ensure_site()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    from _sections import update_section

    from ptool.tune.fingerprint import device_fingerprint

    rows = []
    for name in args.models.split(","):
        print(f"[zoo] {name}", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--one", name, *(["--tvm"] if args.tvm else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode == 0 and done.stdout.strip():
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"model": name, "error": tail})
        print(f"[zoo]   {json.dumps(rows[-1])[:300]}", file=sys.stderr, flush=True)

    def merged(previous: dict) -> tuple[str, dict]:
        by_name = {r["model"]: r for r in previous.get("rows", [])}
        by_name.update({r["model"]: r for r in rows})
        ordered = [by_name[m] for m in (*DEFAULT_MODELS, *by_name) if m in by_name]
        ordered = list({r["model"]: r for r in ordered}.values())
        fp = str(device_fingerprint())
        return render(ordered, fp), {"rows": ordered}

    print(update_section("zoo", merged))


if __name__ == "__main__":
    main()
