"""TVM without tuning: torch eager vs TVM's default Relax pipeline vs TVM with ptool's schedules.

Writes the "TVM without tuning" section of ``BENCHMARKS.md`` (key ``tvm_untuned``).

Protocol: batch 1, seq 128. MiniLM = ``BertModel`` with the real all-MiniLM-L6-v2 weights on one
real tokenized sentence (padded); BERT-base = ``BertModel(BertConfig())`` with seeded random
weights, eval mode, random token ids, full mask. All candidates are timed round-robin in one
process (``ptool.benchmark.measure_interleaved``); the default-pipeline builds are so slow that
they get only a few calls, spread over the rounds. torch runs with its default threads; TVM with
all cores. Fidelity: max abs error and cosine of ``last_hidden_state`` vs torch eager. The
per-kernel table splits TVM+schedules' time by PrimFunc (VM instrument, median over calls).

    .venv/bin/python tools/bench_tvm.py [--models minilm bert-base] [--repeat 20] [--no-default]
                                        [--omp-wait-policy passive]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ = 128
KEY = "tvm_untuned"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def minilm():
    from ptool.default_model import encode, minilm_folder
    from ptool.frontends.huggingface import load_hf_model, sample_sentences

    model = load_hf_model(minilm_folder()).eval()
    ids, mask = encode(sample_sentences()[:1], SEQ)
    return model, (ids, mask)


def bert_base():
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig()).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (1, SEQ), generator=gen)
    return model, (ids, torch.ones(1, SEQ, dtype=torch.int64))


MODELS = {"minilm": ("all-MiniLM-L6-v2 (real weights; 6 layers, hidden 384)", minilm),
          "bert-base": ("BERT-base (BertConfig() defaults, random weights; 12 layers, hidden 768)", bert_base)}


def hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def kernel_profile(compiled, args, calls: int = 3) -> list[tuple[str, float]]:
    """(PrimFunc or VM builtin, ms per model call), slowest first, from the Relax VM's instrument."""
    import tvm

    from ptool.backends.tvm_tuning import profile_kernels

    vm = compiled._keepalive[1]  # the Relax VM the backend built (a tool may peek)
    times = profile_kernels(vm, [tvm.runtime.tensor(a.numpy()) for a in args], calls)
    return sorted(times.items(), key=lambda kv: -kv[1])


def bench_model(key: str, repeat: int, with_default: bool) -> dict:
    import torch

    from ptool.backends import compile_module
    from ptool.benchmark import measure_interleaved
    from ptool.verify import compare

    title, make = MODELS[key]
    model, args = make()
    with torch.no_grad():
        ref = model(*args)
    builds = {}
    variants = {"TVM + ptool schedules": {}}
    if with_default:
        variants["TVM default pipeline"] = {"schedules": False, "fast_math": False}
    for name, options in variants.items():
        t0 = time.perf_counter()
        builds[name] = compile_module(model, "tvm", args, **options)
        log(f"{key}: built {name} in {time.perf_counter() - t0:.1f} s")
    candidates = {"torch eager": model, **builds}
    fidelity = {}
    for name, fn in builds.items():
        with torch.no_grad():
            c = compare(hidden(ref), hidden(fn(*args)))
        fidelity[name] = (c.max_abs_error, c.cosine)
    # the default pipeline takes seconds per call: a few calls, spread over the rounds
    repeats = {name: (3 if "default" in name else repeat) for name in candidates}
    warmups = {name: (1 if "default" in name else 3) for name in candidates}
    with torch.no_grad():
        timings = measure_interleaved(candidates, args, warmup=warmups, repeat=repeats, settle=1)
    kernels = kernel_profile(builds["TVM + ptool schedules"], args)
    return {"title": title, "timings": timings, "fidelity": fidelity, "kernels": kernels}


def markdown(results: dict, load: tuple) -> str:
    lines = ["## TVM without tuning (`tools/bench_tvm.py`)", "",
             "Batch 1, seq 128; torch eager with its default threads "
             f"(OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}), TVM 0.27 (pip, no BLAS) on all "
             "cores (one thread per core), built for the host CPU. Candidates timed round-robin in one run, "
             "each timed call after one untimed call of the same candidate (the other runtime's spinning "
             "threads go idle first); ratio = TVM median / "
             f"torch median (lower is better). Load average at start/end: {load[0]:.2f} / {load[1]:.2f} "
             "(2 cores; other work inflates every row, eager torch most).", "",
             "| model | candidate | median ms | p10 ms | p90 ms | runs | x torch eager | max abs err | cosine |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        base = r["timings"]["torch eager"]
        for name, t in r["timings"].items():
            err, cos = r["fidelity"].get(name, (0.0, 1.0))
            lines.append(f"| {key} | {name} | {t.median_ms:.2f} | {t.p10_ms:.2f} | {t.p90_ms:.2f} | {t.runs} | "
                         f"{t.median_ms / base.median_ms:.2f} | {err:.1e} | {cos:.6f} |")
    for key, r in results.items():
        total = sum(ms for _, ms in r["kernels"])
        lines += ["", f"Where TVM + ptool schedules spends its time on {key} (ms per call, VM instrument, "
                  f"total {total:.1f} ms):", "", "| kernel | ms | share |", "|---|---:|---:|"]
        for name, ms in r["kernels"][:10]:
            lines.append(f"| `{name}` | {ms:.2f} | {100 * ms / total:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["minilm", "bert-base"])
    p.add_argument("--repeat", type=int, default=20, help="timed calls of torch and scheduled TVM")
    p.add_argument("--no-default", action="store_true", help="skip TVM's default pipeline (minutes on BERT-base)")
    p.add_argument("--omp-wait-policy", choices=("default", "passive"), default="default",
                   help="OMP_WAIT_POLICY for torch (set before torch loads)")
    p.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    a = p.parse_args()
    if a.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy.upper()
    from _sections import write_section

    load0 = os.getloadavg()[0]
    results = {key: bench_model(key, a.repeat, not a.no_default) for key in a.models}
    md = markdown(results, (load0, os.getloadavg()[0]))
    data = {key: {"timings": {n: t.to_dict() for n, t in r["timings"].items()},
                  "fidelity": r["fidelity"], "kernels": r["kernels"][:20]} for key, r in results.items()}
    print(md if a.no_write else write_section(KEY, md, data))


if __name__ == "__main__":
    main()
