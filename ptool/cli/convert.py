"""Transform a model with passes, print the report, and export it to ONNX.

Without -p, the default exact pipeline runs (dce, cse, constant-fold, fold-bn); `-p none` runs no
pass. With --verify, the chosen backend runs the converted model and its outputs are compared
with the original torch model's; the output file appears only if everything succeeded.

Long steps (attention transfer, distillation, repbn's fine-tune, the learned rotation) checkpoint:
after Ctrl-C the command exits 130 and says where the state is; rerunning the same command
resumes there (see :mod:`ptool.checkpoint`; ``--no-checkpoint`` turns this off).

Under ``torchrun --nproc-per-node N -m ptool.cli convert ...`` the training passes run
data-parallel (:mod:`ptool.distributed`); rank 0 prints the report and writes the output, the
other ranks exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ptool.cli._model import add_model_arguments

    add_model_arguments(p)
    p.add_argument("-p", "--pass", dest="passes", action="append", metavar="PASS",
                   help="a pass, e.g. fold-bn or linear-attention:feature_map=elu (repeatable, or comma-separated; "
                        "'none' for no pass; default: dce,cse,constant-fold,fold-bn)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--backend", choices=("onnxruntime", "tvm"), default="onnxruntime",
                   help="the backend --verify runs (default: onnxruntime)")
    p.add_argument("--verify", action="store_true",
                   help="run the backend and compare with the original torch model (max error, cosine)")
    p.add_argument("--tolerance", type=float, default=1e-4, metavar="REL",
                   help="--verify fails if backend vs transformed torch differs by more than REL x output scale "
                        "(default 1e-4, the bar every backend meets in the test suite); a pipeline with approximate "
                        "passes is judged by their own declared bounds vs the original model instead")
    p.add_argument("--accept-lossy", action="store_true",
                   help="write the model even when an approximate pass missed its declared bound (default: exit 1, "
                        "nothing written)")
    p.add_argument("--dynamic", metavar="DIMS", default=None,
                   help="leave these input dims open in the ONNX file: batch, seq, or NAME:AXIS[=DIM], "
                        "comma-separated (default: every dim fixed to the example's size)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-fixpoint", dest="fixpoint", action="store_false",
                   help="run each pass once; by default the exact passes repeat, in order, until a round changes "
                        "nothing (one fold can expose another)")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="do not checkpoint long steps (attention transfer, distillation, fine-tune); by default "
                        "they save to $PTOOL_CHECKPOINT_DIR (~/.cache/ptool/checkpoints) and a rerun of a command "
                        "stopped with Ctrl-C resumes")


def pipeline_specs(values: list[str] | None) -> list[str]:
    """The -p values as pass specs: default pipeline when absent, empty for 'none'."""
    from ptool.cli._model import split_specs
    from ptool.passes.pipelines import DEFAULT_PIPELINE

    if not values:
        return list(DEFAULT_PIPELINE)
    specs = split_specs(values)
    if [s.lower() for s in specs] == ["none"]:
        return []
    return specs


def check_output(path: Path) -> Path:
    """Reject an output path that cannot work before any slow step runs."""
    from ptool.errors import UsageError

    if path.suffix.lower() != ".onnx":
        raise UsageError(f"output '{path}' must end in .onnx")
    if path.is_dir():
        raise UsageError(f"output '{path}' is a folder; give a file name ending in .onnx")
    existing = next((p for p in path.absolute().parents if p.exists()), None)
    if existing is not None and not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise UsageError(f"cannot write '{path}': '{existing}' is not a writable folder")
    return path


def run(args: argparse.Namespace, ui) -> int:
    import ptool
    from ptool import checkpoint
    from ptool.cli._dynamic import dynamic_call, parse_dynamic
    from ptool.cli._model import resolve_from_args
    from ptool.distributed import world
    from ptool.errors import UsageError
    from ptool.passes.registry import parse_pipeline
    from ptool.staging import move_into_place, staging_folder

    output = check_output(Path(args.output))
    specs = pipeline_specs(args.passes)
    parse_pipeline(specs)  # unknown pass / bad option: fail before loading anything
    if not args.tolerance > 0:
        raise UsageError(f"--tolerance must be > 0, got {args.tolerance}")

    dynamic = parse_dynamic(args.dynamic) if args.dynamic else None
    with ui.status("loading model"):
        src = resolve_from_args(args, ui)
    dynamic_shapes = None
    if dynamic and src.is_onnx:
        raise UsageError("--dynamic applies to torch models; an ONNX file keeps the dims it declares")
    if dynamic:
        src.args, src.kwargs, dynamic_shapes = dynamic_call(dynamic, src.input_names(), src.args, src.kwargs)
        src.calibration = [c for c in src.calibration if _fits(c, src)]
    if src.is_onnx and args.verify and args.backend == "tvm":
        raise UsageError("--backend tvm --verify needs a torch model; an ONNX input is verified with onnxruntime")
    try:
        with checkpoint.configured(_checkpoint_policy(args, ui)), \
                ui.status(f"transforming ({', '.join(specs) or 'no passes'})"):
            # the model as loaded (and checked); the result shares its weights instead of copying them,
            # unless --verify runs the original afterwards (training passes update shared weights)
            m2 = ptool.transform(src.loaded, specs, example_inputs=src.args or None,
                                 example_kwargs=src.kwargs or None, calibration=src.calibration_items(),
                                 copy_model=args.verify, dynamic_shapes=dynamic_shapes, fixpoint=args.fixpoint)
    except checkpoint.Interrupted as e:  # Ctrl-C in a long step, its state saved; nothing written yet
        if ui.debug:
            raise
        ui.err(f"ptool: interrupted: rerun the same command to resume (checkpoint in {e.path})")
        return 130

    here = world()
    if not here.writes:  # data-parallel under torchrun: rank 0 reports and writes the output
        return 0
    ui.out(f"model: {src.label}")
    ui.out(f"pipeline: {' '.join(specs) or '(none)'}")
    if here.parallel:
        ui.out(f"data-parallel: {here.describe()} (torchrun)")
    ui.out(str(m2.report))
    missed = [r for r in m2.report if not r.within_contract]
    if missed and not args.accept_lossy:
        from ptool.errors import VerificationError

        raise VerificationError(f"approximate pass '{missed[0].spec}' missed its declared bound {missed[0].numerics}: "
                                f"{missed[0].violation}; nothing written to {output} (--accept-lossy writes it anyway)")

    created_dir = _missing_parent(output)
    try:
        with staging_folder(output) as folder:
            staged = folder / output.name
            if args.verify:
                _verify(args, ui, src, m2, staged, dynamic_shapes)
            if not staged.exists():
                with ui.status(f"exporting ONNX to {output}"):
                    _export(src, m2, staged, args.opset, dynamic_shapes)
            move_into_place(folder, output)
    except BaseException:
        if created_dir is not None:
            shutil.rmtree(created_dir, ignore_errors=True)
        raise
    ui.out(f"wrote {output} ({_describe_onnx(output)})")
    return 0


def _checkpoint_policy(args: argparse.Namespace, ui):
    """Checkpoints as the environment says (off with --no-checkpoint); 'resumed' lines on our stderr."""
    from ptool import checkpoint
    from ptool.errors import UsageError

    if args.no_checkpoint:
        return checkpoint.Policy(None)
    try:
        rules = checkpoint.Policy.from_env()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return dataclasses.replace(rules, announce=lambda text: ui.err(f"ptool: {text}"))


def _missing_parent(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (removed again if we fail)."""
    missing = None
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing = parent
    return missing


def _export(src, m2, staged: Path, opset: int | None, dynamic_shapes: dict | None = None) -> None:
    import ptool

    if src.is_onnx:
        m2.save(staged)
    else:
        ptool.export_onnx(m2, staged, opset=opset, dynamic_shapes=dynamic_shapes)


def _fits(call: tuple, src) -> bool:
    """A calibration batch of the example's shapes (the example may have grown to size 2 on a dynamic axis)."""
    import torch

    args, kwargs = call
    same = [(a.shape == b.shape) for a, b in zip((*args, *kwargs.values()), (*src.args, *src.kwargs.values()))
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)]
    return all(same)


def _verify(args, ui, src, m2, staged: Path, dynamic_shapes: dict | None = None) -> None:
    """Run the backend on the converted model; compare with transformed and original torch.

    The ONNX file is staged at ``staged`` along the way (onnxruntime runs exactly that file).
    """
    import torch

    import ptool
    from ptool.errors import VerificationError
    from ptool.passes.registry import parse_pass
    from ptool.verify import Close, compare_many

    calls = [(src.args, src.kwargs), *src.calibration[:4]]
    if src.is_onnx:
        _export(src, m2, staged, args.opset)
        original = src.eager()
        with ui.status("running onnxruntime on the converted model"):
            backend_out = [m2(*a, **k) for a, k in calls]
            transformed_out = backend_out
            original_out = [original(*a, **k) for a, k in calls]
    else:
        options = {"onnx_path": str(staged), "opset": args.opset} if args.backend == "onnxruntime" else {}
        if dynamic_shapes is not None:
            options["dynamic_shapes"] = dynamic_shapes
        label = ("building the TVM module (can take minutes)" if args.backend == "tvm"
                 else "exporting and loading in onnxruntime")
        with ui.status(label):
            run = ptool.compile(m2, backend=args.backend, **options)
        with ui.status(f"running {args.backend}"), torch.no_grad():
            backend_out = [run(*a, **k) for a, k in calls]
            transformed_out = [m2(*a, **k) for a, k in calls]
            original = src.eager()
            original_out = [original(*a, **k) for a, k in calls]
    vs_transformed = compare_many(transformed_out, backend_out)
    vs_original = compare_many(original_out, backend_out)
    approximate = [parse_pass(r.spec) for r in m2.report if not r.exact]
    tolerance = "" if approximate else f" (tolerance {args.tolerance:g} x output scale)"
    ui.out(f"verify: {args.backend} on {len(calls)} input(s): vs original model max abs err "
           f"{vs_original.max_abs_error:.2e}, cosine {vs_original.cosine:.6f}; vs transformed torch max abs err "
           f"{vs_transformed.max_abs_error:.2e}{tolerance}")
    if approximate:
        # the backend's own integer / reduced-precision kernels round at other points than torch's (one
        # activation step apart at a quantization boundary): the file keeps the passes' own contracts
        # vs the original model instead of matching the transformed torch model bit for bit
        verdicts = [(p.spec(), p.numerics.violation(vs_original)) for p in approximate]
        problems = [f"{spec}: {problem}" for spec, problem in verdicts if problem]
        ui.out(f"verify: {args.backend} judged by the approximate passes' own bounds vs the original model ("
               + ", ".join(f"{p.spec()}: {p.numerics}" for p in approximate) + ")")
        if problems:
            raise VerificationError(f"{args.backend} breaks the declared bound of {problems[0]}; nothing written to "
                                    f"{args.output}")
        return
    problem = Close(atol=0.0, rtol=args.tolerance).violation(vs_transformed)
    if problem:
        raise VerificationError(f"{args.backend} does not reproduce the transformed model: {problem}; "
                                f"nothing written to {args.output}")


def _describe_onnx(path: Path) -> str:
    """``86.3 MiB, 412 nodes, opset 18`` (best effort: the file is already checked)."""
    from ptool.cli._ui import format_bytes

    size = path.stat().st_size + sum(p.stat().st_size for p in [path.with_name(path.name + ".data")] if p.exists())
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), "?")
        return f"{format_bytes(size)}, {len(proto.graph.node)} nodes, opset {opset}"
    except Exception:  # the description is cosmetic; never fail a finished conversion over it
        return format_bytes(size)
