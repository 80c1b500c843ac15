"""Generation measured: pre-fill, decode tokens/s and memory per backend and weight precision; the int8 KV cache.

Writes the "Generation" section of ``BENCHMARKS.md`` (key ``generation``).

Models:

- the byte-level Llama-style decoder trained by ``tools/train_decoder.py`` (4 layers, hidden 128,
  4 / 2 query / KV heads of 32, RoPE; reused from ``~/.cache/ptool/decoder/``), prompts from its
  held-out text;
- a Qwen2-0.5B-like configuration with random weights (hidden 896, 24 layers, 14 / 2 heads of 64,
  MLP 4864, vocabulary 151936, tied head: 494 M parameters), random prompt ids.

Each is measured by :func:`ptool.generation.benchmark_generation` (the code behind
``ptool bench --generate``): greedy generation, eager torch with Hugging Face's ``DynamicCache``
first, then ptool's static-cache step graphs on torch, ONNX Runtime (IO binding, the cache carried
as bound ``OrtValue`` buffers) and TVM, per weight variant (fp32; bf16 = ``precision:dtype=bf16``;
int8 = ``quantize:mode=int8-dynamic``; int4 = ``quantize:mode=int4-weight,group_size=32``; embeddings
stay float). One process, one row after the other, the baseline's greedy tokens the reference.

int8 KV cache: held-out perplexity of the trained decoder with its keys and values stored int8 per
token and head (a float32 scale beside each), in torch and on ONNX Runtime (the exported step), vs
the float cache; and the cache's bytes at equal context.

    .venv/bin/python tools/bench_generate.py [--no-write] [--threads 2] [--big-layers 24] [--skip-big]
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
from _sections import write_section  # noqa: E402

import ptool  # noqa: E402
from ptool.frontends.decoder import DecodeStep  # noqa: E402
from ptool.generation import benchmark_generation, format_table  # noqa: E402

BATCH = 8


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime / TVM threads (default 2)")
    p.add_argument("--big-layers", type=int, default=2,
                   help="layers of the 0.5B-class model (default 2 of its 24: one 24-layer ONNX export took 11 min "
                        "on a busy 2-core machine)")
    p.add_argument("--full", action="store_true",
                   help="the trained decoder on every backend x precision x KV dtype (torch's bf16 / int8 / int4 "
                        "graphs and TVM's builds are slow)")
    p.add_argument("--skip-big", action="store_true", help="the trained decoder only")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    data: dict = {"threads": a.threads, "machine": platform.machine(), "torch": torch.__version__}

    model, meta = td.load()
    _, held = td.corpus(td.Recipe().heldout_every)
    heldout = td.windows(held)
    heldout = heldout[: heldout.shape[0] // BATCH * BATCH]
    data["small"] = {"meta": meta, "heldout_windows": heldout.shape[0]}
    data["kv"] = kv_perplexity(model, heldout)

    small = dict(contexts=(128, 512), new_tokens=16, chunk=128)
    prompt = held[: max(small["contexts"])].view(1, -1)
    if a.full:  # every backend x precision, the int8 cache on every backend
        variants = [(b, p, "float32") for p in ("fp32", "bf16", "int8", "int4") for b in ("torch", "onnxruntime", "tvm")]
        variants += [(b, "fp32", "int8") for b in ("torch", "onnxruntime", "tvm")]
    else:  # what fits a busy 2-core machine: torch's bf16 / int8 / int4 graphs and TVM's are slow to build or run
        variants = [("torch", "fp32", "float32")] + [("onnxruntime", p, "float32") for p in ("fp32", "bf16", "int8", "int4")]
        variants += [("tvm", "fp32", "float32"), ("torch", "fp32", "int8"), ("onnxruntime", "fp32", "int8")]
    rows = benchmark_generation(model, prompt, variants=variants, log=log, prefill_repeat=3, **small)
    data["small"].update(small, rows=[r.to_dict() for r in rows], table=format_table(rows, small["contexts"],
                                                                                    small["new_tokens"]))
    data["wall_s"] = time.perf_counter() - start
    if not a.no_write:  # the trained decoder's part lands even if the big model's is cut short
        write_section("generation", markdown(data), data)
    if not a.skip_big:
        big = dict(contexts=(64, 256), new_tokens=8, chunk=64)
        model = big_model(a.big_layers)
        data["big"] = {"layers": a.big_layers, "parameters": sum(t.numel() for t in model.parameters()), **big}
        prompt = torch.randint(0, model.config.vocab_size, (1, max(big["contexts"])),
                               generator=torch.Generator().manual_seed(0))
        variants = [("torch", "fp32", "float32"), ("onnxruntime", "fp32", "float32"), ("onnxruntime", "int4", "float32"),
                    ("onnxruntime", "fp32", "int8")]
        rows = benchmark_generation(model, prompt, variants=variants, log=log, **big)
        data["big"].update(rows=[r.to_dict() for r in rows], table=format_table(rows, big["contexts"],
                                                                                big["new_tokens"]))
    data["wall_s"] = time.perf_counter() - start
    data["load_average"] = os.getloadavg()[0]  # a shared machine's noise, stated beside the figures
    data["cpus"] = os.cpu_count()
    log(f"done in {data['wall_s']:.0f} s")
    md = markdown(data)
    print(md if a.no_write else write_section("generation", md, data))


def markdown(data: dict) -> str:
    kv, small = data["kv"], data["small"]
    recipe = small["meta"]["recipe"]
    ref = kv["reference"]
    lines = [
        "## Generation: pre-fill, decode tokens/s, memory; int8 KV cache (`tools/bench_generate.py`)", "",
        f"Greedy generation, batch 1, {data['threads']} thread{'s' if data['threads'] > 1 else ''} (torch, ONNX Runtime "
        "and TVM alike), one process (`ptool bench --generate` runs the same "
        "code). Baseline: the Hugging Face model in eager torch with its growing `DynamicCache`. The other rows run "
        "ptool's decode-step graph (`ptool.frontends.decoder.DecodeStep`): a static, preallocated KV cache of "
        "max context + new tokens slots, a pre-fill graph of one chunk and a one-token decode graph, every shape "
        "static (TVM compiles each once); ONNX Runtime through IO binding, the cache buffers bound once as "
        "`OrtValue`s and updated in place. Weight variants: bf16 = `precision:dtype=bf16`, int8 = "
        "`quantize:mode=int8-dynamic`, int4 = `quantize:mode=int4-weight,group_size=32` (embeddings float). "
        "tok/s = 1000 / median decode step; 'x eager' = tok/s over the baseline's; 'same tokens' = greedy tokens "
        "equal to the baseline's, in order (a quantized variant may branch off); RSS delta = process growth while "
        "the row was built and run; KV cache = its buffers' bytes (the baseline's at the longest context). The "
        "static cache's decode cost is that of its full length at every context; an int8 cache is dequantized whole "
        "inside the step (every slot, every token), which costs decode time: what it saves is memory.", "",
        f"### Trained byte-level decoder ({recipe['layers']} layers, hidden {recipe['hidden']}, "
        f"{recipe['heads']}/{recipe['kv_heads']} heads, {small['meta']['parameters'] / 1e6:.2f} M parameters), "
        f"prompts from held-out text", "",
        small["table"], "",
    ]
    if "big" in data:
        big = data["big"]
        cut = "" if big["layers"] == 24 else f" (**{big['layers']} of 24 layers**: time on this machine)"
        lines += [f"### Qwen2-0.5B-like config, random weights{cut}: hidden 896, 14/2 heads of 64, MLP 4864, "
                  f"vocabulary 151936, tied head, {big['parameters'] / 1e6:.0f} M parameters", "",
                  big["table"], ""]
    b128 = kv["bytes@4096"]
    lines += [
        "### int8 KV cache (per token and head, float32 scale beside it)", "",
        f"Held-out perplexity of the trained decoder ({small['heldout_windows']} windows of {recipe['seq']} bytes, "
        "each pre-filled in one call: with the int8 cache the new tokens' keys and values are rounded before they are "
        "attended to, so this equals decoding byte by byte through the int8 cache).", "",
        "| KV cache | torch perplexity | vs float | ONNX Runtime perplexity | vs float | bytes @4096 tokens | "
        "vs float32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kvd, label, nbytes in (("float32", "float32", b128["float32"]), ("int8", "int8 + fp32 scale", b128["int8"])):
        t, o = kv[f"torch {kvd}"], kv[f"onnxruntime {kvd}"]
        lines.append(f"| {label} | {t:.5f} | {t - kv['torch float32']:+.5f} | {o:.5f} | "
                     f"{o - kv['onnxruntime float32']:+.5f} | {nbytes / 2**20:.2f} MiB | "
                     f"{b128['float32'] / nbytes:.2f}x smaller |")
    lines.append(f"| (bf16, for scale) | | | | | {b128['bf16'] / 2**20:.2f} MiB | 2.00x smaller |")
    lines += ["", f"Reference perplexity (the model's own forward): {ref:.5f}. int8 vs bf16 cache: "
              f"{b128['bf16'] / b128['int8']:.2f}x smaller (head dim {recipe['hidden'] // recipe['heads']}: "
              f"{recipe['hidden'] // recipe['heads']} + 4 bytes per token-head vs "
              f"{4 * recipe['hidden'] // recipe['heads']}; head dim 64 gives 3.76x, 128 gives 3.88x).",
              "", f"Whole run: {data['wall_s'] / 60:.1f} min"
              + (f"; 1-minute load average at its end {data['load_average']:.1f} on {data['cpus']} cores (other jobs "
                 "shared the machine: single figures are noisy, compare within a table)." if "load_average" in data
                 else ".")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
