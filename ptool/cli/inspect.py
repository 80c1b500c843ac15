"""Show what a model is made of: op histogram, norm and attention sites, parameters, FLOPs, capture.

Attention: the sites the attention passes replace, and every softmax that feeds a product but is
not a site, with the reason ("softmax attention, not converted: ..."), so a converted model's
remaining softmaxes are never a surprise.

The model is captured exactly as `ptool convert` would capture it (torch.export, then the
fallbacks), so the figures describe the graph the passes will see.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ptool.cli._model import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--top", type=int, default=25, metavar="N", help="ops shown in the histogram (default 25)")
    p.add_argument("--all", action="store_true", help="show every op in the histogram")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


# Norm and attention op families (ATen packets, resolved lazily: torch is not imported at CLI start).
_BN = ("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
       "_batch_norm_with_update", "_batch_norm_no_update", "cudnn_batch_norm", "miopen_batch_norm")
_LN = ("layer_norm", "native_layer_norm")
_GN = ("group_norm", "native_group_norm")
_RMS = ("rms_norm", "_fused_rms_norm")
_IN = ("instance_norm",)
_SDPA = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_efficient_attention")
_SOFTMAX = ("softmax", "_softmax", "_safe_softmax")
_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def _packets(names: tuple[str, ...]) -> tuple:
    import torch

    return tuple(p for p in (getattr(torch.ops.aten, n, None) for n in names) if p is not None)


def _layer_of(node: Any) -> str:
    """The repeated block a node belongs to: the module path up to its first numeric index."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "(no module info)"
    path = list(stack.values())[-1][0]
    m = _LAYER.match(path)
    return m.group(1) if m else (path.split(".")[0] if path else "(top level)")


def torch_figures(gm: Any, call: tuple[tuple, dict] | None = None) -> dict:
    """Histogram, sites, attention sites, parameters and FLOPs of a captured graph.

    ``call`` (example ``(args, kwargs)``) lets causal masks be recognised on the attention sites.
    """
    from ptool.ir.flops import estimate_flops
    from ptool.ir.graph import compute_nodes, is_op, op_histogram, parameter_count
    from ptool.passes.attention.swap import scan_of

    groups = {name: _packets(ops) for name, ops in
              (("BatchNorm", _BN), ("LayerNorm", _LN), ("GroupNorm", _GN), ("RMSNorm", _RMS),
               ("InstanceNorm", _IN), ("attention (sdpa)", _SDPA), ("softmax", _SOFTMAX))}
    sites = Counter({name: 0 for name in groups})
    per_layer: dict[str, Counter] = {}
    rms_modules = set()
    for node in compute_nodes(gm):
        for name, packets in groups.items():
            if packets and is_op(node, *packets):
                sites[name] += 1
                if name in ("attention (sdpa)", "softmax"):
                    per_layer.setdefault(_layer_of(node), Counter())[name] += 1
        # RMSNorm is often written out in Python (pow/mean/rsqrt): count the modules instead.
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if "RMSNorm" in str(cls).rsplit(".", 1)[-1]:
                rms_modules.add(path)
    if rms_modules and sites["RMSNorm"] == 0:
        sites["RMSNorm"] = len(rms_modules)
    attention = scan_of(gm, call)
    flops = estimate_flops(gm)
    params = parameter_count(gm)
    tensors = {id(t): t for t in (*gm.parameters(), *gm.buffers())}  # tied weights once
    param_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {
        "nodes": len(compute_nodes(gm)),
        "histogram": dict(op_histogram(gm).most_common()),
        "sites": dict(sites),
        "attention_by_layer": {k: dict(v) for k, v in per_layer.items()},
        "attention_sites": [site.summary() for site in attention.sites],
        "attention_not_converted": [skip.summary() for skip in attention.skipped],
        "parameters": params,
        "parameter_bytes": param_bytes,
        "flops": flops.total,
        "flops_by_op": dict(flops.by_op),
        "flops_unknown_nodes": flops.unknown,
    }


def onnx_figures(proto: Any, shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """The same figures for an ONNX model: nodes of every subgraph (``Constant`` nodes excluded),
    weights in initializers and ``Constant`` nodes, FLOPs on the example's input ``shapes``."""
    import onnx_ir as ir

    from ptool.ir.onnx_flops import estimate_onnx_flops, onnx_graphs
    from ptool.ir.onnx_graph import node_count, parameter_count

    graphs = list(onnx_graphs(proto.graph))
    nodes = [n for g in graphs for n in g.node]
    hist = Counter(n.op_type if not n.domain or n.domain == "ai.onnx" else f"{n.domain}.{n.op_type}" for n in nodes)
    sites = {
        "BatchNorm": hist.get("BatchNormalization", 0),
        "LayerNorm": hist.get("LayerNormalization", 0) + hist.get("com.microsoft.SkipLayerNormalization", 0),
        "GroupNorm": hist.get("GroupNormalization", 0),
        "RMSNorm": hist.get("RMSNormalization", 0) + hist.get("com.microsoft.SimplifiedLayerNormalization", 0),
        "InstanceNorm": hist.get("InstanceNormalization", 0),
        "attention (fused)": hist.get("Attention", 0) + hist.get("com.microsoft.Attention", 0)
                             + hist.get("com.microsoft.MultiHeadAttention", 0),
        "softmax": hist.get("Softmax", 0),
    }
    model = ir.from_proto(proto)
    weights = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    weights += [n.attributes["value"].value for n in model.graph.all_nodes()
                if n.op_type == "Constant" and "value" in n.attributes
                and n.attributes["value"].type == ir.AttributeType.TENSOR]
    flops = estimate_onnx_flops(proto, shapes or {})
    return {
        "nodes": node_count(model),
        "graphs": len(graphs),
        "histogram": dict(hist.most_common()),
        "sites": sites,
        "attention_by_layer": {},
        "attention_sites": [],
        "attention_not_converted": [],
        "parameters": parameter_count(model),
        "parameter_bytes": sum(t.nbytes for t in weights),
        "flops": flops.total,
        "flops_by_op": dict(flops.by_op),
        "flops_unknown_nodes": flops.unknown,
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
    }


def _onnx_inputs(proto: Any) -> str:
    """``images (batch, 3, height, width) float32``: symbolic dims by name, unknown ones as ``?``."""
    from ptool.ir.onnx_module import input_specs

    def dims(spec: Any) -> str:
        if spec.dims is None:
            return "(rank unknown)"
        return "(" + ", ".join("?" if d is None or d == 0 else str(d) for d in spec.dims) + ")"

    return ", ".join(f"{s.name} {dims(s)} {s.dtype or 'non-tensor'}" for s in input_specs(proto)) or "(none)"


def run(args: argparse.Namespace, ui) -> int:
    from ptool.cli._model import resolve_from_args
    from ptool.cli._ui import format_bytes, key_values
    from ptool.ir.flops import format_flops
    from ptool.report import format_table

    if args.top < 1:
        raise _bad("--top must be at least 1")
    with ui.status("loading model"):
        src = resolve_from_args(args, ui)
    capture_seconds = None
    if src.is_onnx:
        figures = onnx_figures(src.obj, {n: tuple(a.shape) for n, a in zip(src.input_names(), src.args)})
        method, inputs = "none (ONNX input: analysed as ONNX)", _onnx_inputs(src.obj)
        inputs += f"; run on {src.input_summary()}"
    else:
        gm, method = _capture(src, ui)
        capture_seconds = gm[1]
        figures = torch_figures(gm[0], _example_call(src))
        inputs = src.input_summary()

    if args.json:
        import json

        ui.out(json.dumps({"model": src.label, "inputs": inputs, "capture": method, **figures}, indent=2, default=str))
        return 0

    params = figures["parameters"]
    size = f", {format_bytes(figures['parameter_bytes'])}" if figures["parameter_bytes"] else ""
    by_op = ", ".join(f"{k.removeprefix('aten.')} {format_flops(v)}" for k, v in
                      sorted(figures["flops_by_op"].items(), key=lambda kv: -kv[1]))
    flops = f"{format_flops(figures['flops'])} per call (matmul-class ops only{': ' + by_op if by_op else ''})"
    if figures["flops_unknown_nodes"]:
        flops += f"; {figures['flops_unknown_nodes']} nodes without shapes not counted"
    capture_text = method + (f" ({capture_seconds:.1f}s)" if capture_seconds is not None else "")
    ui.out(key_values([
        ("model", src.label),
        ("inputs", inputs),
        ("captured with", capture_text),
        ("compute nodes", str(figures["nodes"]) + (f" (in {figures['graphs']} graphs: main + If/Loop bodies)"
                                                   if figures.get("graphs", 1) > 1 else "")),
        ("parameters", f"{params:,} ({params / 1e6:.2f}M){size}"),
        ("FLOPs", flops),
    ]))
    ui.out("")
    ui.out("sites")
    ui.out(format_table(["kind", "count"], [[k, str(v)] for k, v in figures["sites"].items()]))
    if figures["attention_sites"]:
        ui.out("")
        ui.out("attention sites (what the attention passes replace; sdpa = fused, eager = written-out softmax)")
        rows = [[str(a["index"]), a["module"], _spelled(a), f"{a['heads']}/{a['kv_heads']}", str(a["head_dim"]),
                 f"{a['q_len']}x{a['kv_len']}", "yes" if a["causal"] else "no", "yes" if a["masked"] else "no",
                 ", ".join(a.get("bias", ())) or "-", a.get("problem", "")] for a in figures["attention_sites"]]
        ui.out(format_table(["#", "layer", "form", "heads/kv", "head dim", "tokens", "causal", "masked", "bias",
                             "note"], rows, align="lllrrrrrll"))
    if figures.get("attention_not_converted"):
        ui.out("")
        ui.out("softmax attention, not converted (no attention pass replaces these softmaxes)")
        ui.out(format_table(["softmax", "layer", "reason"],
                            [[a["softmax"], a["module"], a["reason"]] for a in figures["attention_not_converted"]],
                            align="lll"))
    hist = list(figures["histogram"].items())
    shown = hist if args.all else hist[: args.top]
    ui.out("")
    more = "" if len(shown) == len(hist) else f" (top {len(shown)} of {len(hist)}; --all for every op)"
    ui.out(f"op histogram{more}")
    ui.out(format_table(["op", "count"], [[k, str(v)] for k, v in shown]))
    return 0


def _spelled(site: dict) -> str:
    """``eager``, or ``eager (einsum, 5-D)`` when the site is written another way than 4-D matmuls."""
    extra = [site["spelling"]] if site.get("spelling") not in (None, "sdpa", "matmul") else []
    extra += [f"{site['rank']}-D"] if site.get("rank", 4) != 4 else []
    return f"{site['form']} ({', '.join(extra)})" if extra else site["form"]


def _example_call(src) -> tuple[tuple, dict] | None:
    args, kwargs = getattr(src, "args", None), getattr(src, "kwargs", None)
    if args is None and not kwargs:
        return None
    return tuple(args or ()), dict(kwargs or {})


def _bad(message: str) -> Exception:
    from ptool.errors import UsageError

    return UsageError(message)


def _capture(src, ui) -> tuple[tuple[Any, float], str]:
    from ptool.frontends.loaders import ModelKind
    from ptool.frontends.torch_export import capture, from_exported_program
    from ptool.inputs import check_inputs

    start = time.perf_counter()
    with ui.status("capturing the graph (torch.export)"):
        if src.loaded.kind is ModelKind.EXPORTED:
            captured = from_exported_program(src.obj)
        else:
            args, kwargs = check_inputs(src.args, src.kwargs)
            captured = capture(src.obj, args, kwargs)
    return (captured.graph_module, time.perf_counter() - start), captured.method.value
