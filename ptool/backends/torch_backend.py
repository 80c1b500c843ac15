"""The reference backend: run the module itself in eager torch, or through ``torch.compile``.

Calls run under ``torch.no_grad()`` like the other backends (their outputs carry no autograd
graph either), so latency comparisons are fair.

``torch.compile`` options that matter on a CPU: ``freezing=True`` lets Inductor treat the weights
as constants (they are folded into oneDNN's pre-packed layouts: bf16 weights run on the CPU's
bf16 units, AVX-512-BF16 or AMX, without a per-call re-layout), and ``mode="max-autotune"``
benchmarks Inductor's C++ GEMM templates against the library kernels for each matmul shape.
``aot=True`` compiles ahead of time with AOTInductor: ``torch.export`` captures the module once and
Inductor builds it into a shared library that runs without Dynamo's per-call guard checks and
Python wrapper (on all-MiniLM-L6-v2 int8 that is about a tenth of the latency at batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ptool.backends._common import CompiledModel, ExampleCall, cast_input, check_shape, first_line, options_dict
from ptool.errors import BackendError, UsageError

NAME = "torch"


@dataclass(frozen=True, kw_only=True)
class Options:
    """Options of the torch backend.

    Attributes:
        compile: wrap the module in ``torch.compile`` (Inductor; needs a C++ compiler on CPU).
        mode: ``torch.compile`` mode (only with ``compile=True``).
        dynamic: let ``torch.compile`` generate shape-generic code (None: torch decides).
        freezing: Inductor freezing: weights become constants, folded and pre-packed for the
            CPU's GEMM kernels (only with ``compile=True``; the weights must not change afterwards).
        aot: compile ahead of time with AOTInductor into a shared library (only with
            ``compile=True``): no Dynamo guards or Python wrapper per call. The input shapes are
            the example's unless ``dynamic=True``.
    """

    compile: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    dynamic: bool | None = None
    freezing: bool = False
    aot: bool = False

    def __post_init__(self) -> None:
        if not self.compile and (self.freezing or self.aot or self.mode != "default"):
            raise ValueError("freezing, aot and mode apply to torch.compile: add compile=true")


#: Variants the autotuner tries for every approximate (reduced-precision) candidate, whatever won on
#: float32: freezing is where bf16 weights get pre-packed and int8 quantization gets fused, and
#: AOTInductor then drops the per-call Python overhead that is a large share of a fast model.
FROZEN = {"compile": True, "freezing": True}
FROZEN_AOT = {"compile": True, "freezing": True, "aot": True}
REDUCED_PRECISION_VARIANTS = (FROZEN, FROZEN_AOT)


def tuning_variants(fingerprint: Any, tvm_trials: int = 0) -> list[dict[str, Any]]:
    """The autotuner's torch candidates: eager, and ``torch.compile`` (Inductor) where a C++ compiler
    exists: plain, with freezing (weights pre-packed as constants), and that ahead of time
    (AOTInductor)."""
    import shutil

    variants: list[dict[str, Any]] = [{}]
    if shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"):
        variants += [{"compile": True}, dict(FROZEN), dict(FROZEN_AOT)]
    return variants


#: Inductor stores a pointwise value read twice once it takes more than this many ops (its default
#: is 30), instead of computing it again in each reader. On a frozen CPU graph of int8 ops the
#: readers are a per-row maximum and the quantized levels: at 30, each FFN evaluated GELU's erf
#: twice and ``attention=int8`` its softmax exp twice. At 16, with AOTInductor (medians, side by
#: side): BERT-base seq 512 int8 258.7 -> 217.8 ms, ViT-B/16 int8 73.3 -> 71.4 ms, all-MiniLM-L6-v2
#: int8 8.6 -> 8.0 ms; float32 and bf16 graphs within 1% (nothing of theirs is read twice).
CPU_REALIZE_OPCOUNT = 16


def inductor_configs(opts: Options, cpu: bool = True) -> dict[str, Any]:
    """The Inductor configs ``opts`` sets (freezing, and the GEMM autotuning of the ``max-autotune``
    modes): what AOTInductor takes, and ``torch.compile`` takes as ``options`` in place of ``mode``.
    A frozen graph for the CPU (``cpu``) also stores its reused pointwise values (:data:`CPU_REALIZE_OPCOUNT`)."""
    configs: dict[str, Any] = {"freezing": opts.freezing}
    if opts.mode.startswith("max-autotune"):
        configs["max_autotune"] = True
    if opts.freezing and cpu:
        configs["realize_opcount_threshold"] = CPU_REALIZE_OPCOUNT
    return configs


def compile_options(opts: Options, cpu: bool = True) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for ``opts`` (``mode`` and ``options`` are exclusive there)."""
    if not opts.freezing:
        return {"mode": opts.mode, "dynamic": opts.dynamic}
    inductor = inductor_configs(opts, cpu)
    if opts.mode in ("reduce-overhead", "max-autotune"):  # the CUDA graphs those modes turn on
        inductor["triton.cudagraphs"] = True
    return {"options": inductor, "dynamic": opts.dynamic}


def with_torch_kernels(module: Any, traced: bool = True, prepacked: bool = False) -> Any:
    """``module`` with ptool's quantized ops swapped for the torch kernels they run on the CPU: the
    4-bit linears onto torch's packed int4 kernel (:func:`ptool.ops.quant.int4_packed_linear`; their
    weights repacked here, once; a shape it does not take keeps the reference op) and, with
    ``traced`` (for ``torch.compile``), the int8 ops onto their plain-torch integer kernels
    (:func:`ptool.ops.quant.integer_kernels`) so Dynamo traces into them. ``prepacked``: the int8
    linears on oneDNN's matmul with weights reordered at build time instead (frozen graphs only).

    The graph is copied (the weights are shared, not copied; the packed ones are buffers of the
    copy): the user's module is not touched. A module without those ops is returned as it is.
    """
    import torch.fx as fx

    from ptool.ops.quant import integer_kernels

    gm = getattr(module, "graph_module", module)
    if not isinstance(gm, fx.GraphModule):
        return module
    kernels = integer_kernels() if traced else {}
    if traced and prepacked:
        from ptool.ops import onednn_int8

        kernels.update(onednn_int8.prepacked_kernels())
    linear_int4 = torch.ops.ptool_quant.linear_int4.default
    int4 = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is linear_int4 and _int4_packable(gm, n)]
    if not int4 and not any(n.op == "call_function" and n.target in kernels for n in gm.graph.nodes):
        return module
    graph = fx.Graph()
    copies: dict = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    graph._codegen = gm.graph._codegen
    for node in graph.nodes:
        if node.op == "call_function" and node.target in kernels:
            node.target = kernels[node.target]
    copy = fx.GraphModule(gm, graph)
    for node in int4:
        _pack_int4(copy, copies[node])
    if int4:
        copy.recompile()
    if gm is module:
        return copy
    from ptool.transformed import TransformedModule

    return TransformedModule(copy, module.report, module.example_inputs, module.example_kwargs)


def _int4_stored(gm: Any, node: Any) -> list[torch.Tensor] | None:
    """The stored ``(packed, scales, zeros)`` a ``linear_int4`` node reads, if all are module attributes."""
    from ptool.ir.graph import attr_tensor

    stored = [attr_tensor(gm, a) for a in node.args[1:4]]
    return None if any(t is None for t in stored) else stored


def _int4_packable(gm: Any, node: Any) -> bool:
    from ptool.ops.quant import int4_packable

    stored = _int4_stored(gm, node)
    return stored is not None and int4_packable(stored[0], stored[1], node.args[5])


def _pack_int4(gm: Any, node: Any) -> None:
    """Point ``node`` (a ``linear_int4``) at torch's packed int4 kernel, its weight repacked into
    new buffers of ``gm``."""
    from ptool.ir.graph import add_tensor
    from ptool.ops.quant import int4_packed_linear, pack_int4_for_cpu

    x, packed, scales, zeros, bias, in_features = node.args
    weight, scales_and_zeros = pack_int4_for_cpu(*_int4_stored(gm, node), in_features)
    group_size = in_features // scales_and_zeros.shape[0]
    base = packed.target.replace(".", "_")
    weight = add_tensor(gm, "", f"{base}_int4pack", weight, parameter=False, before=node)
    scales_and_zeros = add_tensor(gm, "", f"{base}_int4pack_scales", scales_and_zeros, parameter=False, before=node)
    node.target = int4_packed_linear
    node.args = (x, weight, scales_and_zeros, bias, group_size)
    for old in (packed, scales, zeros):
        if not old.users:
            gm.graph.erase_node(old)


def _onednn_int8_linears(opts: Options, device: Any = None) -> bool:
    """Whether a frozen CPU compile (``torch.compile`` or AOTInductor) runs the int8 linears on oneDNN's
    pre-packed matmul, where this torch has it. Frozen, a traced ``torch._int_mm`` on constant weights
    is rewritten by Inductor's CPU passes into a kernel that ran 2,000x slower (16 s a call on one
    ViT-B/16 layer); oneDNN's kernel with its reordered weights runs at ``_int_mm``'s unfrozen speed
    or better. AOTInductor folds the reorder into the library's constants too: there it beat
    ``_int_mm`` on ViT-B/16 int8 by 5% (59.9 vs 63.0 ms) and matched it on BERT-base seq 512."""
    from ptool.ops import onednn_int8

    return opts.freezing and not _is_cuda(device) and onednn_int8.available()


def _frozen_calls(fn: Any, opts: Options) -> Any:
    """``fn`` called with Inductor's global ``freezing`` config on, when ``opts`` asks for freezing.

    Dynamo reads that global (not ``torch.compile``'s ``options``) when it decides whether to hand
    the module's weights to Inductor as parameters it may freeze: with ``options`` alone nothing is
    frozen. Every call runs under it, so a recompilation (a new shape) is frozen too.
    """
    if not opts.freezing:
        return fn
    import torch._inductor.config as inductor_config

    def frozen(*args: Any, **kwargs: Any) -> Any:
        before, inductor_config.freezing = inductor_config.freezing, True  # config.patch costs 16 us a call
        try:
            return fn(*args, **kwargs)
        finally:
            inductor_config.freezing = before

    return frozen


def _traced_at_fixed_shapes(module: Any) -> bool:
    """Whether ``module`` is a captured graph (``ptool.transform``'s result, an exported program's
    module) whose inputs all have fixed shapes: its shape guards and specialized views refuse any
    other shape, whatever a later compile is told."""
    import torch.fx as fx

    gm = getattr(module, "graph_module", module)
    if not isinstance(gm, fx.GraphModule):
        return False
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = [v for v in inputs if isinstance(v, torch.Tensor)]
    return bool(tensors) and all(isinstance(d, int) for t in tensors for d in t.shape)


def _is_cuda(device: Any) -> bool:
    return device is not None and device.is_cuda


def compile(module: Any, example: ExampleCall, opts: Options, device: Any = None) -> CompiledModel:  # noqa: A001
    """Wrap ``module`` (optionally ``torch.compile`` d, warmed up on the example call).

    ``device``: a CUDA :class:`ptool.backends.device.Device` when ``module`` already sits on that
    GPU; input tensors given on another device are moved there on each call, like the other
    backends do.

    Raises:
        BackendError: ``torch.compile`` failed on the example call.
    """
    if opts.dynamic and _traced_at_fixed_shapes(module):
        raise UsageError("dynamic=true needs a model traced with dynamic shapes: this one was traced at the example's "
                         "fixed shapes (give ptool.transform dynamic_shapes=, or compile without dynamic)")
    if opts.aot:
        return _compile_aot(module, example, opts, device)
    if not opts.compile:
        fn = with_torch_kernels(module, traced=False)
    else:
        fn = _frozen_calls(torch.compile(with_torch_kernels(module, prepacked=_onednn_int8_linears(opts, device)),
                                         **compile_options(opts, cpu=not _is_cuda(device))), opts)
        try:
            with torch.no_grad():
                fn(*example.args, **example.kwargs)  # compile now, so failures surface here
        except Exception as e:
            raise BackendError(f"torch.compile failed: {type(e).__name__}: {first_line(e)}") from e

    target = device.torch if _is_cuda(device) else None

    def run(*args: Any, **kwargs: Any) -> Any:
        if target is not None:
            import torch.utils._pytree as pytree

            args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(target), (args, kwargs))
        with torch.no_grad():
            return fn(*args, **kwargs)

    return CompiledModel(backend=NAME, options=options_dict(opts), example=example, run_direct=run)


def _compile_aot(module: Any, example: ExampleCall, opts: Options, device: Any) -> CompiledModel:
    """AOTInductor: export the flat-tensor form of ``module`` and build it into a shared library.

    The package lives in a temporary folder kept as long as the compiled model.

    Raises:
        BackendError: the export or the build failed.
    """
    import tempfile
    import time

    import torch._inductor as inductor

    flat_module, tensors = example.flat()
    flat_module.inner = with_torch_kernels(flat_module.inner, prepacked=_onednn_int8_linears(opts, device))
    dynamic_shapes = None
    if opts.dynamic:
        dim = torch.export.Dim.AUTO
        dynamic_shapes = (tuple({d: dim for d in range(t.dim())} for t in tensors),)
    folder = tempfile.TemporaryDirectory(prefix="ptool-aot-")
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(flat_module, tensors, dynamic_shapes=dynamic_shapes)
            configs = inductor_configs(opts, cpu=not _is_cuda(device))
            path = inductor.aoti_compile_and_package(program, package_path=f"{folder.name}/model.pt2",
                                                     inductor_configs=configs)
        runner = inductor.aoti_load_package(path)
    except Exception as e:
        folder.cleanup()
        raise BackendError(f"AOTInductor could not build the model: {type(e).__name__}: {first_line(e)}") from e
    build_s = time.perf_counter() - start
    target = device.torch if _is_cuda(device) else None
    names, dtypes, shapes = example.inputs.names, example.inputs.dtypes, example.inputs.shapes
    expected = [tuple(None for _ in s) if opts.dynamic else s for s in shapes]

    def run(flat: list[torch.Tensor]) -> list[torch.Tensor]:
        feed = []
        for name, dtype, shape, t in zip(names, dtypes, expected, flat):
            t = cast_input(name, t.detach(), dtype)
            check_shape(name, t, shape)
            feed.append(t.to(target) if target is not None else t)
        with torch.no_grad():
            return list(runner(*feed))

    return CompiledModel(backend=NAME, options=options_dict(opts), example=example, run_flat=run,
                         info={"build_s": round(build_s, 1), "package": path}, keepalive=folder)
