"""The public Python API: ``transform``, ``export_onnx``, ``compile``, ``list_passes``."""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

from ptool.errors import UsageError
from ptool.passes.base import Pass


def transform(
    model: Any,
    passes: Sequence[str | Pass] | str | None = None,
    example_inputs: Any = None,
    *,
    example_kwargs: dict | None = None,
    calibration: Iterable | None = None,
    dynamic_shapes: Any = None,
    verify: bool = True,
    instruments: Sequence[Any] = (),
    copy_model: bool = True,
    allow_pickle: bool = False,
    fixpoint: bool = False,
):
    """Trace ``model``, run ``passes`` in order, verify after each, return a drop-in module.

    Args:
        model: an ``nn.Module``, ``ExportedProgram``, ONNX ``ModelProto``, or a path (``.onnx``,
            ``.pt2``, a Hugging Face model folder).
        passes: registry names (``"fold-bn"``), names with options
            (``"linear-attention:feature_map=elu"``) or pass objects. Default: none (capture only).
        example_inputs: a tuple of positional inputs for one call (a single tensor is accepted).
            Optional when the model source provides them (HF folder, .pt2 with examples). For an
            ONNX model also a dict ``{input name: array or tensor}``; inputs it leaves out are
            made up from the graph's declared types, with a warning naming them.
        example_kwargs: keyword inputs for that call.
        calibration: an iterable of input tuples (or dicts of keyword inputs), or a DataLoader;
            used by passes that need data and, for the first few items, for verification.
        dynamic_shapes: as in ``torch.export.export``.
        verify: compare outputs after every pass (recommended; exact passes must stay exact).
        instruments: objects called around each pass (``ptool.passes.instruments``).
        copy_model: deep-copy an ``nn.Module`` before capturing it (default), so ``model`` is never
            touched. ``False`` shares its weights with the result instead — half the memory, for
            big models — and training passes (attention conversion, repbn fine-tune) then update
            ``model``'s parameters too. Models ptool loads from a path are never copied.
        allow_pickle: accept pickled weights in a model path (``pytorch_model.bin``, ``.pt``), read
            with ``torch.load(weights_only=True)`` only.
        fixpoint: after the pipeline, run its exact passes again, in order, while a round still
            rewrites something (one fold can expose another: a branch merge after a BatchNorm fold);
            later rounds show in the report with their round number.

    Returns:
        A :class:`ptool.transformed.TransformedModule` with ``.report`` (an ONNX input returns an
        ONNX-backed module with the same interface).

    Raises:
        PassError: unknown pass or option. InputError: bad example inputs. ModelLoadError: bad
        model path. TraceError: the model cannot be captured. VerificationError: an exact pass
        changed the outputs.
    """
    from ptool.frontends.loaders import load_model
    from ptool.inputs import materialize_calibration
    from ptool.passes.registry import parse_pipeline
    from ptool.pipeline import transform as run_pipeline

    pipeline = parse_pipeline(passes)  # fail fast on bad pass specs, before any tracing
    loaded = load_model(model, allow_pickle=allow_pickle)
    if example_inputs is None and loaded.example_inputs is not None:
        example_inputs, example_kwargs = loaded.example_inputs, {**loaded.example_kwargs, **(example_kwargs or {})}
    elif example_inputs is None and loaded.example_kwargs and example_kwargs is None:
        example_inputs, example_kwargs = (), loaded.example_kwargs
    calib = materialize_calibration(calibration)

    copy_model = copy_model and not isinstance(model, (str, os.PathLike))  # loaded from a path: ours to share
    return run_pipeline(loaded, pipeline, example_inputs, example_kwargs, calib, dynamic_shapes=dynamic_shapes,
                        verify=verify, instruments=instruments, copy_model=copy_model, fixpoint=fixpoint)


def _unwrap(model: Any) -> tuple[Any, tuple | None, dict]:
    """The torch module to lower and the example call recorded with it, if any."""
    from ptool.ir.onnx_module import OnnxTransformedModule
    from ptool.transformed import TransformedModule

    if isinstance(model, OnnxTransformedModule):
        return model, model.example_inputs or None, model.example_kwargs
    if isinstance(model, TransformedModule):
        return model.graph_module, model.example_inputs, model.example_kwargs
    return model, None, {}


def export_onnx(model: Any, path: str | pathlib.Path, example_inputs: Any = None, *, example_kwargs: dict | None = None,
                dynamic_shapes: Any = None, opset: int | None = None, external_data: bool | None = None) -> pathlib.Path:
    """Write an optimized ONNX file that ``onnx.checker`` and ONNX Runtime accept.

    The file appears atomically: on any failure no (partial) file is left at ``path``. The same
    model and passes give a byte-identical file on every run.

    ``external_data``: weights in ``<name>.onnx.data`` beside the file (relative path). Default:
    only past 1.5 GiB of weights (protobuf caps a file at 2 GiB). External data is also the
    memory-lean way: its weights stream to disk, while a single file is serialized in memory
    (about twice the weights on top of the model at peak).

    Returns:
        The path written.
    """
    from ptool.backends.onnx_export import DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES
    from ptool.backends.onnx_export import export_onnx as _export
    from ptool.inputs import check_inputs
    from ptool.ir.onnx_module import OnnxTransformedModule

    if isinstance(model, OnnxTransformedModule):  # already ONNX: write it (atomically, checked)
        return model.save(path, external_data=external_data)
    module, ex_args, ex_kwargs = _unwrap(model)
    if example_inputs is None and ex_args is not None:
        example_inputs, example_kwargs = ex_args, {**ex_kwargs, **(example_kwargs or {})}
    args, kwargs = check_inputs(example_inputs, example_kwargs)
    threshold = {None: DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES, True: 0, False: math.inf}[external_data]
    return _export(module, path, args, kwargs, dynamic_shapes=dynamic_shapes, opset=opset,
                   external_data_threshold_bytes=threshold)


def compile(model: Any, backend: str = "torch", example_inputs: Any = None, *, example_kwargs: dict | None = None,
            device: str = "cpu", **options: Any):
    """Lower ``model`` to ``backend`` (``torch``, ``onnxruntime`` or ``tvm``) and return a callable.

    A model ptool loaded from ONNX goes to ``onnxruntime`` (a session on the file as it is, with the
    backend's options: threads, graph optimization level, provider) or ``tvm`` (Relax's ONNX
    frontend and ptool's schedules). The callable takes the model's own arguments and returns torch tensors in the model's output
    structure. ``options`` are backend options (e.g. ``intra_op_threads=2`` for ONNX Runtime).
    ``device`` is ``cpu``, ``cuda`` or ``cuda:N``; on a GPU the outputs stay on it.

    Raises:
        UsageError: an unknown backend, option or device spelling, or a CUDA device this machine
            lacks (one line, saying why: e.g. a CPU-only torch).
        BackendError: the backend could not build or load the model (e.g. no CUDA in its build).
    """
    from ptool.backends import compile_module
    from ptool.backends.device import parse_device
    from ptool.inputs import check_inputs
    from ptool.ir.onnx_module import OnnxTransformedModule

    if isinstance(model, OnnxTransformedModule):
        if backend == "torch":
            raise UsageError("a model loaded from ONNX runs on backend 'onnxruntime' or 'tvm', not 'torch'; give "
                             "ptool the torch model or a .pt2 to run it in torch")
        if parse_device(device).is_cuda and backend == "tvm":
            raise UsageError(f"a model loaded from ONNX builds for TVM on the CPU; for device '{device}' use "
                             "backend='onnxruntime' or give ptool the torch model")
    module, ex_args, ex_kwargs = _unwrap(model)
    if example_inputs is None and ex_args is not None:
        example_inputs, example_kwargs = ex_args, {**ex_kwargs, **(example_kwargs or {})}
    args, kwargs = check_inputs(example_inputs, example_kwargs)
    return compile_module(module, backend, args, kwargs, device=device, **options)


def list_passes():
    """Registered passes: name, family, exact/approximate, options, one-line doc."""
    from ptool.passes.registry import list_passes as _list

    return _list()
