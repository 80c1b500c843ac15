"""ONNX Runtime backend: export to ONNX, run an ``InferenceSession`` on the CPU provider.

Thread spinning is off by default (``allow_spinning=False``): ORT's worker threads otherwise
busy-wait after each run and steal the cores from whatever runs next in the process (torch timed
right after ORT measures several times slower on 2 cores).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ptool.backends._common import CompiledModel, ExampleCall, cast_input, check_shape, first_line, options_dict
from ptool.backends.onnx_export import DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES, export_onnx
from ptool.errors import BackendError

NAME = "onnxruntime"

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


@dataclass(frozen=True, kw_only=True)
class Options:
    """ONNX Runtime options.

    Attributes:
        intra_op_threads: threads inside one op (None: ORT's default, one per physical core).
        inter_op_threads: threads across independent ops; > 1 switches to parallel execution.
        graph_optimization_level: ORT's graph optimizations.
        allow_spinning: let idle worker threads busy-wait (faster back-to-back runs, slower
            everything else in the process).
        onnx_path: where to keep the exported ``.onnx`` (None: a temp folder, removed with the
            compiled model).
        opset: ONNX opset for the export (None: the exporter's default).
        optimize: run the onnxscript optimizer on export.
        external_data_threshold_bytes: weights above this go to a ``.onnx.data`` file.
        dynamic_shapes: as in ``torch.export.export`` (only for modules not yet captured).
    """

    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    allow_spinning: bool = False
    onnx_path: str | None = None
    opset: int | None = None
    optimize: bool = True
    external_data_threshold_bytes: int = DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES
    dynamic_shapes: Any = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"option '{name}' must be >= 0 (0 = ORT's default), got {value}")


def _session_options(opts: Options) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[opts.graph_optimization_level])
    if opts.intra_op_threads is not None:
        so.intra_op_num_threads = opts.intra_op_threads
    if opts.inter_op_threads is not None:
        so.inter_op_num_threads = opts.inter_op_threads
        if opts.inter_op_threads > 1:
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    spin = "1" if opts.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return so


def _torch_dtype(onnx_type: str) -> torch.dtype | None:
    """``"tensor(int64)"`` -> ``torch.int64`` (None for types numpy cannot carry)."""
    table = {
        "tensor(float)": torch.float32,
        "tensor(double)": torch.float64,
        "tensor(float16)": torch.float16,
        "tensor(int64)": torch.int64,
        "tensor(int32)": torch.int32,
        "tensor(int16)": torch.int16,
        "tensor(int8)": torch.int8,
        "tensor(uint8)": torch.uint8,
        "tensor(bool)": torch.bool,
    }
    return table.get(onnx_type)



def tuning_variants(fingerprint: Any, tvm_trials: int = 0) -> list[dict[str, Any]]:
    """The autotuner's ORT candidates: defaults; every core for intra-op threads (ORT's default is
    one per *physical* core); the ``extended`` and ``basic`` graph-optimization levels (``all`` adds
    layout transforms that sometimes cost more than they save). Only the CPU provider is wired here."""
    variants: list[dict[str, Any]] = [{}]
    if fingerprint.cores > 1:
        variants.append({"intra_op_threads": fingerprint.cores})
    variants += [{"graph_optimization_level": "extended"}, {"graph_optimization_level": "basic"}]
    return variants


def compile(module: Any, example: ExampleCall, opts: Options) -> CompiledModel:  # noqa: A001
    """Export ``module`` to ONNX and open an ONNX Runtime session on it.

    Raises:
        BackendError: the export or the session creation failed.
    """
    import onnxruntime as ort

    keepalive = None
    if opts.onnx_path is not None:
        path = Path(opts.onnx_path)
    else:
        keepalive = tempfile.TemporaryDirectory(prefix="ptool-ort-")
        path = Path(keepalive.name) / "model.onnx"
    export_onnx(
        example.exportable(),
        path,
        example.args,
        example.kwargs,
        dynamic_shapes=opts.dynamic_shapes,
        opset=opts.opset,
        optimize=opts.optimize,
        external_data_threshold_bytes=opts.external_data_threshold_bytes,
        output_names=example.outputs.names(),
    )
    try:
        session = ort.InferenceSession(str(path), _session_options(opts), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BackendError(f"onnxruntime cannot load the exported model: {first_line(e)}") from e

    inputs = session.get_inputs()
    if len(inputs) != len(example.inputs.names):
        raise BackendError(
            f"the ONNX model has {len(inputs)} inputs but the example call has "
            f"{len(example.inputs.names)} tensors ({example.inputs.describe()})"
        )
    n_out = len(session.get_outputs())
    if n_out != example.outputs.num_tensors:
        raise BackendError(
            f"the ONNX model has {n_out} outputs but the module returns {example.outputs.num_tensors} tensors"
        )
    feeds = [
        (
            i.name,
            _torch_dtype(i.type) or dtype,
            [d if isinstance(d, int) else None for d in i.shape],
            user_name,
        )
        for i, dtype, user_name in zip(inputs, example.inputs.dtypes, example.inputs.names)
    ]
    run_options = ort.RunOptions()
    run_options.log_severity_level = 3

    def run(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        feed = {}
        for (name, dtype, shape, user_name), t in zip(feeds, tensors):
            t = cast_input(user_name, t.detach(), dtype)
            check_shape(user_name, t, shape)
            feed[name] = t.cpu().contiguous().numpy()
        try:
            outs = session.run(None, feed, run_options)
        except Exception as e:  # ORT's errors are multi-line C++ dumps; keep the point
            raise BackendError(f"onnxruntime failed while running the model: {first_line(e)}") from e
        return [torch.from_numpy(o) for o in outs]

    return CompiledModel(
        backend=NAME,
        options=options_dict(opts),
        example=example,
        run_flat=run,
        onnx_path=path,
        info={"providers": session.get_providers(), "input_names": [f[0] for f in feeds]},
        keepalive=(keepalive, session),
    )
