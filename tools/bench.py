"""Benchmark ptool's backends side by side and write BENCHMARKS.md + BENCHMARKS.json at the repo root.

    .venv/bin/python tools/bench.py                                   # every model, every backend
    .venv/bin/python tools/bench.py --models minilm --backends torch,onnxruntime --repeat 30

For each model: the default exact pipeline (dce, cse, constant-fold, fold-bn) runs first; then the
original model in eager torch (the baseline) and the transformed model on each backend are timed
in one interleaved run (round-robin, so machine noise hits all alike) with the harness in
``ptool.benchmark``. Each row gives the median latency, p10 / p90, the speedup over eager
(eager median / row median), and max abs error and cosine vs eager on the example input plus up
to 4 more batches. Slow candidates (untuned TVM) get fewer timed calls: ``--max-seconds`` caps
each candidate's timing budget (never fewer than 3 calls).

Models (no downloads; weights are the real checkpoint only for MiniLM):

- ``minilm``: all-MiniLM-L6-v2 sentence embedder, real weights, real sentences, seq 128, batch 1.
- ``bert-base``: ``BertModel`` with the bert-base config (12 layers, hidden 768), seeded random
  weights, real sentences tokenized with the (bert-base-uncased) MiniLM tokenizer, seq 128, batch 1.
- ``resnet50``: ``ResNetForImageClassification`` with the ResNet-50 config, He-init weights and
  BatchNorm statistics measured on random images (so fold-bn has work), 1x3x224x224.
- ``mobilenet_v2``: ``MobileNetV2ForImageClassification`` (depth multiplier 1.0, 224), likewise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

ALL_BACKENDS = ("torch", "onnxruntime", "tvm")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


# ---------------------------------------------------------------------------------------------
# models


@dataclass
class BenchModel:
    name: str
    description: str
    module: Any
    args: tuple
    kwargs: dict = field(default_factory=dict)
    check: list = field(default_factory=list)  # extra (args, kwargs) for the fidelity check


def _seeded(seed: int):
    import torch

    ctx = torch.random.fork_rng(devices=[])
    ctx.__enter__()
    torch.manual_seed(seed)
    return ctx


def _trained_like_cnn(model: Any, images: list, seed: int = 0) -> int:
    """Give a randomly initialized CNN the conditioning of a trained one, so fold-bn has real work.

    He-initialized convs, BatchNorm statistics measured on random images (train-mode passes),
    random affine weights, and the last BatchNorm of every residual branch scaled down (trained
    residual networks keep branches small; with unit-size branches a 50-layer random net
    amplifies float32 rounding enough that fp32 comparisons measure the fixture, not the pass).
    """
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_out) ** 0.5)
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        for x in images:
            model(x)
        model.eval()
        for bn in bns:
            bn.momentum = 0.1
            bn.running_var.clamp_(min=float(0.1 * bn.running_var.median()))
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.3)
        for name, m in model.named_modules():  # ResNet bottleneck's last BN, MobileNetV2's projection BN
            if name.endswith(("layer.2.normalization", "reduce_1x1.normalization")):
                m.weight.mul_(0.25)
    return len(bns)


def _sentence_batches(seq_len: int, count: int) -> list[tuple]:
    from ptool.default_model import encode
    from ptool.frontends.huggingface import sample_sentences

    sentences = sample_sentences()
    return [encode([s], seq_len) for s in sentences[: count]]


def minilm() -> BenchModel:
    from ptool.default_model import default_model

    d = default_model(seq_len=128, batch_size=1)
    return BenchModel("minilm", "all-MiniLM-L6-v2 sentence embedder (real weights) on real sentences, seq 128, batch 1",
                      d.module, tuple(d.example_inputs), {}, [(tuple(b), {}) for b in d.calibration_batches[1:5]])


def bert_base() -> BenchModel:
    import transformers

    config = transformers.BertConfig(return_dict=False, use_cache=False)  # bert-base: 12 x 768, 12 heads
    ctx = _seeded(0)
    try:
        model = transformers.BertModel._from_config(config, attn_implementation="sdpa").eval()
    finally:
        ctx.__exit__(None, None, None)
    batches = _sentence_batches(128, 5)
    return BenchModel("bert-base", "BertModel, bert-base config (12 layers, hidden 768), seeded random weights, "
                      "real sentences, seq 128, batch 1", model, tuple(batches[0]), {},
                      [(tuple(b), {}) for b in batches[1:]])


def _vision(name: str, cls_name: str, config: Any, description: str) -> BenchModel:
    import torch
    import transformers

    config.return_dict = False
    ctx = _seeded(0)
    try:
        model = getattr(transformers, cls_name)._from_config(config).eval()
    finally:
        ctx.__exit__(None, None, None)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, 224, 224, generator=gen) for _ in range(5)]
    _trained_like_cnn(model, [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(2)])
    return BenchModel(name, description, model, (images[0],), {}, [((x,), {}) for x in images[1:]])


def resnet50() -> BenchModel:
    import transformers

    return _vision("resnet50", "ResNetForImageClassification", transformers.ResNetConfig(),
                   "ResNet-50 config, He-init weights, measured BatchNorm stats, 1x3x224x224")


def mobilenet_v2() -> BenchModel:
    import transformers

    return _vision("mobilenet_v2", "MobileNetV2ForImageClassification", transformers.MobileNetV2Config(),
                   "MobileNetV2 (depth multiplier 1.0) config, He-init weights, measured BatchNorm stats, 1x3x224x224")


MODELS: dict[str, Callable[[], BenchModel]] = {
    "minilm": minilm,
    "bert-base": bert_base,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
}


# ---------------------------------------------------------------------------------------------
# machine


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        dist = {"tvm": "apache-tvm", "onnxruntime": "onnxruntime"}.get(module, module)
        return version(dist)
    except Exception:
        return "not installed"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        return out.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    import torch

    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "tvm": _version("tvm"),
        "transformers": _version("transformers"),
        "onnx": _version("onnx"),
        "os": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": _git_commit(),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default)"),
    }


# ---------------------------------------------------------------------------------------------
# running


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def bench_model(build: Callable[[], BenchModel], backends: list[str], args: argparse.Namespace) -> dict:
    import ptool
    from ptool.benchmark import backend_candidates, compare_candidates
    from ptool.passes.pipelines import DEFAULT_PIPELINE

    start = time.perf_counter()
    m = build()
    log(f"{m.name}: built ({time.perf_counter() - start:.1f}s); transforming")
    calibration = [a for a, _ in m.check] if m.check and not any(k for _, k in m.check) else None
    passes, pipeline_error = list(DEFAULT_PIPELINE), None
    try:
        transformed = ptool.transform(m.module, passes, example_inputs=m.args, example_kwargs=m.kwargs or None,
                                      calibration=calibration)
    except ptool.PtoolError as e:  # report it, and still measure the backends on the captured graph
        pipeline_error, passes = str(e), []
        log(f"{m.name}: default pipeline failed ({e}); measuring the untransformed graph")
        transformed = ptool.transform(m.module, passes, example_inputs=m.args, example_kwargs=m.kwargs or None)
    candidates, failures = None, {}
    for backend in backends:
        log(f"{m.name}: building {backend}")
        try:
            built = backend_candidates(m.module, transformed, [backend], m.args, m.kwargs, transformed=bool(passes))
        except Exception as e:  # record and carry on with the other backends
            failures[backend] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"{m.name}: {backend} failed: {failures[backend]}")
            if args.debug:
                traceback.print_exc()
            continue
        candidates = built if candidates is None else [*candidates, built[1]]
    if candidates is None:  # every backend failed: still time the baseline alone
        candidates = backend_candidates(m.module, transformed, [], m.args, m.kwargs)
    log(f"{m.name}: timing {len(candidates)} candidates (interleaved)")
    rows = compare_candidates(candidates, m.args, m.kwargs, check_inputs=m.check, warmup=args.warmup,
                              repeat=args.repeat, max_seconds=args.max_seconds)
    report = transformed.report
    return {
        "name": m.name,
        "description": m.description,
        "inputs": _describe_inputs(m.args, m.kwargs),
        "fidelity_inputs": 1 + len(m.check),
        "passes": passes,
        "pipeline_error": pipeline_error,
        "transform": {
            "capture": report.capture,
            "nodes": f"{report[0].nodes_before}->{report[-1].nodes_after}" if len(report) else None,
            "rewritten": {r.spec: r.rewritten for r in report},
            "whole_model_max_abs_error": report.total.max_abs_error if report.total else None,
        },
        "rows": [r.to_dict() for r in rows],
        "failures": failures,
        "seconds": time.perf_counter() - start,
    }


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    import torch

    def one(x: Any) -> str:
        return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if isinstance(x, torch.Tensor) else repr(x)

    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()])


# ---------------------------------------------------------------------------------------------
# writing


def _fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.1e}"


def _fmt_mem(x: float | None) -> str:
    # RSS can shrink while a backend builds (freed temporaries returned to the OS): show that as +0
    return "-" if x is None else f"{max(x, 0.0):+.0f}"


def render_markdown(data: dict, argv: list[str]) -> str:
    mi = data["machine"]
    isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in mi["isa"].items())
    load_start = mi.get("load_average_start")
    load_end = data.get("load_average_end")
    lines = [
        "# ptool benchmarks",
        "",
        f"Generated by `tools/bench.py` on {mi['date']}" + (f" at commit `{mi['git']}`" if mi.get("git") else "") + ".",
        "",
        "Reproduce: `make demo` (sets up `.venv`), then "
        f"`.venv/bin/python tools/bench.py {' '.join(argv)}`".rstrip() + " — rewrites the part of this file above "
        "the first tool section (and its keys of `BENCHMARKS.json`); each later section names the tool that writes it.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {mi['cpu']} |",
        f"| cores | {mi['logical_cores']} logical ({mi['usable_cores']} usable), torch threads {mi['torch_threads']}, "
        f"OMP_WAIT_POLICY {mi.get('omp_wait_policy', '?')} |",
        f"| ISA | {isa} |",
        f"| software | python {mi['python']}, torch {mi['torch']}, onnxruntime {mi['onnxruntime']}, "
        f"apache-tvm {mi['tvm']}, transformers {mi['transformers']}, onnx {mi['onnx']} |",
        f"| OS | {mi['os']} |",
    ]
    if load_start:
        lines.append(f"| load average (1/5/15 min) | at start {', '.join(f'{x:.2f}' for x in load_start)}"
                     + (f"; at end {', '.join(f'{x:.2f}' for x in load_end)}" if load_end else "") + " |")
    s = data["settings"]
    lines += [
        "",
        "## Method",
        "",
        f"- Each model first goes through the default exact pipeline ({', '.join(s['passes'])}); the baseline is the "
        "**original** model in eager torch, every other row runs the transformed model.",
        f"- Candidates are timed in one run, round-robin (one timed call of each per round, right after one untimed "
        f"call of the same candidate, so the previous runtime's spinning threads are idle), {s['warmup']} warm-up "
        "calls, "
        f"up to {s['repeat']} timed calls each, fewer for a candidate that would take more than "
        f"~{s['max_seconds']:g} s (at least 3); all under `torch.no_grad()` with the GC off (`ptool.benchmark`).",
        "- Latency is the median; p10 / p90 show the spread. Speedup = eager median / row median.",
        "- Max abs error and cosine compare each row's outputs with the eager baseline's, over the example input "
        "plus up to 4 more batches.",
        "- Build = compile + first call; mem = process RSS growth over the build (weights copied into the backend).",
        "- TVM is **untuned** here: ptool's default CPU schedules (`ptool/backends/tvm_schedules.py`), no "
        "MetaSchedule tuning and no BLAS (the pip build has none); `ptool tune` searches further.",
        "- On a shared VM other work shows up as spread (p10-p90); compare ratios within one table rather than "
        "absolute numbers across runs. When the load average exceeds the core count, eager torch suffers most: "
        "its OpenMP threads spin-wait for descheduled peers (on this 2-core VM at load 3.5, MiniLM eager took "
        "~280 ms with 2 threads vs ~64 ms with `OMP_WAIT_POLICY=PASSIVE`); `--omp-wait-policy passive` "
        "applies that setting.",
    ]
    for model in data["models"]:
        lines += ["", f"## {model['name']}", "", model["description"] + ".",
                  "", f"Inputs: {model['inputs']}. Fidelity checked on {model['fidelity_inputs']} input(s)."]
        t = model["transform"]
        if model.get("pipeline_error"):
            lines += [f"**The default pipeline failed on this model** (`{model['pipeline_error']}`), so the rows "
                      f"below run the captured, untransformed graph (captured with {t['capture']}).", ""]
        else:
            rewritten = ", ".join(f"{k} {v}" for k, v in t["rewritten"].items())
            lines += [f"Transform: captured with {t['capture']}; nodes {t['nodes']}; sites rewritten: {rewritten}.", ""]
        lines += ["| backend | median ms | p10 ms | p90 ms | runs | speedup vs eager | max abs err | cosine | build s "
                  "| mem MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in model["rows"]:
            lines.append(
                f"| {r['name']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {r['p90_ms']:.2f} | {r['runs']} | "
                f"{r['speedup_vs_baseline']:.2f}x | {_fmt_err(r['max_abs_error'])} | "
                f"{r['cosine']:.6f} | {r['build_seconds']:.1f} | "
                f"{_fmt_mem(r['memory_mb'])} |"
            )
        for backend, reason in model["failures"].items():
            lines.append(f"\n{backend} failed on this model: `{reason}`")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    p.add_argument("--backends", default=",".join(ALL_BACKENDS), help="comma-separated: torch, onnxruntime, tvm")
    p.add_argument("--repeat", type=int, default=20, help="timed calls per candidate (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per candidate (default 3)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="timing budget per candidate; slower ones get fewer calls, at least 3 (default 30)")
    p.add_argument("--output-dir", type=Path, default=ROOT, help="where BENCHMARKS.md/.json go (default: repo root)")
    p.add_argument("--omp-wait-policy", choices=("default", "passive", "active"), default="default",
                   help="set OMP_WAIT_POLICY before torch loads; 'passive' keeps eager torch from collapsing on a "
                        "busy machine (default: leave the environment alone)")
    p.add_argument("--debug", action="store_true", help="print tracebacks of failing backends")
    args = p.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model '{m}' (choose from {', '.join(MODELS)})")
    for b in backends:
        if b not in ALL_BACKENDS:
            p.error(f"unknown backend '{b}' (choose from {', '.join(ALL_BACKENDS)})")
    if args.repeat < 1 or args.warmup < 0 or args.max_seconds <= 0:
        p.error("--repeat must be >= 1, --warmup >= 0, --max-seconds > 0")

    if args.omp_wait_policy != "default":  # must happen before torch (libgomp) is loaded
        if "torch" in sys.modules:
            p.error("--omp-wait-policy must be applied before torch is imported")
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)

    data: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"repeat": args.repeat, "warmup": args.warmup, "max_seconds": args.max_seconds,
                     "backends": backends, "passes": None},
        "models": [],
    }
    from ptool.passes.pipelines import DEFAULT_PIPELINE

    data["settings"]["passes"] = list(DEFAULT_PIPELINE)
    for name in models:
        log(f"== {name}")
        data["models"].append(bench_model(MODELS[name], backends, args))
    data["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    if args.output_dir.resolve() == ROOT.resolve():
        # the other tools' marked sections (attention, quantization, TVM, autotune...) are kept
        from _sections import write_head

        write_head(render_markdown(data, argv), data)
    else:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "BENCHMARKS.json").write_text(json.dumps(data, indent=2) + "\n")
        (args.output_dir / "BENCHMARKS.md").write_text(render_markdown(data, argv))
    log(f"wrote {args.output_dir / 'BENCHMARKS.md'} and BENCHMARKS.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
