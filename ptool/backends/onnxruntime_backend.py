"""ONNX Runtime backend: export to ONNX, run an ``InferenceSession`` (CPU provider by default; CUDA,
TensorRT, OpenVINO or oneDNN when the installed ORT build has them).

On ``device="cuda"`` the session runs on ORT's CUDA execution provider (TensorRT's with
``provider="tensorrt"``; CPU stays the fallback for ops they lack) and is fed through IO binding:
inputs are bound where they lie on the GPU (no host round trip), outputs are allocated there by
ORT and handed to torch through DLPack, so they stay on the GPU too. The pip package
``onnxruntime`` has no CUDA provider; ``onnxruntime-gpu`` has.

Thread spinning is off by default (``allow_spinning=False``): ORT's worker threads otherwise
busy-wait after each run and steal the cores from whatever runs next in the process (torch timed
right after ORT measures several times slower on 2 cores).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ptool.backends._common import CompiledModel, ExampleCall, cast_input, check_shape, first_line, options_dict
from ptool.backends.device import CPU, Device
from ptool.backends.onnx_export import DEFAULT_EXTERNAL_DATA_THRESHOLD_BYTES, export_onnx
from ptool.errors import BackendError, UsageError, onnxruntime_failure

NAME = "onnxruntime"

#: ptool's provider names -> ORT's. Only providers the installed build lists are accepted.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
}

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
        provider: execution provider (``cpu``, ``cuda``, ``tensorrt``, ``openvino``, ``dnnl``); it
            must be in this ORT build (:func:`available_providers`); the CPU provider stays as the
            fallback for ops the chosen one lacks. On ``device="cuda"``: ``cpu`` (the default) and
            ``cuda`` mean the CUDA provider, ``tensorrt`` TensorRT's (see :func:`session_providers`).
        transformer_fusions: run ORT's transformer optimizer (``onnxruntime.transformers``,
            model type ``bert``) on the exported graph: LayerNorm, SkipLayerNorm, BiasGelu and,
            where it recognizes the pattern, Attention fusions. The fused-op counts go to ``info``.
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
    provider: Literal["cpu", "cuda", "tensorrt", "openvino", "dnnl"] = "cpu"
    transformer_fusions: bool = False
    dynamic_shapes: Any = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"option 'provider' must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"option '{name}' must be >= 0 (0 = ORT's default), got {value}")


def _session_options(opts: Options) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # ORT's log off: it warns about every unused initializer; errors are raised
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



def available_providers() -> list[str]:
    """ptool's names of the execution providers this ORT build has (``cpu`` always)."""
    import onnxruntime as ort

    present = set(ort.get_available_providers())
    return [name for name, ort_name in PROVIDERS.items() if ort_name in present]


#: The providers that run on a GPU (the others run on the host CPU).
GPU_PROVIDERS = ("cuda", "tensorrt")


def session_providers(provider: str, device: Device = CPU,
                      available: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The ``providers`` list for ``InferenceSession``: ``(ORT name, provider options)`` pairs,
    best first, ending with the CPU provider (the fallback for ops the others lack).

    On the CPU, ``provider`` as given. On CUDA device ``N``: the CUDA provider with
    ``device_id=N`` (``provider`` ``cpu``, the default, or ``cuda``), or TensorRT's then CUDA's
    (``provider="tensorrt"``).

    Args:
        available: ORT names of the providers present (default: ``onnxruntime.get_available_providers()``).

    Raises:
        BackendError: the provider, or on CUDA the CUDA provider, is not in this onnxruntime build.
        UsageError: a CPU-only provider (``openvino``, ``dnnl``) asked for on a CUDA device.
    """
    import onnxruntime as ort

    present = list(ort.get_available_providers()) if available is None else list(available)
    names = [name for name, ort_name in PROVIDERS.items() if ort_name in present]
    if not device.is_cuda:
        if provider not in names:
            raise BackendError(f"ORT execution provider {provider!r} is not in this onnxruntime build "
                               f"(available: {', '.join(names)})")
        return [(PROVIDERS[p], {}) for p in dict.fromkeys([provider, "cpu"])]
    if provider not in ("cpu", *GPU_PROVIDERS):
        raise UsageError(f"ORT provider {provider!r} runs on the CPU; on device '{device}' use provider "
                         f"cuda (the default there) or tensorrt")
    if PROVIDERS["cuda"] not in present:
        raise BackendError(f"device '{device}' needs ONNX Runtime's CUDA execution provider, which the installed "
                           f"onnxruntime {ort.__version__} lacks (available: {', '.join(names)}); "
                           "pip install onnxruntime-gpu")
    gpu = {"device_id": device.index}
    chosen = [(PROVIDERS["cuda"], gpu)]
    if provider == "tensorrt":
        if PROVIDERS["tensorrt"] not in present:
            raise BackendError(f"ORT execution provider 'tensorrt' is not in this onnxruntime build "
                               f"(available: {', '.join(names)})")
        chosen.insert(0, (PROVIDERS["tensorrt"], dict(gpu)))
    return chosen + [(PROVIDERS["cpu"], {})]


def tuning_variants(fingerprint: Any, tvm_trials: int = 0) -> list[dict[str, Any]]:
    """The autotuner's ORT candidates: defaults; every core for intra-op threads (ORT's default is
    one per *physical* core); the ``extended`` and ``basic`` graph-optimization levels (``all`` adds
    layout transforms that sometimes cost more than they save); ORT's transformer fusions; and
    every other execution provider this ORT build has."""
    variants: list[dict[str, Any]] = [{}]
    if fingerprint.cores > 1:
        variants.append({"intra_op_threads": fingerprint.cores})
    variants += [{"graph_optimization_level": "extended"}, {"graph_optimization_level": "basic"},
                 {"transformer_fusions": True}]
    variants += [{"provider": name} for name in available_providers() if name != "cpu"]
    return variants


def tuning_left_out(formats: set[str], options: dict[str, Any]) -> str | None:
    """Why the autotuner should not build a candidate computing in ``formats`` (``bf16``, ``fp16``,
    ``int8``) with these options, or None. bf16 on the CPU provider runs (see :class:`_Bf16InFloat32`)
    but as float32 with bf16-stored weights: after ORT folds the weight casts its session is the float32
    one (measured: the same optimized graph, the same latency), so it cannot beat the float32 candidates."""
    from ptool.backends.onnx_bf16 import CPU_OPS_WITHOUT_BF16

    if "bf16" in formats and options.get("provider", "cpu") == "cpu":
        return (f"bf16 left out on onnxruntime: its CPU provider has no bf16 kernels for "
                f"{', '.join(CPU_OPS_WITHOUT_BF16)} (it would run in float32, no faster than float32)")
    return None


class _Bf16InFloat32:
    """The export-time rewrite running a bf16 graph on the CPU provider: weights stay bf16, the
    arithmetic is float32 (:mod:`ptool.backends.onnx_bf16`: the provider has no bf16 kernels for
    Add, MatMul, Gemm, Softmax...). Counts what it retyped, for ``info``."""

    def __init__(self) -> None:
        self.values = 0

    @classmethod
    def wanted(cls, providers: list[tuple[str, dict[str, Any]]]) -> _Bf16InFloat32 | None:
        """One for a session whose first provider is the CPU's (the GPU providers have bf16 kernels)."""
        return cls() if providers[0][0] == PROVIDERS["cpu"] else None

    def rewrite(self, model: Any) -> None:
        from ptool.backends import onnx_bf16

        self.values = onnx_bf16.compute_in_float32(model)

    def note(self) -> str:
        return (f"stored in bf16, computed in float32 ({self.values} values retyped): the CPU provider "
                "has no bf16 arithmetic kernels")


@contextlib.contextmanager
def _quiet_optimizer() -> Iterator[None]:
    """Keep ORT's transformer optimizer off the terminal: it prints ``failed in shape inference`` to
    stdout and logs ``symbolic shape inference disabled or failed`` warnings for graphs it cannot
    type fully (it then fuses less, which the fused-op counts say)."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _fuse_transformer(path: Path) -> tuple[Path, dict[str, int]]:
    """ORT's transformer optimizer over the exported model, saved next to it; fused-op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with _quiet_optimizer():
            model = optimize_model(str(path), model_type="bert", opt_level=0)
    except Exception as e:
        raise BackendError(f"onnxruntime's transformer optimizer failed: {first_line(e)}") from e
    counts = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    fused = path.with_name(path.stem + ".fused.onnx")
    model.save_model_to_file(str(fused), use_external_data_format=path.with_suffix(".onnx.data").exists())
    return fused, counts


def compile(module: Any, example: ExampleCall, opts: Options, device: Device = CPU) -> CompiledModel:  # noqa: A001
    """Export ``module`` to ONNX and open an ONNX Runtime session on it, for ``device``.

    Raises:
        BackendError: the provider is missing, or the export or the session creation failed.
        UsageError: a CPU-only provider asked for on a CUDA device.
    """
    import onnxruntime as ort

    providers = session_providers(opts.provider, device)
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
        rewrite=lowered.rewrite if (lowered := _Bf16InFloat32.wanted(providers)) else None,
    )
    fused: dict[str, int] | None = None
    if opts.transformer_fusions:
        path, fused = _fuse_transformer(path)
    try:
        session = ort.InferenceSession(str(path), _session_options(opts), providers=providers)
    except Exception as e:
        raise BackendError(f"onnxruntime cannot load the exported model: {first_line(e)}") from e
    if providers[0][0] not in session.get_providers():  # ORT falls back to the CPU with only a warning
        raise BackendError(f"onnxruntime {ort.__version__} could not start {providers[0][0]} (the session fell "
                           f"back to {', '.join(session.get_providers())}): the libraries it needs (CUDA, cuDNN, "
                           "TensorRT) are missing or do not match this build")

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
    feeds = _feeds(session, example)
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4

    def run(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        feed = {}
        for (name, dtype, shape, user_name), t in zip(feeds, tensors):
            t = cast_input(user_name, t.detach(), dtype)
            check_shape(user_name, t, shape)
            feed[name] = t.cpu().contiguous().numpy()
        try:
            outs = session.run(None, feed, run_options)
        except Exception as e:  # ORT's errors are multi-line C++ dumps; keep the point
            raise BackendError(f"onnxruntime failed while running the model at {onnxruntime_failure(e)}") from e
        return [torch.from_numpy(o) for o in outs]

    if device.is_cuda:
        run = _bound_runner(session, feeds, device, run_options)
    return CompiledModel(
        backend=NAME,
        options=options_dict(opts),
        example=example,
        run_flat=run,
        onnx_path=path,
        info={"device": str(device), "providers": session.get_providers(), "input_names": [f[0] for f in feeds],
              **({"fused_ops": fused} if fused is not None else {}),
              **({"bf16": lowered.note()} if lowered and lowered.values else {})},
        keepalive=(keepalive, session),
    )


Feed = tuple[str, torch.dtype, list[int | None], str]
"""One graph input: ``(ORT name, dtype, shape with None for symbolic dims, the user's name)``."""


def _feeds(session: Any, example: ExampleCall) -> list[Feed]:
    return [
        (
            i.name,
            _torch_dtype(i.type) or dtype,
            [d if isinstance(d, int) else None for d in i.shape],
            user_name,
        )
        for i, dtype, user_name in zip(session.get_inputs(), example.inputs.dtypes, example.inputs.names)
    ]


def _element_type(dtype: torch.dtype) -> Any:
    """What ``IOBinding.bind_input`` takes for ``dtype``: a numpy type, or ONNX's number for bfloat16."""
    import numpy as np

    if dtype == torch.bfloat16:
        return 16  # onnx.TensorProto.BFLOAT16: numpy has no bfloat16
    if dtype == torch.bool:
        return np.bool_
    return torch.empty(0, dtype=dtype).numpy().dtype.type


def _to_torch(value: Any, device: torch.device) -> torch.Tensor:
    """An output ``OrtValue`` as a torch tensor on ``device``: shared through DLPack, else copied."""
    try:
        return torch.from_dlpack(value)
    except Exception:  # an ORT without OrtValue.__dlpack__ (before 1.2x): through the host
        return torch.from_numpy(value.numpy()).to(device)


def _bound_runner(session: Any, feeds: list[Feed], device: Device, run_options: Any) -> Any:
    """``run(tensors) -> outputs`` through IO binding on ``device``: inputs moved there (a no-op
    for tensors already there) and bound by pointer, outputs allocated there by ORT and returned
    as torch tensors on it (no host copies on CUDA). Used for CUDA; works on the CPU too."""
    kind, target = device.kind, device.torch
    out_names = [o.name for o in session.get_outputs()]

    def run(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        binding = session.io_binding()  # one per call: outputs of earlier calls stay valid
        bound = []  # the bound tensors must outlive the run
        for (name, dtype, shape, user_name), t in zip(feeds, tensors):
            t = cast_input(user_name, t.detach(), dtype)
            check_shape(user_name, t, shape)
            t = t.to(target).contiguous()
            bound.append(t)
            binding.bind_input(name, kind, device.index, _element_type(t.dtype), tuple(t.shape), t.data_ptr())
        for name in out_names:
            binding.bind_output(name, kind, device.index)
        if device.is_cuda:  # ORT reads the inputs on its own stream: torch's writes must be done
            torch.cuda.current_stream(target).synchronize()
        try:
            session.run_with_iobinding(binding, run_options)  # returns once the outputs are ready
        except Exception as e:
            raise BackendError(f"onnxruntime failed while running the model at {onnxruntime_failure(e)}") from e
        return [_to_torch(v, target) for v in binding.get_outputs()]

    return run
