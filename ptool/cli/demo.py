"""Convert the default model (all-MiniLM-L6-v2 on real sentences) and compare backends.

Runs the default exact pipeline, exports the result to out/minilm.onnx, then times torch eager,
ONNX Runtime (on that file) and TVM side by side and prints one table plus the transform report.
TVM runs untuned here (ptool's default CPU schedules, no MetaSchedule search).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="out/minilm.onnx", metavar="OUT.onnx",
                   help="where to write the converted model (default out/minilm.onnx)")
    p.add_argument("--backend", "--backends", dest="backends", action="append", metavar="LIST",
                   help="comma-separated backends (default: torch,onnxruntime,tvm)")
    p.add_argument("--repeat", type=int, default=20, metavar="N", help="timed calls per backend (default 20)")
    p.add_argument("--max-seconds", type=float, default=10.0, metavar="S",
                   help="cap a backend's timed calls at about S seconds (at least 3; default 10, "
                        "which keeps untuned TVM to a handful of runs)")


def run(args: argparse.Namespace, ui) -> int:
    from pathlib import Path

    import ptool
    from ptool.benchmark import BASELINE, compare_candidates
    from ptool.cli._compare import build_candidates, format_rows, notes, parse_backends
    from ptool.cli._model import resolve_model
    from ptool.cli.bench import check_counts
    from ptool.cli.convert import check_output
    from ptool.passes.pipelines import DEFAULT_PIPELINE

    check_counts(args.repeat, 3, args.max_seconds)
    backends = parse_backends(args.backends, ("torch", "onnxruntime", "tvm"))
    skipped = [] if "tvm" in backends or args.backends else [
        "tvm skipped: apache-tvm is not installed (pip install 'ptool[tvm]')"]
    output = check_output(Path(args.output))

    with ui.status("loading all-MiniLM-L6-v2 and tokenizing the sample sentences"):
        src = resolve_model(None)
    with ui.status(f"transforming ({', '.join(DEFAULT_PIPELINE)}) and verifying each pass"):
        m2 = ptool.transform(src.obj, list(DEFAULT_PIPELINE), example_inputs=src.args,
                             calibration=src.calibration_items())
    if "onnxruntime" not in backends:
        with ui.status(f"exporting ONNX to {output}"):
            ptool.export_onnx(m2, output)
    # The onnxruntime candidate exports to `output` itself (atomically) and runs that file, so the
    # file on disk is exactly what was timed.
    candidates = build_candidates(src.eager(), m2, backends, src.args, src.kwargs, ui, transformed=True,
                                  onnx_path=str(output))
    with ui.progress("timing torch / onnxruntime / tvm (interleaved)", args.repeat) as update:
        rows = compare_candidates(candidates, src.args, src.kwargs, check_inputs=src.calibration[:4],
                                  repeat=args.repeat, max_seconds=args.max_seconds, on_round=update)

    ui.out(f"model: {src.label}")
    ui.out(f"inputs: {src.input_summary()}")
    ui.out(f"wrote: {output}")
    ui.out("")
    ui.out(str(m2.report))
    ui.out("")
    ui.out(format_rows(rows))
    ui.out("")
    ui.out(f"speedup = median latency of {BASELINE} / the row's median; max abs err and cosine vs {BASELINE} "
           f"on {1 + len(src.calibration[:4])} real-text inputs (outputs are unit-norm 384-d embeddings)")
    for line in [*notes(rows), *skipped]:
        ui.out(f"note: {line}")
    return 0
