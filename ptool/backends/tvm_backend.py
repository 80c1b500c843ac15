"""TVM backend (Relax, TVM 0.27): import, build for the host CPU, run on the Relax VM.

Frontends (option ``frontend``):

- ``exported_program``: ``torch.export.export(module, ..., strict=False)`` then
  ``tvm.relax.frontend.torch.from_exported_program``, which runs ``run_decompositions()`` itself
  (core ATen) before translating. Works for plain modules and for the unlifted GraphModules of
  ``ExportedProgram.module()`` (re-exported; the ``_guards_fn`` call traces away). Measured on a
  tiny BERT: exact to ~2e-7 relative, and the faster of the two at run time (0.10 vs 0.18 ms).
- ``onnx``: :func:`ptool.backends.onnx_export.export_onnx` then ``tvm.relax.frontend.onnx.from_onnx``.
- ``auto`` (default): ``exported_program``, falling back to ``onnx`` if import, build or the
  first run fails; ``CompiledModel.info["frontend"]`` says which one was used.

Build: ``tvm.compile`` with target ``{"kind": "llvm", "mcpu": <host cpu>, "num-cores": <n>}``,
the host CPU name coming from LLVM (``tvm.target.codegen.llvm_get_system_cpu()``, e.g.
``znver4``). The default Relax CPU pipeline is used: legalize, fold constants, fuse, lower, with
ptool's passes slotted in: ``fast_math=True`` (default) swaps exp/erf/tanh/softmax/GELU for TVM's
vectorizable approximations before legalization, and ``schedules=True`` (default) schedules every
fused kernel with :mod:`ptool.backends.tvm_schedules` (register-tiled AVX-512 matmul/conv,
parallel vectorized elementwise kernels, dlight's reductions). The pip build has no BLAS/DNNL;
without these rules matmul-heavy models ran 85-350x slower than torch (see BENCHMARKS.md).
``dlight=True`` additionally applies ``tvm.s_tir.dlight`` CPU rules (GEMV, Reduction) per
function, skipping functions they cannot schedule; it made no measurable difference on BERT-like
models, so it is off by default.

Threads: TVM's runtime sizes its thread pool, once per process, to ``TVM_NUM_THREADS`` or else
half the hardware threads (it assumes two per core). On a host without SMT that is half the
cores; ptool sets ``TVM_NUM_THREADS`` to the usable cores (or ``num_cores``) before the first
kernel runs, unless the user set it, and ``info["threads"]`` reports the pool's size. On this
2-core host the untuned MiniLM went from ~40 to ~20 ms.

Weights are bound as constants (``keep_params_as_input=False``): constant folding then
pre-transposes linear weights at build time, and the VM owns one copy of the weights (the torch
module keeps its own; nothing else is duplicated once the build returns).

On ``device="cuda"`` (:mod:`ptool.backends.tvm_cuda`): a CUDA target made from the GPU's own
limits (``sm_XY``, shared memory, warp size), TVM's CUDA pipeline with dlight's GPU schedules,
the Relax VM on ``tvm.cuda(N)``; inputs and outputs cross to and from torch through DLPack
without copies, and the outputs stay on the GPU. ``schedules``, ``dlight``, ``mcpu`` and
``num_cores`` concern the CPU (the last two the host code only); ``tune_trials`` tunes the GPU
kernels with MetaSchedule against dlight's schedules the same way it does against ptool's on
the CPU. Without TVM's CUDA runtime (no driver, or a TVM built without CUDA) the backend says
so in one line.

Out-of-range gather indices: Relax's ``take`` defaults to ``mode="fast"`` (no bounds check; an
out-of-range token id segfaults the process). With ``safe_indexing=True`` (default) every
``take`` is rewritten to ``mode="nan"`` (float data: NaN rows) or ``"clip"`` (other dtypes),
which costs one compare per gathered element.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ptool.backends._common import CompiledModel, ExampleCall, cast_input, check_shape, first_line, options_dict
from ptool.backends.device import CPU, Device
from ptool.backends.tvm_host import host_target, use_threads
from ptool.errors import BackendError

NAME = "tvm"


@dataclass(frozen=True, kw_only=True)
class Options:
    """TVM options.

    Attributes:
        frontend: how the model enters Relax (see the module docstring).
        mcpu: LLVM CPU name (None: the host's, as LLVM detects it).
        num_cores: cores the target may use (None: this machine's).
        dlight: apply the ``tvm.s_tir.dlight`` CPU schedule rules (GEMV, Reduction).
        schedules: apply ptool's CPU schedule rules (:mod:`ptool.backends.tvm_schedules`: tiled,
            vectorized, parallel matmul/conv and elementwise kernels, then dlight's reductions).
        fast_math: exp/erf/tanh/softmax/GELU through TVM's vectorizable polynomial approximations
            (measured within 2e-6 absolute of torch on BERT-sized GELU and softmax).
        safe_indexing: bounds-checked gathers instead of a segfault on out-of-range indices.
        opset: ONNX opset for the ``onnx`` frontend's export.
        dynamic_shapes: as in ``torch.export.export`` (only for modules not yet captured).
        tune_trials: MetaSchedule trials in all (0: no tuning, the default schedules), split evenly
            over the kernels with a reduction (matmul, batched matmul, conv2d, softmax, layer
            norm); per kernel, the faster in the model of MetaSchedule's best and ptool's own
            schedule is kept (:mod:`ptool.backends.tvm_tuning`). The database is kept in ``tuning_dir``, so a second
            build of the same model for the same target reuses it instead of tuning again.
        tuning_dir: where the MetaSchedule database lives (None: ``~/.cache/ptool/tvm-tuning/<key>``,
            the key hashing the Relax module and the target).
        rpc_tracker / rpc_key: ``HOST:PORT`` of a TVM RPC tracker and the key its servers registered
            with (``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``): MetaSchedule's
            measurements run on those servers, as many at once as are free when tuning starts, instead
            of in this process. The database is the same (same folder, same reuse).
    """

    frontend: Literal["auto", "exported_program", "onnx"] = "auto"
    mcpu: str | None = None
    num_cores: int | None = None
    dlight: bool = False
    schedules: bool = True
    fast_math: bool = True
    safe_indexing: bool = True
    opset: int | None = None
    tune_trials: int = 0
    tuning_dir: str | None = None
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    dynamic_shapes: Any = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.num_cores is not None and self.num_cores < 1:
            raise ValueError(f"option 'num_cores' must be >= 1, got {self.num_cores}")
        if self.tune_trials < 0:
            raise ValueError(f"option 'tune_trials' must be >= 0, got {self.tune_trials}")
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise ValueError("options 'rpc_tracker' and 'rpc_key' go together: give both (HOST:PORT and the "
                             "servers' key) or neither")
        if self.rpc_tracker is not None:
            host, _, port = str(self.rpc_tracker).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"option 'rpc_tracker' must be HOST:PORT, got {self.rpc_tracker!r}")


def tuning_variants(fingerprint: Any, tvm_trials: int = 0) -> list[dict[str, Any]]:
    """The autotuner's TVM candidates: the default schedules, plus MetaSchedule when trials are given."""
    return [{}] + ([{"tune_trials": tvm_trials}] if tvm_trials > 0 else [])


def _metaschedule_build(mod: Any, target: Any, opts: Options, inputs: list[torch.Tensor],
                        dev: Any) -> tuple[Any, dict[str, Any]]:
    """Tune ``mod``'s heavy kernels with MetaSchedule (or reuse the database in ``tuning_dir``),
    keep per kernel whichever of MetaSchedule's and ptool's schedules (dlight's on a GPU) runs
    faster in the model (timed on ``inputs`` on ``dev``), and build with those
    (:mod:`ptool.backends.tvm_tuning`). Returns the executable and facts for ``info``."""
    import tvm
    from tvm import relax

    from ptool.backends import tvm_cuda, tvm_tuning

    work_dir, key = tvm_tuning.database_dir(mod, target, opts.tuning_dir)
    legalized = tvm.transform.Sequential(_front_passes(target, opts))(mod)
    rules = tvm_cuda.gpu_rules() if tvm_cuda.is_cuda(target) else None
    tasks = tvm_tuning.heavy_tasks(legalized, target, rules)  # extracted once, for tuning and the choice
    del legalized
    rpc = (opts.rpc_tracker, opts.rpc_key) if opts.rpc_tracker is not None else None
    facts = tvm_tuning.tune(tasks, target, opts.tune_trials, work_dir, key, rpc=rpc)
    if not tvm_tuning.is_chosen(work_dir, key):
        args = [_to_tvm(t, dev) for t in inputs]
        vms = {name: relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=_pipeline(
                   target, opts, database=database)), dev) for name, database in (("tuned", work_dir), ("ptool", None))}
        timed = tvm_tuning.profile_interleaved(vms, args, sync=dev.sync if tvm_cuda.is_cuda(target) else None)
        del vms
        facts = tvm_tuning.choose(tasks, target, work_dir, key, facts, timed["tuned"], timed["ptool"])
    database = tvm_tuning.chosen_dir(work_dir, key)
    return tvm.compile(mod, target=target, relax_pipeline=_pipeline(target, opts, database=database)), facts


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        yield


# --------------------------------------------------------------------------------------------
# Frontends


def _from_exported_program(example: ExampleCall, opts: Options) -> Any:
    from tvm.relax.frontend.torch import from_exported_program

    if example.inputs.constants:
        # The importer takes tensor inputs only: bake the non-tensor ones in via a flat wrapper
        # (whose signature no longer matches a user's dynamic_shapes spec).
        if opts.dynamic_shapes is not None:
            raise BackendError(
                "the exported_program frontend cannot combine non-tensor inputs with dynamic_shapes; "
                "use frontend='onnx'"
            )
        module, args, kwargs = (*example.flat(), {})
    else:
        module, args, kwargs = example.exportable(), example.args, example.kwargs
    try:
        with _quiet(), torch.no_grad():
            ep = torch.export.export(module, args, kwargs, dynamic_shapes=opts.dynamic_shapes, strict=False)
    except Exception as e:
        raise BackendError(f"torch.export failed: {type(e).__name__}: {first_line(e)}") from e
    ep = _float_quant_ops(ep)
    try:
        with _quiet():
            return from_exported_program(ep, keep_params_as_input=False, custom_convert_map=_converters(ep))
    except Exception as e:
        raise BackendError(f"TVM cannot import the exported program: {type(e).__name__}: {first_line(e)}") from e


def _converters(ep: Any) -> dict[str, Any] | None:
    """ptool's ``custom_convert_map``: bf16 / fp16 matmuls keeping torch's dtypes
    (:mod:`ptool.backends.tvm_precision`), ptool's shift-add kernels."""
    from ptool.backends import tvm_precision

    table = {**tvm_precision.converters(ep), **(_kernel_ops(ep) or {})}
    return table or None


def _kernel_ops(ep: Any) -> dict[str, Any] | None:
    """Converters lowering ptool's shift-add ops onto TIR kernels (``ptool.backends.tvm_kernels``)."""
    from ptool.ops import TVM_KERNEL_NAMESPACE, is_ptool_op

    if not any(is_ptool_op(n.target, TVM_KERNEL_NAMESPACE) for n in ep.graph.nodes):
        return None
    from ptool.backends.tvm_kernels.relax_ops import convert_map

    return convert_map(ep)


def _float_quant_ops(ep: Any) -> Any:
    """ptool's quantized-layer ops in float aten ops: TVM here has no integer kernels for them."""
    from ptool.ops import is_ptool_op, tvm_decompositions

    if not any(is_ptool_op(n.target) for n in ep.graph.nodes):
        return ep
    decompositions = tvm_decompositions()
    return ep.run_decompositions(decompositions) if any(n.target in decompositions for n in ep.graph.nodes) else ep


def _from_onnx(example: ExampleCall, opts: Options) -> Any:
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    from ptool.backends.onnx_export import export_onnx

    with tempfile.TemporaryDirectory(prefix="ptool-tvm-") as tmp:
        path = export_onnx(
            example.exportable(), Path(tmp) / "model.onnx", example.args, example.kwargs,
            dynamic_shapes=opts.dynamic_shapes, opset=opts.opset,
        )
        model = onnx.load(str(path))  # loads external data too
    shapes = None
    if opts.dynamic_shapes is None:  # pinned to the example's shapes: shape arithmetic folds at import
        initializers = {t.name for t in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in initializers]
        tensors = list(example.inputs.flatten(example.args, example.kwargs))
        if len(names) == len(tensors):
            shapes = {n: list(t.shape) for n, t in zip(names, tensors)}
            model = _static(model, shapes)
    try:
        with _quiet():
            return from_onnx(model, shape_dict=shapes, keep_params_in_input=False, sanitize_input_names=False)
    except Exception as e:
        raise BackendError(f"TVM cannot import the ONNX model: {type(e).__name__}: {first_line(e)}") from e


def _static(model: Any, shapes: dict[str, list[int]]) -> Any:
    """``model`` with its inputs pinned to ``shapes`` and shape arithmetic folded (onnxscript's
    optimizer), so Relax's importer sees constant shapes: a ``Reshape`` to a shape computed from
    ``Shape`` / ``Gather`` / ``Concat`` (common in Paddle and TF exports) otherwise fails to import."""
    import onnxscript

    from ptool.ir.onnx_flops import with_input_shapes

    try:
        return onnxscript.optimizer.optimize(with_input_shapes(model, shapes))
    except Exception:  # the optimizer refused the model: import it as it is
        return model


_FRONTENDS = {"exported_program": _from_exported_program, "onnx": _from_onnx}


# --------------------------------------------------------------------------------------------
# Relax passes


def _safe_take_pass() -> Any:
    """A module pass rewriting ``take(mode="fast")`` to a bounds-checked mode."""
    import tvm
    from tvm import relax
    from tvm.relax import expr_functor

    from ptool.backends.tvm_schedules import relax_function_pass

    take_op = tvm.ir.Op.get("relax.take")

    @expr_functor.mutator
    class _SafeTake(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if isinstance(call, relax.Call) and call.op.same_as(take_op) and call.attrs.mode == "fast":
                dtype = str(_type_of(call.args[0]).dtype)
                mode = "nan" if dtype.startswith(("float", "bfloat")) else "clip"
                return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode=mode)
            return call

    return relax_function_pass("ptool.SafeTake", _SafeTake)


def _dlight_pass(target: Any) -> Any:
    """dlight's CPU rules, applied function by function; a function they choke on stays as is.

    (``ApplyDefaultSchedule`` over the whole module aborts on the first function whose GEMV
    analysis fails, which happens on fused BERT kernels in 0.27.)
    """
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    rules = dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())

    @tvm.transform.module_pass(opt_level=0, name="ptool.DlightCPU")
    def _pass(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            try:
                with target:
                    scheduled = rules(tvm.IRModule({gv: func}))
                updates[gv] = scheduled[gv.name_hint]
            except Exception:  # a function the rules cannot schedule keeps the default lowering
                continue
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def _front_passes(target: Any, opts: Options) -> list[Any]:
    """ptool's Relax rewrites, library dispatch and legalization (fusion included)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from ptool.backends import tvm_cuda, tvm_schedules

    before = [_safe_take_pass()] if opts.safe_indexing else []
    before += [tvm_schedules.fast_math_pass()] if opts.fast_math else []
    if tvm_cuda.is_cuda(target):
        return before + tvm_cuda.front_passes(target)
    before += [tvm_schedules.reshape_after_add_pass()] if opts.schedules else []  # residual add -> epilogue
    return before + cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)


def _pipeline(target: Any, opts: Options, database: Path | None = None) -> Any:
    """The default Relax CPU pipeline, with ptool's extra passes slotted in (and a MetaSchedule
    database applied before ptool's rules when one is given); on a CUDA target, TVM's CUDA
    pipeline with dlight's GPU schedules (:mod:`ptool.backends.tvm_cuda`)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from ptool.backends import tvm_cuda, tvm_schedules, tvm_tuning

    after_legalize = [tvm_tuning.apply_database_pass(database)] if database is not None else []
    if tvm_cuda.is_cuda(target):
        after_legalize += tvm_cuda.schedule_passes(target)
        lower = tvm_cuda.lower_passes(target)
    else:
        after_legalize += [tvm_schedules.schedule_pass(target)] if opts.schedules else []
        after_legalize += [_dlight_pass(target)] if opts.dlight else []
        lower = cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)

    @tvm.transform.module_pass(opt_level=0, name="ptool.CPUPipeline")
    def _run(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(_front_passes(target, opts) + after_legalize + lower)
            return seq(mod)

    return _run


# --------------------------------------------------------------------------------------------
# Build and run


def _flatten_outputs(value: Any) -> list[Any]:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [value]
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        return [leaf for item in value for leaf in _flatten_outputs(item)]
    raise BackendError(f"the TVM model returned a {type(value).__name__}, expected tensors")


def _type_of(expr: Any) -> Any:
    """A Relax expression's type (``.ty`` in TVM 0.27, ``.struct_info`` before)."""
    ty = getattr(expr, "ty", None)
    return ty if ty is not None else expr.struct_info


def _input_specs(mod: Any) -> list[tuple[str, list[int | None]]]:
    """``(dtype, shape)`` of main's parameters; symbolic dims are None."""
    from tvm import tirx

    specs = []
    for param in mod["main"].params:
        ty = _type_of(param)
        shape = [int(d.value) if isinstance(d, tirx.IntImm) else None for d in ty.shape.values]
        specs.append((str(ty.dtype), shape))
    return specs


def _to_tvm(t: torch.Tensor, dev: Any) -> Any:
    import tvm

    t = t.detach().contiguous()
    if t.dtype != torch.bool:
        try:
            return tvm.runtime.from_dlpack(t)  # zero-copy
        except Exception:  # a dtype DLPack cannot carry: copy through numpy below
            pass
    return tvm.runtime.tensor(t.cpu().numpy(), dev)


def _from_tvm(value: Any, device: Device) -> torch.Tensor:
    """A VM output as a torch tensor: copied to host memory on the CPU (the VM may reuse its
    buffers), shared through DLPack on a GPU (it stays there; the VM allocates each output anew)."""
    if device.is_cuda:
        return torch.from_dlpack(value)
    array = value.numpy()
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which torch.from_numpy cannot read: same bits
        return torch.from_numpy(array.view("int16")).view(torch.bfloat16)
    return torch.from_numpy(array)


def _build(example: ExampleCall, opts: Options, frontend: str, device: Device = CPU) -> tuple[Any, dict[str, Any]]:
    import tvm
    from tvm import relax

    from ptool.backends import tvm_cuda

    t0 = time.perf_counter()
    mod = _FRONTENDS[frontend](example, opts)
    t1 = time.perf_counter()
    specs = _input_specs(mod)
    if len(specs) != len(example.inputs.names):
        raise BackendError(
            f"the TVM model takes {len(specs)} inputs but the example call has "
            f"{len(example.inputs.names)} tensors ({example.inputs.describe()})"
        )
    expected = [(getattr(torch, dtype), shape) for dtype, shape in specs]
    target = host_target(opts.mcpu, opts.num_cores)
    if device.is_cuda:
        target = tvm_cuda.device_target(device, host=target)
    dev = tvm.cuda(device.index) if device.is_cuda else tvm.cpu()
    threads = use_threads(opts.num_cores)  # before the first kernel runs (tuning included)
    tuning: dict[str, Any] = {}
    try:
        with _quiet(), target:
            if opts.tune_trials > 0:
                inputs = [cast_input(name, t, dtype).to(device.torch) for name, (dtype, _), t in zip(
                    example.inputs.names, expected, example.inputs.flatten(example.args, example.kwargs))]
                executable, tuning = _metaschedule_build(mod, target, opts, inputs, dev)
            else:
                executable = tvm.compile(mod, target=target, relax_pipeline=_pipeline(target, opts))
    except Exception as e:
        raise BackendError(f"TVM build failed: {type(e).__name__}: {first_line(e)}") from e
    del mod
    t2 = time.perf_counter()
    try:
        vm = relax.VirtualMachine(executable, dev)
        main = vm["main"]
    except Exception as e:
        raise BackendError(f"TVM cannot load the built model: {type(e).__name__}: {first_line(e)}") from e

    def run(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        args = []
        for name, (dtype, shape), t in zip(example.inputs.names, expected, tensors):
            t = cast_input(name, t, dtype)
            check_shape(name, t, shape)
            args.append(_to_tvm(t.to(device.torch), dev))
        if device.is_cuda:
            _wait_for_torch(device)
        try:
            out = main(*args)
        except Exception as e:
            raise BackendError(f"TVM failed while running the model: {first_line(e)}") from e
        return [_from_tvm(o, device) for o in _flatten_outputs(out)]

    got = run(example.inputs.flatten(example.args, example.kwargs))
    if len(got) != example.outputs.num_tensors:
        raise BackendError(
            f"the TVM model returns {len(got)} tensors but the module returns {example.outputs.num_tensors}"
        )
    info = {
        "frontend": frontend,
        "device": str(device),
        "target": str(target),
        "threads": threads,
        "import_seconds": round(t1 - t0, 3),
        "build_seconds": round(t2 - t1, 3),
        **tuning,
    }
    return run, {**info, "_keepalive": (executable, vm)}


def _wait_for_torch(device: Device) -> None:
    """TVM launches on the device's default stream: if torch works on another stream, what it
    queued there (the inputs) must finish first."""
    current = torch.cuda.current_stream(device.torch)
    if current != torch.cuda.default_stream(device.torch):
        current.synchronize()


def compile(module: Any, example: ExampleCall, opts: Options, device: Device = CPU) -> CompiledModel:  # noqa: A001
    """Import ``module`` into Relax, build it for the host CPU (or the CUDA ``device``) and wrap the VM.

    Raises:
        BackendError: TVM lacks CUDA for a CUDA ``device``, or every frontend tried failed to
            import, build or run the model.
    """
    try:
        import tvm  # noqa: F401  (seconds to import: only this backend pays for it)
    except ImportError as e:
        raise BackendError("the tvm backend needs apache-tvm: pip install 'ptool[tvm]'") from e
    if device.is_cuda:
        from ptool.backends import tvm_cuda

        tvm_cuda.check_cuda(device)

    frontends = ("exported_program", "onnx") if opts.frontend == "auto" else (opts.frontend,)
    from ptool.ir.onnx_module import OnnxTransformedModule

    if isinstance(module, OnnxTransformedModule):  # an ONNX model: Relax's ONNX frontend only
        frontends = ("onnx",)
    errors: list[BackendError] = []
    for frontend in frontends:
        try:
            run, info = _build(example, opts, frontend, device)
            break
        except BackendError as e:
            errors.append(e)
    else:
        if len(errors) == 1:
            raise errors[0]
        reasons = "; ".join(f"{f}: {e}" for f, e in zip(frontends, errors))
        raise BackendError(f"TVM could not compile the model ({reasons})")
    keepalive = info.pop("_keepalive")
    if errors:
        info["fallback_reason"] = str(errors[0])
    return CompiledModel(
        backend=NAME, options=options_dict(opts), example=example, run_flat=run, info=info, keepalive=keepalive
    )
