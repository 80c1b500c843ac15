"""Generation measured: pre-fill, decode tokens/s and memory per backend and weight precision; the int8 KV cache.

Writes the "Generation" section of ``BENCHMARKS.md`` (key ``generation``).

Models (``--part small`` / ``big`` / ``all``; each part rewrites only its own tables, row by row as
they are measured, so a run stopped early keeps what it measured):

- the byte-level Llama-style decoder trained by ``tools/train_decoder.py`` (4 layers, hidden 128,
  4 / 2 query / KV heads of 32, RoPE; reused from ``~/.cache/ptool/decoder/``), prompts from its
  held-out text;
- a Qwen2-0.5B-like configuration with random weights (hidden 896, 24 layers, 14 / 2 heads of 64,
  MLP 4864, vocabulary 151936, tied head: 494 M parameters), random prompt ids. A table is kept per
  layer count (``--big-layers``).

Each is measured by :func:`ptool.generation.benchmark_generation` (the code behind
``ptool bench --generate``): greedy generation, eager torch with Hugging Face's ``DynamicCache``
first, then ptool's static-cache step graphs on torch, ONNX Runtime (IO binding, the cache carried
as bound ``OrtValue`` buffers) and TVM, per weight variant (fp32; bf16 = ``precision:dtype=bf16``;
int8 = ``quantize:mode=int8-dynamic``; int4 = ``quantize:mode=int4-weight,group_size=32``; embeddings
stay float). One process, one row after the other, the baseline's greedy tokens the reference.

int8 KV cache: held-out perplexity of the trained decoder with its keys and values stored int8 per
token and head (a float32 scale beside each), in torch and on ONNX Runtime (the exported step), vs
the float cache; and the cache's bytes at equal context.

    .venv/bin/python tools/bench_generate.py [--part small|big|all] [--threads 1] [--variants torch:int8,...]
        [--big-layers 24] [--big-contexts 64,256] [--big-new-tokens 8] [--big-variants ...] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import train_decoder as td  # noqa: E402
from _sections import update_section  # noqa: E402

import ptool  # noqa: E402
from ptool.errors import UsageError  # noqa: E402
from ptool.frontends.decoder import DecodeStep  # noqa: E402
from ptool.generation import PRECISIONS, benchmark_generation, check_generation_args, format_table  # noqa: E402

BATCH = td.EVAL_BATCH


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def kv_perplexity(model, heldout: torch.Tensor) -> dict:
    """Held-out perplexity with a float32 and an int8 KV cache, in torch and on ONNX Runtime."""
    out = {"reference": td.perplexity(td.Logits(model), heldout, BATCH)}
    with tempfile.TemporaryDirectory() as tmp:
        for kv in ("float32", "int8"):
            spec = DecodeStep.cache_spec(model, 1, batch=BATCH, kv_dtype=kv)
            step = DecodeStep(model, spec).eval()
            out[f"torch {kv}"] = td.perplexity(lambda ids: step(ids, torch.tensor(0), *spec.empty())[0], heldout, BATCH)
            example = (heldout[:BATCH], torch.tensor(0), *spec.empty())
            ort = ptool.compile(step, "onnxruntime", example_inputs=example, onnx_path=str(pathlib.Path(tmp) / f"{kv}.onnx"))
            out[f"onnxruntime {kv}"] = td.perplexity(lambda ids: ort(ids, torch.tensor(0), *spec.empty())[0], heldout,
                                                     BATCH)
            log(f"perplexity, {kv} cache: torch {out[f'torch {kv}']:.5f}, ORT {out[f'onnxruntime {kv}']:.5f}")
    for ctx in (128, 512, 4096):
        sizes = {kv: DecodeStep.cache_spec(model, ctx, kv_dtype=kv).nbytes() for kv in ("float32", "int8")}
        out[f"bytes@{ctx}"] = {**sizes, "bf16": sizes["float32"] // 2}
    return out


def big_model(layers: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


#: Every backend x weight variant (torch first, then TVM's reduced-precision builds, then ONNX Runtime),
#: then the int8 KV cache on torch and ONNX Runtime.
SMALL_VARIANTS = ",".join([f"torch:{p}" for p in PRECISIONS] + [f"tvm:{p}" for p in PRECISIONS if p != "fp32"] +
                          [f"onnxruntime:{p}" for p in PRECISIONS] + ["tvm:fp32", "torch:fp32:int8",
                                                                      "onnxruntime:fp32:int8"])
#: The same grid on the 0.5B-class model, TVM last (its int8 / int4 builds take the most memory).
BIG_VARIANTS = ",".join([f"torch:{p}" for p in PRECISIONS] + [f"onnxruntime:{p}" for p in PRECISIONS] +
                        ["torch:fp32:int8", "onnxruntime:fp32:int8"] + [f"tvm:{p}" for p in PRECISIONS])
#: Shape of the int4 kernel check: Qwen2-0.5B's MLP up-projection (896 in, 4864 out), groups of 32.
KERNEL_SHAPE, KERNEL_GROUP, KERNEL_ROWS = (4864, 896), 32, (1, 64)


def variants_arg(text: str) -> list[tuple[str, str, str]]:
    """``backend:precision[:kv],...`` -> ``(backend, precision, kv dtype)`` triples (checked)."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (2, 3):
            raise argparse.ArgumentTypeError(f"a variant is backend:precision[:kv], got '{item}'")
        out.append((parts[0], parts[1], {"int8": "int8"}.get(parts[2] if len(parts) == 3 else "", "float32")))
    try:
        check_generation_args((1,), 2, 1, [v[1] for v in out], [v[0] for v in out], [v[2] for v in out])
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return out


def contexts_arg(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(","))


class Recorder:
    """Merges one part's figures into the section's data and rewrites the section (kept as rows come)."""

    def __init__(self, write: bool) -> None:
        self.write = write

    def __call__(self, update) -> str:
        def render(data: dict) -> tuple[str, dict]:
            data = dict(data)
            if "big" in data:  # a record written before the big model's runs were kept per layer count
                old = data.pop("big")
                data.setdefault("big_runs", {})[str(old["layers"])] = {"threads": data.get("threads"), **old}
            update(data)
            return markdown(data), data

        if not self.write:
            return render({})[0]
        return update_section("generation", render)


def run_small(a, record: Recorder) -> None:
    start = time.perf_counter()
    model, meta = td.load()
    _, held, heldout = td.evaluation_split(BATCH)
    small = dict(contexts=(128, 512), new_tokens=16, chunk=128)
    prompt = held[: max(small["contexts"])].view(1, -1)
    part = {"meta": meta, "heldout_windows": heldout.shape[0], "threads": a.threads, **small,
            "planned": len(a.variants) + 1, "torch_int4": "packed"}

    def update(data: dict) -> None:
        if data.get("small") is not part and _complete(data.get("small")):  # kept until this run is complete
            data["small_previous"] = data["small"]
        if _complete(part):
            data.pop("small_previous", None)
        data.update(small=part, machine=platform.machine(), torch=torch.__version__)

    def keep(rows) -> None:
        part.update(rows=[r.to_dict() for r in rows], table=format_table(rows, small["contexts"], small["new_tokens"]),
                    wall_s=time.perf_counter() - start, load_average=os.getloadavg()[0])
        record(update)

    benchmark_generation(model, prompt, variants=a.variants, log=log, prefill_repeat=3, on_row=keep, **small)
    kv = kv_perplexity(model, heldout)  # after the rows: until it lands, the last run's figures stand
    record(lambda data: data.update(kv=kv))


def _complete(part: dict | None) -> bool:
    return bool(part) and len(part["rows"]) >= part.get("planned", 0)


def int4_kernel_ms() -> dict[str, dict[str, float]]:
    """Median ms of one int4 linear of :data:`KERNEL_SHAPE` per batch rows: ptool's reference op
    (unpacks the weight to float32 per call), torch's packed int4 kernel (what the torch backend
    runs) and the float32 matmul, interleaved."""
    from ptool.benchmark import measure_interleaved
    from ptool.ops import quant as q
    from ptool.passes.quant import quantizers as qz

    out_features, in_features = KERNEL_SHAPE
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen) * 0.02
    levels, scales, zeros = qz.quantize_weight_asymmetric(w, 4, KERNEL_GROUP)
    packed, zeros = q.pack_nibbles(levels), q.pack_nibbles(zeros)
    weight, scales_and_zeros = q.pack_int4_for_cpu(packed, scales, zeros, in_features)
    out = {}
    for rows in KERNEL_ROWS:
        x = torch.randn(rows, in_features, generator=gen)
        timings = measure_interleaved({
            "reference": lambda: torch.ops.ptool_quant.linear_int4(x, packed, scales, zeros, None, in_features),
            "packed": lambda: q.int4_packed_linear(x, weight, scales_and_zeros, None, KERNEL_GROUP),
            "float32": lambda: x @ w.T}, warmup=3, repeat=30)
        out[str(rows)] = {k: t.median_ms for k, t in timings.items()}
        log(f"int4 kernel, {rows} rows: " + ", ".join(f"{k} {v:.3f} ms" for k, v in out[str(rows)].items()))
    return out


def run_big(a, record: Recorder) -> None:
    start = time.perf_counter()
    big = dict(contexts=a.big_contexts, new_tokens=a.big_new_tokens, chunk=min(a.big_contexts))
    kernel = int4_kernel_ms()
    model = big_model(a.big_layers)
    part = {"layers": a.big_layers, "parameters": sum(t.numel() for t in model.parameters()), "threads": a.threads,
            **big, "planned": len(a.big_variants) + 1, "int4_kernel_ms": kernel,
            "build_limit_min": a.build_limit_min, "memory_limit_gib": a.memory_limit_gib}
    prompt = torch.randint(0, model.config.vocab_size, (1, max(big["contexts"])),
                           generator=torch.Generator().manual_seed(0))

    def keep(rows) -> None:
        part.update(rows=[r.to_dict() for r in rows], table=format_table(rows, big["contexts"], big["new_tokens"]),
                    wall_s=time.perf_counter() - start, load_average=os.getloadavg()[0])
        record(lambda data: data.setdefault("big_runs", {}).__setitem__(str(a.big_layers), part))

    benchmark_generation(model, prompt, variants=a.big_variants, log=log, on_row=keep,
                         build_timeout_s=a.build_limit_min * 60, **big)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("small", "big", "all"), default="all",
                   help="the trained decoder (with the KV-cache perplexity), the 0.5B-class model, or both; each "
                        "part replaces only its own tables")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime / TVM threads (default 1)")
    p.add_argument("--variants", type=variants_arg, default=variants_arg(SMALL_VARIANTS),
                   help="the trained decoder's rows: backend:precision[:kv],... (default: every backend x fp32 / "
                        "bf16 / int8 / int4, and torch and onnxruntime fp32 with the int8 cache)")
    p.add_argument("--big-layers", type=int, default=24, help="layers of the 0.5B-class model (default 24)")
    p.add_argument("--big-contexts", type=contexts_arg, default=(64, 256), help="its prompt lengths (default 64,256)")
    p.add_argument("--big-new-tokens", type=int, default=8, help="its new tokens per prompt (default 8)")
    p.add_argument("--big-variants", type=variants_arg, default=variants_arg(BIG_VARIANTS),
                   help=f"its rows (default {BIG_VARIANTS})")
    p.add_argument("--build-limit-min", type=float, default=20,
                   help="a 0.5B-class variant still building after this many minutes of CPU time is recorded as "
                        "not built (default 20)")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="cap the process's address space (RLIMIT_AS): a build that needs more fails with an "
                        "allocation error in its row instead of waking the OOM killer")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--render-only", action="store_true", help="rewrite the section from BENCHMARKS.json, measure nothing")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.memory_limit_gib:
        import resource

        limit = int(a.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads))  # TVM's pool too: CPU time is then one thread's work
    record = Recorder(not a.no_write)
    if a.render_only:
        print(record(lambda data: None))
        return
    if a.part in ("small", "all"):
        run_small(a, record)
    if a.part in ("big", "all"):
        run_big(a, record)
    log("done")


def _run_line(part: dict) -> str:
    """How the part ran: threads, rows done of those planned, wall time, the machine's load."""
    done, planned = len(part["rows"]), part.get("planned", len(part["rows"]))
    cut = "" if done >= planned else (f" **Partial: {done} of {planned} rows** (the run was stopped there for time "
                                      "on this machine; the rows shown were measured).")
    load = (f"; 1-minute load average {part['load_average']:.1f} at the last row (other jobs shared the 2-core "
            "machine: compare within a table)") if part.get("load_average") is not None else ""
    wall = f"{part['wall_s'] / 60:.1f} min" if part.get("wall_s") else "-"
    threads = part.get("threads") or 1
    return f"{threads} thread{'s' if threads > 1 else ''}, {wall} for this table{load}.{cut}"


def markdown(data: dict) -> str:
    lines = [
        "## Generation: pre-fill, decode tokens/s, memory; int8 KV cache (`tools/bench_generate.py`)", "",
        "Greedy generation, batch 1, one process per table, torch, ONNX Runtime and TVM on the same thread count "
        "(`ptool bench --generate` runs the same code). Baseline: the Hugging Face model in eager torch with its "
        "growing `DynamicCache`, measured in the same run as the rows beside it. The other rows run "
        "ptool's decode-step graph (`ptool.frontends.decoder.DecodeStep`): a static, preallocated KV cache of "
        "max context + new tokens slots, a pre-fill graph of one chunk and a one-token decode graph, every shape "
        "static (TVM compiles each once); ONNX Runtime through IO binding, the cache buffers bound once as "
        "`OrtValue`s and updated in place. Weight variants: bf16 = `precision:dtype=bf16`, int8 = "
        "`quantize:mode=int8-dynamic`, int4 = `quantize:mode=int4-weight,group_size=32` (embeddings float). "
        "What the quantized layers run on: torch int8 = `torch._int_mm` (int8 x int8 -> int32, the activation "
        "quantized per call); torch int4 = torch's packed int4 CPU kernel (`aten._weight_int4pack_mm_for_cpu`; the "
        "torch backend repacks each 4-bit weight once when it builds the step, the activation goes in and the "
        "product comes out as bf16, the kernel's fast path; a layer whose shape it does not take stays on ptool's "
        "reference op, which unpacks the whole weight to float32 on every call); ONNX Runtime int8 = "
        "`DynamicQuantizeLinear` + `MatMulInteger` (fused to `DynamicQuantizeMatMul`), int4 = "
        "`com.microsoft.MatMulNBits`; TVM has no integer kernels for them here: ptool hands it the quantized "
        "ops decomposed into float aten ops (dequantize, then a float matmul; constant folding may fold the "
        "stored weights back to float), so its int8 / int4 rows measure that, not integer arithmetic (a row that "
        "did not build says why). "
        "tok/s = 1000 / median decode step (wall time); 'x eager' = tok/s over the baseline's; 'CPU tok/s' = the "
        "same from the process's CPU time per step (one thread everywhere, so it is the step's own cost: on this "
        "shared 2-core machine other jobs stretch the wall time at random, the CPU time much less; compare the CPU "
        "columns); 'same tokens' = greedy tokens "
        "equal to the baseline's, in order (a quantized variant may branch off); RSS delta = process growth while "
        "the row was built and run; KV cache = its buffers' bytes (the baseline's at the longest context). The "
        "static cache's decode cost is that of its full length at every context; an int8 cache is dequantized whole "
        "inside the step (every slot, every token), which costs decode time: what it saves is memory.", "",
    ]
    small = data.get("small")
    if small:
        recipe = small["meta"]["recipe"]
        lines += [f"### Trained byte-level decoder ({recipe['layers']} layers, hidden {recipe['hidden']}, "
                  f"{recipe['heads']}/{recipe['kv_heads']} heads, {small['meta']['parameters'] / 1e6:.2f} M parameters), "
                  f"prompts from held-out text", "", _run_line(small) + _int4_note(small), "", small["table"], ""]
        previous = data.get("small_previous")
        if previous:
            lines += ["The previous complete run of this table (shown until the run above completes):", "",
                      _run_line(previous) if "wall_s" in previous else "1 thread.", "", previous["table"], ""]
    for layers, big in sorted(data.get("big_runs", {}).items(), key=lambda kv: -int(kv[0])):
        cut = "" if big["layers"] == 24 else f" (**{big['layers']} of 24 layers**)"
        lines += [f"### Qwen2-0.5B-like config, random weights{cut}: hidden 896, 14/2 heads of 64, MLP 4864, "
                  f"vocabulary 151936, tied head, {big['parameters'] / 1e6:.0f} M parameters", "",
                  (_run_line(big) if "wall_s" in big else "1 thread.") + _int4_note(big) + _limits(big), "",
                  big["table"], ""]
        lines += _kernel_lines(big)
    kv = data.get("kv")
    if kv and small:
        lines += _kv_lines(kv, small)
    return "\n".join(lines)


def _int4_note(part: dict) -> str:
    """Which int4 kernel the part's torch row ran: tables measured before the packed kernel say so."""
    if "int4_kernel_ms" in part or part.get("torch_int4") == "packed" or not any(
            r["label"] == "torch int4" for r in part.get("rows", [])):
        return ""
    return (" Its torch int4 row was measured before the torch backend had the packed int4 kernel: it ran "
            "ptool's reference op (the weight unpacked to float32 on every call).")


def _limits(part: dict) -> str:
    if not part.get("build_limit_min"):
        return ""
    memory = f" and an address-space limit of {part['memory_limit_gib']:g} GiB" if part.get("memory_limit_gib") else ""
    return (f" Builds ran under a limit of {part['build_limit_min']:g} CPU minutes{memory}: a variant past either "
            "is a row saying why it was not built.")


def _kernel_lines(part: dict) -> list[str]:
    """The int4 kernel check measured at the start of the part's run."""
    kernel = part.get("int4_kernel_ms")
    if not kernel:
        return []
    out_features, in_features = KERNEL_SHAPE
    cells = [f"{rows} row{'s' if rows != '1' else ''}: reference op {ms['reference']:.3f} ms, packed kernel "
             f"{ms['packed']:.3f} ms ({ms['reference'] / ms['packed']:.1f}x), float32 matmul {ms['float32']:.3f} ms"
             for rows, ms in kernel.items()]
    return [f"torch int4 kernel, same run, one linear of {in_features} -> {out_features} (this model's MLP "
            f"up-projection, groups of {KERNEL_GROUP}), median wall ms, interleaved: " + "; ".join(cells) + ".", ""]


def _kv_lines(kv: dict, small: dict) -> list[str]:
    recipe = small["meta"]["recipe"]
    b4096 = kv["bytes@4096"]
    lines = [
        "### int8 KV cache (per token and head, float32 scale beside it)", "",
        f"Held-out perplexity of the trained decoder ({small['heldout_windows']} windows of {recipe['seq']} bytes, "
        "each pre-filled in one call: with the int8 cache the new tokens' keys and values are rounded before they are "
        "attended to, so this equals decoding byte by byte through the int8 cache).", "",
        "| KV cache | torch perplexity | vs float | ONNX Runtime perplexity | vs float | bytes @4096 tokens | "
        "vs float32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kvd, label, nbytes in (("float32", "float32", b4096["float32"]), ("int8", "int8 + fp32 scale", b4096["int8"])):
        t, o = kv[f"torch {kvd}"], kv[f"onnxruntime {kvd}"]
        lines.append(f"| {label} | {t:.5f} | {t - kv['torch float32']:+.5f} | {o:.5f} | "
                     f"{o - kv['onnxruntime float32']:+.5f} | {nbytes / 2**20:.2f} MiB | "
                     f"{b4096['float32'] / nbytes:.2f}x smaller |")
    lines.append(f"| (bf16, for scale) | | | | | {b4096['bf16'] / 2**20:.2f} MiB | 2.00x smaller |")
    head = recipe["hidden"] // recipe["heads"]
    lines += ["", f"Reference perplexity (the model's own forward): {kv['reference']:.5f}. int8 vs bf16 cache: "
              f"{b4096['bf16'] / b4096['int8']:.2f}x smaller (head dim {head}: {head} + 4 bytes per token-head vs "
              f"{4 * head}; head dim 64 gives 3.76x, 128 gives 3.88x)."]
    return lines


if __name__ == "__main__":
    main()
