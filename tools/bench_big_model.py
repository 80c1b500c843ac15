"""Big models: a ~0.6 B-parameter Llama-style decoder (2.5 GB of fp32 weights) through ptool.

Writes the "Big models" section of ``BENCHMARKS.md`` (key ``big_model``).

Protocol: the decoder is built from a config (random weights, seed 0; hidden 1024, 28 layers,
16 heads / 8 kv-heads, MLP 3072, vocabulary 128256, untied head — 615 M parameters) and saved
once as a Hugging Face folder (safetensors). Each path then runs in its own fresh process, whose
peak resident memory is the kernel's ``ru_maxrss`` for the whole process (so it covers loading,
``transform`` with the default exact pipeline and ``export_onnx``, and is never missed between
samples):

- ``python (copy)``: the model built in memory, ``ptool.transform(model)`` (which deep-copies the
  user's module by default, so the user's object is untouched) then ``ptool.export_onnx``;
- ``python (copy_model=False)``: the same, sharing the weights with the user's module;
- ``ptool convert FOLDER -o OUT.onnx``: the command line on the saved folder;
- ``ptool convert OUT.onnx -o AGAIN.onnx``: the command line on that ONNX file (ONNX in, ONNX out).

The weights exceed protobuf's 2 GiB, so the ONNX file keeps its weights in ``OUT.onnx.data``
beside it (relative path). ONNX Runtime then loads that file and runs it; its logits are compared
with the torch model's on the same tokens.

    .venv/bin/python tools/bench_big_model.py [--layers 28] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEQ = 32
VOCAB = 128256


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def build_model(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=VOCAB, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tokens(batch: int = 1, seq: int = SEQ):
    import torch

    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # Linux reports KiB


def worker(mode: str, layers: int, out: pathlib.Path) -> dict:
    """One step in this (fresh) process; returns its figures.

    Every heavy step runs in a child process of a parent that never holds the model: Linux keeps
    ``ru_maxrss`` across ``fork`` + ``execve``, so a child forked from a big parent would report
    the parent's size.
    """
    if mode == "save":
        model = build_model(layers)
        model.save_pretrained(out)  # safetensors
        return {"parameters": sum(p.numel() for p in model.parameters()), "weight_bytes": weight_bytes(model)}
    if mode == "ort":
        return check_with_ort(out, layers)
    import ptool

    start = time.perf_counter()
    model = build_model(layers)
    built = time.perf_counter()
    from ptool.passes.pipelines import DEFAULT_PIPELINE

    m2 = ptool.transform(model, list(DEFAULT_PIPELINE), example_inputs=(tokens(),), copy_model=(mode == "python-copy"))
    transformed = time.perf_counter()
    ptool.export_onnx(m2, out)
    exported = time.perf_counter()
    return {"weight_bytes": weight_bytes(model), "peak_rss": peak_rss_bytes(), "build_s": built - start,
            "transform_s": transformed - built, "export_s": exported - transformed}


def run_worker(mode: str, layers: int, out: pathlib.Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--layers", str(layers), "--out", str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(folder: pathlib.Path, out: pathlib.Path) -> dict:
    """``ptool convert`` in a child process; its peak RSS from ``wait4``'s rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/ptool"), "convert", str(folder), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ptool convert failed:\n{stderr[-3000:]}")
    return {"peak_rss": usage.ru_maxrss * 1024, "total_s": time.perf_counter() - start, "stdout": stdout}


def check_with_ort(onnx_path: pathlib.Path, layers: int) -> dict:
    """Load the exported file in ONNX Runtime, run it, compare logits with torch."""
    import numpy as np
    import onnxruntime as ort
    import torch

    start = time.perf_counter()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    loaded = time.perf_counter()
    ids = tokens(*session.get_inputs()[0].shape)  # the CLI's folder loader examples at its own length
    feeds = {session.get_inputs()[0].name: ids.numpy()}
    if len(session.get_inputs()) > 1:  # an attention mask
        feeds[session.get_inputs()[1].name] = np.ones(ids.shape, dtype=np.int64)
    got = session.run(None, feeds)[0]
    ran = time.perf_counter()
    model = build_model(layers)
    with torch.no_grad():
        want = model(ids).logits.numpy()
    err = float(np.abs(got - want).max() / np.abs(want).max())
    return {"ort_load_s": loaded - start, "ort_run_s": ran - loaded, "max_rel_error": err}


def files_of(path: pathlib.Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.parent.iterdir()) if not p.name.startswith(".")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--worker", choices=("save", "python-copy", "python-shared", "ort"))
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.layers, args.out)))
        return

    work = pathlib.Path(tempfile.mkdtemp(prefix="ptool-big-"))
    try:
        results = bench(args.layers, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.layers == 28:
        from _sections import write_section

        print(write_section("big_model", render(results), results))
    else:
        print(json.dumps(results, indent=2))


def bench(layers: int, work: pathlib.Path) -> dict:
    from importlib.metadata import version

    folder = work / "llama-0.6b"
    log(f"building the {layers}-layer decoder and saving it as a Hugging Face folder in {folder}")
    results = {"layers": layers, **run_worker("save", layers, folder), "torch": version("torch"), "runs": {}}
    nbytes = results["weight_bytes"]

    def finish(mode: str, figures: dict, out: pathlib.Path) -> None:
        figures["files"] = files_of(out)
        figures.update(run_worker("ort", layers, out))
        results["runs"][mode] = figures
        log(f"  peak {figures['peak_rss'] / 2**30:.2f} GiB = {figures['peak_rss'] / nbytes:.2f}x weights; "
            f"ORT max rel error {figures['max_rel_error']:.2e}")

    for mode in ("python-copy", "python-shared"):
        out = work / mode / "model.onnx"
        log(f"{mode}: transform + export_onnx in a fresh process")
        finish(mode, run_worker(mode, layers, out), out)
        shutil.rmtree(out.parent)

    out = work / "cli" / "model.onnx"
    log("ptool convert FOLDER -o model.onnx")
    finish("cli", run_cli(folder, out), out)

    again = work / "cli-onnx" / "model.onnx"
    log("ptool convert model.onnx -o again.onnx (ONNX in, ONNX out)")
    finish("cli-onnx", run_cli(out, again), again)
    return results


def render(results: dict) -> str:
    nbytes = results["weight_bytes"]
    gib = 2**30
    lines = [
        "## Big models: a 0.6 B-parameter decoder through transform + export_onnx",
        "",
        f"Llama-style decoder built from a config (`tools/bench_big_model.py`): {results['layers']} layers, hidden "
        f"1024, GQA 16/8 heads, vocabulary 128256, untied head — **{results['parameters'] / 1e6:.0f} M parameters, "
        f"{nbytes / gib:.2f} GiB of fp32 weights**. Each path runs in a fresh process; peak memory is the kernel's "
        "`ru_maxrss` of that whole process (model creation or loading included). Default pipeline "
        "(dce, cse, constant-fold, fold-bn). Target: peak ≤ 2.5× the weight bytes.",
        "",
        "| path | peak RSS | × weight bytes | transform | export | ONNX files | ORT load / run | ORT vs torch (max rel) |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    labels = {"python-copy": "`ptool.transform(model)` (copies the user's module) + `export_onnx`",
              "python-shared": "`ptool.transform(model, copy_model=False)` + `export_onnx`",
              "cli": "`ptool convert FOLDER -o model.onnx` (safetensors folder)",
              "cli-onnx": "`ptool convert model.onnx -o again.onnx` (the file above: ONNX in, ONNX out)"}
    for mode, r in results["runs"].items():
        files = ", ".join(f"{name} {size / 1e6:,.1f} MB" for name, size in r["files"].items())
        transform = f"{r['transform_s']:.0f} s" if "transform_s" in r else f"{r['total_s']:.0f} s in all"
        export = f"{r['export_s']:.0f} s" if "export_s" in r else "–"
        lines.append(f"| {labels[mode]} | {r['peak_rss'] / gib:.2f} GiB | **{r['peak_rss'] / nbytes:.2f}×** | "
                     f"{transform} | {export} | {files} | {r['ort_load_s']:.1f} s / {r['ort_run_s']:.2f} s | "
                     f"{r['max_rel_error']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
