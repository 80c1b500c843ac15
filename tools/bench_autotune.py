"""The autotuner on all-MiniLM-L6-v2 (real weights) and a ViT: is the winner at least as fast as the
fastest of torch eager, torch.compile, ONNX Runtime defaults and untuned TVM, within max_error?

Writes the "Autotune" section of ``BENCHMARKS.md`` (key ``autotune``).

Protocol, per model: ``ptool.autotune(max_error=0.01)`` (error = 1 - cosine vs the fp32 model in
eager torch, worst over held-out inputs that are never the calibration ones) over the exact default
pipeline on every backend variant plus ``quantize`` (int8-dynamic) as the approximate candidate; then,
in the same process, the winner and the four baselines are timed side by side
(:func:`ptool.benchmark.measure_interleaved`, round-robin, median). A second ``autotune`` call with the
same model, device and settings is timed too: it must answer from the saved record in < 10% of the
first call's time.

- MiniLM: the sentence embedder, batch 1, 128 tokens; held-out: 8 of the sentences shipped with ptool;
  calibration: the Python reference manual's sentences.
- ViT: ``ViTForImageClassification`` from a ViT-S/16 config (224 px, hidden 384, 12 layers, 6 heads),
  seeded random weights, batch 1; held-out: 4 other seeded images.

    .venv/bin/python tools/bench_autotune.py [--models minilm,vit] [--no-tvm] [--repeat 20] [--no-write]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import ptool  # noqa: E402
from _sections import write_section  # noqa: E402
from ptool.benchmark import measure, measure_interleaved, plan_repeats  # noqa: E402

MAX_ERROR = 0.01
APPROXIMATE = ["quantize:mode=int8-dynamic"]


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def minilm():
    from ptool.default_model import encode, load_embedder, reference_sentences
    from ptool.frontends.huggingface import sample_sentences

    model = load_embedder()
    ids, mask = encode(sample_sentences()[:9], 128)
    held = [(ids[i:i + 1], mask[i:i + 1]) for i in range(1, 9)]
    cids, cmask = encode(reference_sentences()[:8], 128)
    calib = [(cids[i:i + 1], cmask[i:i + 1]) for i in range(len(cids))]
    return "all-MiniLM-L6-v2 (seq 128, batch 1)", model, (ids[:1], mask[:1]), held, calib


def vit():
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12,
                                    num_attention_heads=6, intermediate_size=1536, num_labels=1000)
    model = transformers.ViTForImageClassification(config).eval()
    images = [torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(s)) for s in range(9)]
    return ("ViT-S/16 config, random weights (224 px, batch 1)", model, (images[0],),
            [(x,) for x in images[1:5]], [(x,) for x in images[5:]])


def baselines(model, call, backends):
    """torch eager, torch.compile, ORT defaults, untuned TVM: name -> callable."""
    out = {"torch eager": model}
    specs = [("torch.compile", "torch", {"compile": True}), ("onnxruntime defaults", "onnxruntime", {})]
    if "tvm" in backends:
        specs.append(("tvm untuned", "tvm", {}))
    for name, backend, options in specs:
        log(f"baseline {name}")
        out[name] = ptool.compile(model, backend=backend, example_inputs=call, **options)
    return out


def run_model(build, backends, repeat, folder):
    label, model, call, held, calib = build()
    log(f"{label}: autotune")
    kw = dict(max_error=MAX_ERROR, backends=backends, passes=APPROXIMATE, held_out_inputs=held,
              calibration=calib, record_dir=folder, repeat=repeat, progress=True)
    t0 = time.perf_counter()
    best = ptool.autotune(model, call, force=True, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = ptool.autotune(model, call, **kw)
    second = time.perf_counter() - t0
    assert again.reused, "the second run did not reuse the record"
    log(f"first {first:.1f}s, second {second:.2f}s; winner {best.config}")
    fns = {"autotuned winner": best.compiled, **baselines(model, call, backends)}
    per_call = {k: measure(f, call, warmup=1, repeat=1).median_ms / 1e3 for k, f in fns.items()}
    counts = plan_repeats(per_call, repeat=repeat, max_seconds=20)
    timings = measure_interleaved(fns, call, warmup=2, repeat=counts, settle=1)
    fastest_baseline = min((t.median_ms, k) for k, t in timings.items() if k != "autotuned winner")
    return {
        "model": label, "winner": str(best.config), "winner_error": best.winner.error,
        "first_s": first, "second_s": second, "table": str(best),
        "timings": {k: {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "runs": t.runs}
                    for k, t in timings.items()},
        "fastest_baseline": fastest_baseline[1],
        "winner_vs_fastest_baseline": fastest_baseline[0] / timings["autotuned winner"].median_ms,
    }


def markdown(results: list[dict]) -> str:
    lines = ["## Autotune", "",
             "`tools/bench_autotune.py`: `ptool.autotune(max_error=0.01)` (1 - cosine vs fp32 eager on held-out "
             "inputs), then the winner and the baselines timed side by side in the same process (median ms, "
             "round-robin, each timed call after one untimed call of the same candidate). Machine: 2 shared cores, so figures are noisy; ratios are within one run.", ""]
    for r in results:
        lines += [f"### {r['model']}", "",
                  f"- winner: {r['winner']} (error {r['winner_error']:.1e}); "
                  f"{r['winner_vs_fastest_baseline']:.2f}x the fastest baseline ({r['fastest_baseline']})",
                  f"- first autotune {r['first_s']:.1f} s, second (record reused) {r['second_s']:.2f} s "
                  f"({100 * r['second_s'] / r['first_s']:.1f}%)", "",
                  "| candidate | median ms | p10-p90 ms | runs |", "|---|---|---|---|"]
        for k, t in r["timings"].items():
            lines.append(f"| {k} | {t['median_ms']:.2f} | {t['p10_ms']:.2f}-{t['p90_ms']:.2f} | {t['runs']} |")
        lines += ["", "<details><summary>autotune table</summary>", "", "```", r["table"], "```", "</details>", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="minilm,vit")
    p.add_argument("--no-tvm", action="store_true", help="leave TVM out (its untuned build takes minutes)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    backends = ["torch", "onnxruntime"] + ([] if a.no_tvm else ["tvm"])
    builders = {"minilm": minilm, "vit": vit}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            results.append(run_model(builders[name], backends, a.repeat, pathlib.Path(tmp) / name))
    text = markdown(results)
    print(text)
    if not a.no_write:
        write_section("autotune", text, results)


if __name__ == "__main__":
    main()
