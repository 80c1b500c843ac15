"""Export a torch module to an optimized, checked ONNX file, written atomically.

Steps:

1. ``torch.onnx.export(..., dynamo=True)``: the ``torch.export``-based exporter. It takes plain
   ``nn.Module`` s and the unlifted ``GraphModule`` s that ``ExportedProgram.module()`` returns
   (their ``_guards_fn`` submodule re-traces as plain shape assertions and disappears), as well
   as an ``ExportedProgram``.
2. Optimization: with ``optimize=True`` the exporter runs the onnxscript optimizer
   (``onnxscript.optimizer.optimize_ir``: constant folding, the default rewrite rules, dead-code
   removal, initializer de-duplication, CSE) followed by ``onnxscript.rewriter.onnx_fusions``.
3. Names: inputs keep ``forward``'s argument names (``input_ids``, ``pair_0`` for a nested
   one); outputs are renamed after the output structure (``last_hidden_state``, ``output_0``).
4. Write + check: the model is saved into a temporary folder beside the target, checked there
   with the path-based ``onnx.checker.check_model`` (works past 2 GB), then moved into place with
   ``os.replace``. A failure leaves the target untouched.
5. Weights above ``external_data_threshold_bytes`` (default 1.5 GiB, under protobuf's 2 GiB
   limit for the whole file) go to ``<name>.onnx.data`` beside the model (relative path).

Limits: a GraphModule captured with static shapes stays static even if ``dynamic_shapes`` is
given (its graph has the sizes baked in); re-capture with dynamic shapes instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ptool.errors import BackendError, PtoolError

DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES = 1536 * 1024 * 1024
"""Weights above this total size are written as external data (protobuf caps a file at 2 GiB)."""


def export_onnx(
    module: Any,
    path: str | os.PathLike,
    example_inputs: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    opset: int | None = None,
    optimize: bool = True,
    external_data_threshold_bytes: int = DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES,
    output_names: Sequence[str] | None = None,
    rewrite: Callable[[Any], Any] | None = None,
) -> Path:
    """Export ``module`` to an optimized ONNX file at ``path`` (atomically).

    Args:
        module: an ``nn.Module`` (plain, or a GraphModule from ``ExportedProgram.module()``) or
            an ``ExportedProgram``; an ONNX model ptool loaded (``OnnxTransformedModule``) is written
            as it is (``dynamic_shapes``, ``opset`` and ``optimize`` do not apply to it).
        path: the ``.onnx`` file to write; its folder is created if missing.
        example_inputs / example_kwargs: one example call, ``module(*example_inputs, **example_kwargs)``.
        dynamic_shapes: as in ``torch.export.export``.
        opset: the ONNX opset to convert to (default: the exporter's).
        optimize: run the onnxscript optimizer (constant folding, rewrites, CSE).
        external_data_threshold_bytes: weights larger than this in total go to
            ``<name>.onnx.data`` beside the model.
        output_names: names for the graph outputs (default: from the output structure).
        rewrite: an in-place edit of the exported ``onnx_ir.Model``, made before it is checked and
            written (a backend lowering what its runtime cannot run, e.g. :mod:`ptool.backends.onnx_bf16`).

    Returns:
        The path written.

    Raises:
        InputError: malformed example inputs.
        BackendError: the export, the optimizer, the checker or the write failed (the target
            path is left as it was).
    """
    import torch

    from ptool.backends._common import canonical_call
    from ptool.inputs import check_inputs

    path = Path(path)
    if path.suffix != ".onnx":
        raise BackendError(f"ONNX output path must end in .onnx, got '{path}'")
    if path.is_dir():
        raise BackendError(f"ONNX output path '{path}' is a folder; give a file name ending in .onnx")
    from ptool.ir.onnx_module import OnnxTransformedModule

    if isinstance(module, OnnxTransformedModule):  # an ONNX model given to ptool: already ONNX, written as it is
        return module.save(path)
    args, kwargs = check_inputs(example_inputs, example_kwargs)
    if not isinstance(module, torch.export.ExportedProgram):
        args, kwargs = canonical_call(module, args, kwargs)

    model = _export_ir(
        module, args, kwargs, dynamic_shapes=dynamic_shapes, opset=opset, optimize=optimize, output_names=output_names
    )
    if rewrite is not None:
        rewrite(model)
    _write_atomically(model, path, external_data_threshold_bytes)
    return path


def _custom_translations() -> dict:
    """ONNX translations of ptool's own graph ops (:data:`ptool.ops.OP_MODULES`). Always the whole
    table: a pass may also call the ops from inside a kernel module's ``forward``, where no graph
    shows them before export traces it."""
    from ptool.ops import onnx_translations

    return onnx_translations()


def _export_ir(
    module: Any,
    args: tuple,
    kwargs: dict,
    *,
    dynamic_shapes: Any,
    opset: int | None,
    optimize: bool,
    output_names: Sequence[str] | None = None,
) -> Any:
    """Run the torch.export-based exporter and return the (optimized, renamed) ``onnx_ir.Model``."""
    import torch

    name = type(module).__name__
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                optimize=optimize,
                verbose=False,
                report=False,
                custom_translation_table=_custom_translations(),
            )
    except PtoolError:
        raise
    except Exception as e:  # torch.export / the translator raise many types; report one line
        raise BackendError(f"ONNX export of {name} failed: {_root_cause(e)}") from e
    if program is None:
        raise BackendError(f"ONNX export of {name} returned no program")
    model = program.model
    if output_names is not None:
        names = list(output_names)
    else:
        out_spec = _out_spec(program)
        names = _spec_names(out_spec, len(model.graph.outputs)) if out_spec is not None else None
    if names is not None:
        _rename_outputs(model, names)
    return model


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence exporter chatter that is not the user's problem.

    - "Exporting a model while it is in training mode": an unlifted GraphModule cannot be put in
      eval mode (``.eval()`` raises) and its graph already has eval semantics baked in.
    - onnxscript's constant folder logs "Evaluation failed" for nodes it merely skips.
    - "The axis name: seq will not be used": two dynamic dims that torch.export proved equal.
    """
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*training mode.*")
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _root_cause(err: BaseException) -> str:
    """The innermost cause's first line: the exporter wraps the real error in generic ones."""
    from ptool.backends._common import first_line

    root = err
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return first_line(err) if root is err else f"{type(root).__name__}: {first_line(root)}"


def _out_spec(program: Any) -> Any:
    ep = getattr(program, "exported_program", None)
    call_spec = getattr(ep, "call_spec", None)
    return getattr(call_spec, "out_spec", None)


def _spec_names(out_spec: Any, count: int) -> list[str] | None:
    from ptool.backends._common import output_names

    return output_names(out_spec, count)


def _rename_outputs(model: Any, names: list[str]) -> None:
    """Name graph outputs (after the output structure); skip if anything does not line up.

    An output that is also a graph input, an initializer or another output cannot take a new
    name without renaming that too, so then the exporter's names stay.
    """
    graph = model.graph
    outputs = list(graph.outputs)
    if len(names) != len(outputs) or len(set(names)) != len(names) or len({id(v) for v in outputs}) != len(outputs):
        return
    if any(v.is_graph_input() or v.is_initializer() for v in outputs):
        return
    others = {v.name for v in graph.inputs} | set(graph.initializers)
    others |= {v.name for node in graph for v in node.outputs if not v.is_graph_output()}
    if others & set(names):
        return
    for value, name in zip(outputs, names):
        value.name = name


def _write_atomically(model: Any, path: Path, threshold: int) -> None:
    """Save into a staging folder beside ``path``, check, then move into place (:mod:`ptool.staging`)."""
    import onnx
    import onnx_ir as ir

    from ptool.ir.onnx_module import ir_weight_bytes
    from ptool.staging import move_into_place, staging_folder

    data_name = f"{path.name}.data" if ir_weight_bytes(model) > threshold else None
    try:
        with staging_folder(path) as folder:
            staged = folder / path.name
            try:
                ir.save(model, staged, **({"external_data": data_name} if data_name else {}))
            except Exception as e:
                raise BackendError(f"writing ONNX to '{path}' failed: {_root_cause(e)}") from e
            try:
                onnx.checker.check_model(str(staged))  # by path: works for models over 2 GB
            except Exception as e:
                raise BackendError(f"exported ONNX fails onnx.checker: {_root_cause(e)}") from e
            move_into_place(folder, path)
    except OSError as e:  # the folder cannot be created, or the files not moved
        raise BackendError(f"cannot write to '{path.parent}': {e.strerror or e}") from e
