"""Autotune a model: the fastest passes x backend x options whose error stays within --max-error.

Candidates: the exact default pipeline on every backend variant (ONNX Runtime threads and
optimization levels, torch eager and torch.compile, TVM), then each approximate pass (--passes, or
the ones the passes declare) on the best variant of each backend, left out with the reason when its
error on held-out inputs passes --max-error. The table, the winner, the device fingerprint and a
latency-vs-fidelity plot are saved in -o; the same command on the same model, device and library
versions reuses that record instead of measuring again (--force measures anew). Ctrl-C saves what
was measured and exits 130.

--ray ADDRESS runs the candidates as tasks on a Ray cluster (ptool[cluster]); only nodes started
with this device's fingerprint resource time them, and the table names the node of each row.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ptool.cli._model import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--device", default="cpu", help="device to tune for: cpu (default) or cuda")
    p.add_argument("--max-error", type=float, default=0.01, metavar="E",
                   help="largest error vs the original model, as 1 - cosine on held-out inputs (default 0.01)")
    p.add_argument("--metric", choices=("cosine", "max_rel_error"), default="cosine",
                   help="what --max-error bounds: 1 - cosine (default) or max |out-ref| / max |ref|")
    p.add_argument("-o", "--output", default="tuned", metavar="DIR",
                   help="folder for the record, table and plot; a record there is reused (default ./tuned)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting new candidates after this many seconds")
    p.add_argument("--backend", "--backends", dest="backends", action="append", metavar="LIST",
                   help="comma-separated backends: torch, onnxruntime, tvm (default: every installed one)")
    p.add_argument("-p", "--passes", "--pass", dest="passes", action="append", metavar="PASSES",
                   help="approximate passes to try, comma-separated or repeated ('none' for exact only; "
                        "default: the candidates the registered passes declare)")
    p.add_argument("--tvm-trials", type=int, default=0, metavar="N",
                   help="also try TVM tuned with MetaSchedule for N trials (default 0: untuned TVM only)")
    p.add_argument("--tvm-tracker", metavar="HOST:PORT", default=None,
                   help="measure the --tvm-trials on the RPC servers of this TVM tracker (with --tvm-key)")
    p.add_argument("--tvm-key", metavar="KEY", default=None, help="the key the tracker's RPC servers registered with")
    p.add_argument("--repeat", type=int, default=20, metavar="N", help="timed calls per candidate (default 20)")
    p.add_argument("--force", action="store_true", help="measure again even if a matching record exists")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run the candidates on a Ray cluster: auto, HOST:PORT (the head) or ray://HOST:PORT; "
                        "timed only on nodes advertising this device's fingerprint (needs ptool[cluster])")


def _held_out(args: argparse.Namespace, src) -> tuple[list, list | None]:
    """(held-out calls, calibration items): disjoint, never the same batches."""
    if args.model in (None, ""):
        from ptool.default_model import default_model

        d = default_model()
        return [tuple(b) for b in d.heldout_batches[:4]], [tuple(b) for b in d.calibration_batches[1:]] or None
    extra = src.calibration_items() or []
    half = len(extra) // 2
    return extra[half:], extra[:half] or None


def run(args: argparse.Namespace, ui) -> int:
    import ptool  # noqa: F401
    from ptool.cli._compare import parse_backends
    from ptool.cli._model import resolve_from_args, split_specs
    from ptool.errors import UsageError
    from ptool.tune.tuner import TuningInterrupted, autotune

    if not args.max_error >= 0:
        raise UsageError(f"--max-error must be a number >= 0, got {args.max_error}")
    if args.budget is not None and not args.budget > 0:
        raise UsageError(f"--budget must be > 0 seconds, got {args.budget}")
    if args.repeat < 1:
        raise UsageError(f"--repeat must be at least 1, got {args.repeat}")
    if args.tvm_trials < 0:
        raise UsageError(f"--tvm-trials must be >= 0, got {args.tvm_trials}")
    if args.ray is not None:
        from ptool.tune.cluster import check_address

        check_address(args.ray)  # Ray missing or a bad address fails before the model loads
    backends = parse_backends(args.backends, ("torch", "onnxruntime", "tvm")) if args.backends else None
    specs = split_specs(args.passes)
    passes = None if not args.passes else [s for s in specs if s != "none"]
    if passes is not None:
        from ptool.tune.space import split_passes

        split_passes(passes)  # bad pass names fail before the model loads

    with ui.status("loading model"):
        src = resolve_from_args(args, ui)
    held, calibration = _held_out(args, src)
    ui.out(f"model: {src.label}")
    ui.out(f"inputs: {src.input_summary()}")

    with _bar(ui) as update:
        try:
            result = autotune(src.obj, src.args, example_kwargs=src.kwargs or None, device=args.device,
                              max_error=args.max_error, error_metric=args.metric, budget_s=args.budget,
                              backends=backends, passes=passes, held_out_inputs=held or None,
                              calibration=calibration, record_dir=args.output, force=args.force,
                              tvm_trials=args.tvm_trials, repeat=args.repeat, progress=update,
                              cluster=args.ray, tvm_tracker=args.tvm_tracker, tvm_key=args.tvm_key)
        except TuningInterrupted as e:
            ui.out(str(e.result))
            ui.err(f"ptool: interrupted; what was measured is saved in {args.output}/ (rerun to finish)")
            return 130
    ui.out(str(result))
    ui.out("")
    folder = Path(args.output)
    ui.out(f"record: {folder / 'tuning_record.json'}, plot: {folder / 'latency_vs_fidelity.png'} "
           f"({result.seconds:.1f}s{', reused' if result.reused else ''})")
    return 0


def _bar(ui):
    """A progress bar with an ETA on a terminal; a no-op callback otherwise."""
    import contextlib

    if not ui.live:
        return contextlib.nullcontext(lambda done, total, label: None)

    @contextlib.contextmanager
    def bar():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("ETA"), TimeRemainingColumn(), console=ui._rich(), transient=True) as p:
            task = p.add_task("tuning", total=1)
            yield lambda done, total, label: p.update(task, completed=done, total=total, description=label[:60])

    return bar()
