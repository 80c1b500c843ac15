"""Benchmark the attention core and a whole converted encoder: softmax (SDPA) vs ptool's kernels.

Writes the "Attention speed" section of ``BENCHMARKS.md`` (key ``attention_speed`` in
``BENCHMARKS.json``).

* **Core**: from q, k, v ``(1, 12, N, 64)`` to the attended values (projections excluded),
  non-causal, at N = 1k, 4k and 16k tokens: ``torch.nn.functional.scaled_dot_product_attention``
  against every linear feature map, each timed side by side with SDPA in one round-robin run
  (median). The same modules lowered to ONNX Runtime and (untuned) TVM where that fits in time
  and memory; the table says which cells were not run and why. The slope is the least-squares
  ms per 1k tokens over the three lengths; t(16k)/t(4k) is 4 for linear time once the tensors
  are out of cache. A second table times each linear kernel alone at 16k, 32k and 64k tokens
  (all far out of the L3 cache): a log-log growth exponent of 1 is linear. It runs twice, in
  fresh processes, with glibc's default allocator and with freed memory kept for reuse
  (:data:`KEEP_MEMORY`), because page faults on fresh temporaries do not grow linearly here.
* **Encoder**: a MiniLM-shaped BERT (6 layers, hidden 384, 12 heads, 4,096 positions, random
  weights) at 4k tokens, original vs ``linear-attention:feature_map=elu`` on torch, ORT and TVM.

    .venv/bin/python tools/bench_attention.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ptool  # noqa: E402
from _sections import read_section, write_section  # noqa: E402
from ptool.benchmark import measure, measure_interleaved  # noqa: E402
from ptool.passes.attention.kernel import SiteShape  # noqa: E402

HEADS, DIM = 12, 64
MAPS = ["elu", "relu", "performer", "hedgehog", "transnormer", "inline", "flow", "hash"]
SDPA_LIMIT = 4096
"""SDPA on ORT and TVM runs up to this length: at 16k its 12 x 16k x 16k float32 scores alone are
12.9 GB, twice that with the softmax output, more than this 24 GiB host holds beside the rest."""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Sdpa(nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class Core(nn.Module):
    """One kernel on (q, k, v), no mask."""

    def __init__(self, kernel: nn.Module) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, q, k, v):
        return self.kernel(q, k, v, None)


def kernel_module(feature_map: str, n: int) -> nn.Module:
    from ptool.passes.attention.passes import _linear_kernels

    shape = SiteShape(layer=0, heads=HEADS, kv_heads=HEADS, head_dim=DIM, value_dim=DIM, q_len=n, kv_len=n,
                      scale=DIM ** -0.5)
    torch.manual_seed(0)
    return Core(_linear_kernels()[feature_map](shape)).eval()


def qkv(n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n)
    return tuple(torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(3))


def _repeats(n: int, name: str) -> int:
    if name == "sdpa":
        return {1024: 20, 4096: 8, 16384: 3}[n]
    return {1024: 30, 4096: 20, 16384: 10}[n]


def core_torch(sizes: list[int]) -> dict:
    out = {}
    for n in sizes:
        args = qkv(n)
        cands = {"sdpa": Sdpa()} | {m: kernel_module(m, n) for m in MAPS}
        log(f"torch core N={n}")
        with torch.inference_mode():
            t = measure_interleaved(cands, args, warmup=1, repeat={k: _repeats(n, k) for k in cands})
        out[n] = {k: v.median_ms for k, v in t.items()}
        log("  " + ", ".join(f"{k} {v:.1f}" for k, v in out[n].items()))
    return out


KEEP_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}
"""glibc settings that keep freed memory for reuse instead of returning it to the OS: without them
every large temporary is fresh pages, faulted in one by one (on this VM a 50 MB ``y * 3`` takes
~19 ms that way, ~3 ms in reused memory), and that cost grows faster than the tensors."""

GROWTH_SIZES = (16384, 32768, 65536)


def growth_here(sizes: tuple[int, ...] = GROWTH_SIZES) -> dict:
    """Each linear kernel alone at ``sizes`` (no SDPA between calls; 3 warm-up calls, median of 15),
    and a plain element-wise ``y * 3`` on one (1, 12, N, 64) tensor for reference."""
    out: dict[int, dict[str, float]] = {n: {} for n in sizes}
    for n in sizes:
        args = qkv(n)
        for name in MAPS:
            with torch.inference_mode():
                out[n][name] = measure(kernel_module(name, n), args, warmup=3, repeat=15).median_ms
        out[n]["y * 3"] = measure(lambda y: y * 3.0, args[:1], warmup=3, repeat=15).median_ms
        log(f"growth N={n}: " + ", ".join(f"{k} {v:.1f}" for k, v in out[n].items()))
    return out


def growth() -> dict:
    """:func:`growth_here` in two fresh processes: glibc's default allocator, and :data:`KEEP_MEMORY`.
    Once q, k, v no longer fit in the cache, doubling N must double the time."""
    import json
    import os
    import subprocess

    runs = {}
    for label, extra in (("default", {}), ("memory kept", KEEP_MEMORY)):
        log(f"growth ({label} allocator)")
        done = subprocess.run([sys.executable, __file__, "--growth-worker"], env={**os.environ, **extra},
                              capture_output=True, text=True, check=True)
        runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
    return runs


def core_backend(backend: str, sizes: list[int], maps: list[str], sdpa_sizes: list[int], **options) -> dict:
    out: dict[int, dict[str, float]] = {}
    for n in sizes:
        args = qkv(n)
        names = (["sdpa"] if n in sdpa_sizes else []) + maps
        compiled = {}
        for name in names:
            mod = Sdpa() if name == "sdpa" else kernel_module(name, n)
            start = time.perf_counter()
            try:
                compiled[name] = ptool.compile(mod, backend, args, **options)
            except Exception as e:  # report, don't hide: the cell says it failed
                log(f"  {backend} {name} N={n}: {type(e).__name__}: {str(e)[:200]}")
                continue
            log(f"  {backend} {name} N={n} built in {time.perf_counter() - start:.0f}s")
        t = measure_interleaved(compiled, args, warmup=1, repeat={k: max(3, _repeats(n, k) // 2) for k in compiled})
        out[n] = {k: v.median_ms for k, v in t.items()}
        log(f"{backend} core N={n}: " + ", ".join(f"{k} {v:.1f}" for k, v in out[n].items()))
    return out


def growth_exponent(times: dict[int, float]) -> float:
    """Least-squares slope of log t against log N: 1 for linear time, 2 for quadratic."""
    xs, ys = zip(*((math.log(n), math.log(t)) for n, t in sorted(times.items())))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def slope(times: dict[int, float]) -> tuple[float, float]:
    """Least-squares ms per 1k tokens, and t(16k)/t(4k)."""
    xs = sorted(times)
    mx, my = sum(xs) / len(xs), sum(times[x] for x in xs) / len(xs)
    b = sum((x - mx) * (times[x] - my) for x in xs) / sum((x - mx) ** 2 for x in xs)
    ratio = times[16384] / times[4096] if 16384 in times and 4096 in times else math.nan
    return b * 1000, ratio


def encoder(n: int = 4096) -> dict:
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, max_position_embeddings=n)
    torch.manual_seed(0)
    model = transformers.BertModel._from_config(cfg, attn_implementation="sdpa", add_pooling_layer=False).eval()
    ids = torch.randint(1000, 30000, (1, n))
    mask = torch.ones(1, n, dtype=torch.long)
    log(f"encoder at {n} tokens: transforming")
    m2 = ptool.transform(model, ["linear-attention:feature_map=elu,transfer_steps=0"], (ids, mask))
    cands = {"original torch": model, "linear torch": m2}
    log("encoder: building ORT sessions")
    cands["original ORT"] = ptool.compile(model, "onnxruntime", (ids, mask))
    cands["linear ORT"] = ptool.compile(m2, "onnxruntime", (ids, mask))
    log("encoder: building TVM modules")
    cands["original TVM"] = ptool.compile(model, "tvm", (ids, mask))
    cands["linear TVM"] = ptool.compile(m2, "tvm", (ids, mask))
    with torch.inference_mode():
        t = measure_interleaved(cands, (ids, mask), warmup=1, repeat=8)
    res = {k: v.median_ms for k, v in t.items()}
    log("encoder: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))
    return res


def markdown(torch_t: dict, ort_t: dict, tvm_t: dict, enc: dict, sizes: list[int], grow: dict | None = None) -> str:
    lines = ["## Attention speed (`tools/bench_attention.py`)", "",
             f"Attention core, q/k/v of shape (1, {HEADS}, N, {DIM}) to attended values (projections excluded), "
             "non-causal, fp32, batch 1. Each row timed side by side with SDPA in one round-robin run; medians in ms; "
             "speedup = SDPA / kernel at the same N on the same backend.", "",
             "### torch (eager)", "",
             "| kernel | " + " | ".join(f"N={n} ms" for n in sizes) + " | " + " | ".join(f"speedup {n}" for n in sizes)
             + " | slope ms/1k tok | t(16k)/t(4k) |",
             "|---|" + "---:|" * (2 * len(sizes) + 2)]
    for name in ["sdpa", *MAPS]:
        ms = [torch_t[n][name] for n in sizes]
        sp = [torch_t[n]["sdpa"] / torch_t[n][name] for n in sizes]
        b, r = slope({n: torch_t[n][name] for n in sizes})
        lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in ms) + " | "
                     + " | ".join(f"{x:.1f}x" for x in sp) + f" | {b:.2f} | {r:.2f} |")
    if grow:
        ns = sorted(next(iter(grow.values())), key=int)
        labels = list(grow)
        lines += ["", "Linear growth, each kernel alone (no SDPA between calls; median of 15 after 3 warm-up calls) at "
                  + ", ".join(f"{int(n) // 1024}k" for n in ns) + " tokens, all far out of the 32 MB L3 cache (the "
                  "3-point slope above includes the step out of it: at 4k each of q, k, v is 12.6 MB). Growth "
                  "exponent = least-squares slope of log t against log N (1.00 = linear, 2.00 = quadratic). Each "
                  "allocator in its own process: glibc's default hands every large temporary back to the OS, so the "
                  "next one is fresh pages faulted in one by one, a cost that does not grow linearly with the "
                  "tensors (see the plain `y * 3` row); with " + " and ".join(f"`{k}`" for k in KEEP_MEMORY)
                  + f" at {int(KEEP_MEMORY['MALLOC_MMAP_THRESHOLD_']) >> 30} GiB freed memory is reused.", "",
                  "| kernel | " + " | ".join(" | ".join(f"{lab}: N={int(n) // 1024}k ms" for n in ns)
                                            + f" | {lab}: exponent" for lab in labels) + " |",
                  "|---|" + "---:|" * ((len(ns) + 1) * len(labels))]
        for name in [*MAPS, "y * 3"]:
            cells = []
            for lab in labels:
                times = {int(n): grow[lab][n][name] for n in ns}
                cells += [f"{times[int(n)]:.1f}" for n in ns] + [f"{growth_exponent(times):.2f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for label, table in (("ONNX Runtime", ort_t), ("TVM (untuned: ptool's default schedules)", tvm_t)):
        if not table:
            continue
        ns = sorted(table)
        names = list(dict.fromkeys(k for n in ns for k in table[n]))
        lines += ["", f"### {label}", "", "| kernel | " + " | ".join(f"N={n} ms" for n in ns) + " | "
                  + " | ".join(f"speedup {n}" for n in ns) + " |", "|---|" + "---:|" * (2 * len(ns))]
        for name in names:
            ms = [f"{table[n][name]:.2f}" if name in table[n] else "not run" for n in ns]
            sp = [f"{table[n]['sdpa'] / table[n][name]:.1f}x" if name in table[n] and "sdpa" in table[n] else "-"
                  for n in ns]
            lines.append(f"| {name} | " + " | ".join(ms) + " | " + " | ".join(sp) + " |")
        if any("sdpa" not in table[n] for n in ns):
            lines += ["", f"SDPA not run above {SDPA_LIMIT} tokens: its 12 x 16k x 16k float32 score matrix is "
                      "12.9 GB, twice that with the softmax, more than this 24 GiB host holds (torch's SDPA "
                      "streams it in blocks instead)."]
    if enc:
        lines += ["", "### Whole encoder at 4,096 tokens", "",
                  "MiniLM-shaped BERT (6 layers, hidden 384, 12 heads; random weights), batch 1, original (SDPA) vs "
                  "`linear-attention:feature_map=elu,transfer_steps=0` (every layer linear).", "",
                  "| backend | original ms | linear ms | speedup |", "|---|---:|---:|---:|"]
        for be in ("torch", "ORT", "TVM"):
            if f"original {be}" not in enc:
                continue
            o, n_ = enc[f"original {be}"], enc[f"linear {be}"]
            lines.append(f"| {be} | {o:.1f} | {n_:.1f} | {o / n_:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="1k and 4k only, no TVM, no encoder")
    p.add_argument("--growth-only", action="store_true",
                   help="measure only the 16k-64k linear-growth table; keep the stored rest of the section")
    p.add_argument("--growth-worker", action="store_true", help=argparse.SUPPRESS)  # one run of growth_here
    a = p.parse_args()
    if a.growth_worker:
        import json

        print(json.dumps(growth_here()))
        return
    if a.growth_only:
        stored = read_section("attention_speed")
        keyed = {k: {int(n): v for n, v in stored[k].items()} for k in ("torch", "onnxruntime", "tvm")}
        data = {**stored, "growth": growth()}
        md = markdown(keyed["torch"], keyed["onnxruntime"], keyed["tvm"], stored["encoder_4k"], sorted(keyed["torch"]),
                      data["growth"])
        print(write_section("attention_speed", md, data))
        return
    sizes = [1024, 4096] if a.quick else [1024, 4096, 16384]
    torch_t = core_torch(sizes)
    sdpa_sizes = [n for n in sizes if n <= SDPA_LIMIT]
    ort_t = core_backend("onnxruntime", sizes, MAPS, sdpa_sizes=sdpa_sizes)
    tvm_t = {} if a.quick else core_backend("tvm", sizes, MAPS, sdpa_sizes=sdpa_sizes)
    enc = {} if a.quick else encoder()
    grow = {} if a.quick else growth()
    data = {"torch": torch_t, "onnxruntime": ort_t, "tvm": tvm_t, "encoder_4k": enc, "growth": grow}
    print(write_section("attention_speed", markdown(torch_t, ort_t, tvm_t, enc, sizes, grow), data))


if __name__ == "__main__":
    main()
