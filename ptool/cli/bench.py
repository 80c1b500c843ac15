"""Measure a model on several backends side by side: latency, speedup, memory, fidelity.

The baseline is the original model in eager torch. Every backend runs the transformed model
(default pipeline unless --passes says otherwise). Candidates are timed round-robin so machine
noise hits all alike; each gets --repeat timed calls, fewer if that would exceed --max-seconds
(an untuned TVM build is tens of times slower than torch). Errors and cosine are measured against
the baseline's outputs on the example call plus up to 4 more batches when the model provides them.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ptool.cli._model import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--backend", "--backends", dest="backends", action="append", metavar="LIST",
                   help="comma-separated backends: torch, onnxruntime, tvm (default: all three)")
    p.add_argument("-p", "--passes", "--pass", dest="passes", action="append", metavar="PASSES",
                   help="passes to apply first, comma-separated or repeated ('none' for no pass; "
                        "default: dce,cse,constant-fold,fold-bn)")
    p.add_argument("--device", default="cpu",
                   help="where every row runs: cpu (default), cuda or cuda:N (the baseline is the model moved there)")
    p.add_argument("--repeat", type=int, default=20, metavar="N", help="timed calls per backend (default 20)")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed calls per backend first (default 3)")
    p.add_argument("--max-seconds", type=float, default=30.0, metavar="S",
                   help="cap a backend's timed calls at about S seconds (at least 3 calls; default 30)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    g = p.add_argument_group("generation (causal decoders)")
    g.add_argument("--generate", action="store_true",
                   help="measure greedy generation of a Llama-family causal decoder instead: pre-fill time, decode "
                        "tokens/s and memory per backend and weight precision, beside the model in eager torch")
    g.add_argument("--context", default="128,512", metavar="LIST",
                   help="prompt lengths in tokens, multiples of --chunk (default 128,512)")
    g.add_argument("--new-tokens", type=int, default=16, metavar="N", help="tokens generated per prompt (default 16)")
    g.add_argument("--chunk", type=int, default=128, metavar="N", help="pre-fill chunk: the static pre-fill graph's "
                   "length (default 128)")
    g.add_argument("--precision", default="fp32,int4", metavar="LIST",
                   help="weight variants: fp32, bf16, int8, int4 (default fp32,int4)")
    g.add_argument("--kv-cache", default="float32", metavar="LIST",
                   help="KV cache dtypes: float32, int8 (int8 per token and head, float32 scale beside it)")


def check_counts(repeat: int, warmup: int, max_seconds: float | None) -> None:
    from ptool.errors import UsageError

    if repeat < 1:
        raise UsageError(f"--repeat must be at least 1, got {repeat}")
    if warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {warmup}")
    if max_seconds is not None and not max_seconds > 0:
        raise UsageError(f"--max-seconds must be > 0, got {max_seconds}")


def run(args: argparse.Namespace, ui) -> int:
    import ptool
    from ptool.backends.device import check_available, parse_device
    from ptool.benchmark import BASELINE, Candidate, compare_candidates
    from ptool.cli._compare import build_candidates, format_rows, notes, parse_backends
    from ptool.cli._model import resolve_from_args
    from ptool.cli.convert import pipeline_specs
    from ptool.errors import UsageError
    from ptool.passes.registry import parse_pipeline

    check_counts(args.repeat, args.warmup, args.max_seconds)
    device = parse_device(args.device)
    check_available(device)
    if args.generate:
        if device.is_cuda:
            raise UsageError("--generate measures on the CPU; drop --device")
        return run_generate(args, ui)
    backends = parse_backends(args.backends, ("torch", "onnxruntime", "tvm"))
    specs = pipeline_specs(args.passes)
    parse_pipeline(specs)

    with ui.status("loading model"):
        src = resolve_from_args(args, ui)
    if src.is_onnx and not args.backends:
        backends = ["onnxruntime"]
    if src.is_onnx and set(backends) - {"onnxruntime"}:
        raise UsageError("an ONNX model is benchmarked on onnxruntime only (use --backend onnxruntime)")
    with ui.status(f"transforming ({', '.join(specs) or 'no passes'})"):
        m2 = ptool.transform(src.obj, specs, example_inputs=src.args or None, example_kwargs=src.kwargs or None,
                             calibration=src.calibration_items())
    call_args, call_kwargs = src.args, src.kwargs
    if src.is_onnx and device.is_cuda:
        candidates = [Candidate(name, _on_device(model, call_args, call_kwargs, device))
                      for name, model in (("onnxruntime (original ONNX)", src.eager()), ("onnxruntime (transformed)", m2))]
    elif src.is_onnx:
        candidates = [Candidate("onnxruntime (original ONNX)", src.eager()),
                      Candidate("onnxruntime (transformed)", m2)]
    else:
        candidates = build_candidates(src.eager(), m2, backends, call_args, call_kwargs, ui,
                                      transformed=bool(specs), device=str(device))
    with ui.progress("timing (interleaved)", args.repeat) as update:
        rows = compare_candidates(candidates, call_args, call_kwargs, check_inputs=src.calibration[:4],
                                  warmup=args.warmup, repeat=args.repeat, max_seconds=args.max_seconds,
                                  on_round=update)

    ui.out(f"model: {src.label}")
    ui.out(f"inputs: {src.input_summary()}; device: {device}")
    ui.out(f"pipeline: {' '.join(specs) or '(none)'}; fidelity checked on {1 + len(src.calibration[:4])} input(s)")
    ui.out("")
    ui.out(format_rows(rows, speedup_header="speedup vs original" if src.is_onnx else "speedup vs eager"))
    ui.out("")
    ui.out(f"speedup = median of {rows[0].name if src.is_onnx else BASELINE} / median of the row; errors and "
           "cosine vs its outputs; mem = process RSS growth while building the backend")
    for line in notes(rows):
        ui.out(f"note: {line}")
    if args.json:
        write_json(args.json, src, specs, rows)
    return 0


def _on_device(model, args: tuple, kwargs: dict, device):
    """An ONNX model on ONNX Runtime for ``device`` (its GPU provider), timed up to the GPU's synchronization."""
    import ptool
    from ptool.benchmark import gpu_synchronized

    return gpu_synchronized(ptool.compile(model, backend="onnxruntime", example_inputs=args, example_kwargs=kwargs,
                                       device=str(device)))


def write_json(path: str, src, specs: list[str], rows: list) -> None:
    import json
    from pathlib import Path

    from ptool.errors import UsageError

    payload = {"model": src.label, "inputs": src.input_summary(), "passes": specs,
               "rows": [r.to_dict() for r in rows]}
    try:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"cannot write --json file '{path}': {e.strerror or e}") from None


def _int_list(flag: str, text: str) -> list[int]:
    from ptool.errors import UsageError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated whole numbers, got '{text}'") from None


def run_generate(args: argparse.Namespace, ui) -> int:
    """``ptool bench --generate``: :func:`ptool.generation.benchmark_generation` on the model."""
    import torch

    from ptool.cli._compare import parse_backends
    from ptool.cli._model import resolve_from_args
    from ptool.errors import UsageError
    from ptool.frontends.decoder import decoder_parts
    from ptool.generation import benchmark_generation, check_generation_args, format_table

    if args.passes:
        raise UsageError("--generate measures the weight variants of --precision; --passes does not apply to it")
    contexts = _int_list("--context", args.context)
    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    kv_dtypes = [x.strip() for x in args.kv_cache.split(",") if x.strip()]
    backends = parse_backends(args.backends, ("torch", "onnxruntime", "tvm"))
    check_generation_args(contexts, args.new_tokens, args.chunk, precisions, backends, kv_dtypes)
    with ui.status("loading model"):
        src = resolve_from_args(args, ui)
    if src.is_onnx:
        raise UsageError("--generate needs the torch model of a causal decoder (a Hugging Face folder or "
                         "module:function), not an ONNX file")
    model = src.obj
    decoder_parts(model)
    model.eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, max(contexts)), generator=torch.Generator().manual_seed(0))
    with ui.status("generating on every backend (builds can take minutes)"):
        rows = benchmark_generation(model, prompt, contexts=contexts, new_tokens=args.new_tokens, chunk=args.chunk,
                                    backends=backends, precisions=precisions, kv_dtypes=kv_dtypes)
    ui.out(f"model: {src.label} ({type(model).__name__}); prompt: random token ids, batch 1")
    ui.out("")
    ui.out(format_table(rows, contexts, args.new_tokens))
    ui.out("")
    ui.out(f"static KV cache of {max(contexts) + args.new_tokens} slots, pre-fill in chunks of {args.chunk}; "
           "tok/s = 1000 / median decode step; same tokens = greedy tokens equal to eager torch's, in order; "
           "RSS delta = process growth while the row was built and run")
    if args.json:
        import json
        from pathlib import Path

        payload = {"model": src.label, "contexts": contexts, "new_tokens": args.new_tokens,
                   "rows": [r.to_dict() for r in rows]}
        try:
            Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        except OSError as e:
            raise UsageError(f"cannot write --json file '{args.json}': {e.strerror or e}") from None
    return 0
