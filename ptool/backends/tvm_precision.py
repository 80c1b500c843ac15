"""bf16 / fp16 graphs through TVM's Relax importer: every matmul-class op keeps the dtype torch gave it.

Why here and not in the ``precision`` pass: the graph the pass hands over is already unambiguous.
Every op the pass touches reads inputs of one dtype (it inserts the ``_to_copy`` casts itself), and
the one mixed-dtype op left after ``run_decompositions()`` (inside torch's own decomposition of
``scaled_dot_product_attention``: a float32 score plus a bf16 mask) is an ``add.Tensor`` that TVM's
importer promotes exactly as torch does. What breaks the import is TVM's side: in TVM 0.27 the
converters of ``addmm``, ``baddbmm``, ``mm``, ``bmm``, ``matmul``, ``linear`` and the convolutions
hard-code ``out_dtype="float32"``, so a bf16 matmul comes out as float32 and its bias add
(``R.add(bias: bfloat16, matmul: float32)``, emitted inside the same converter) is a type error.
Extra casts in the FX graph could not reach inside that converter, and would tell every other
backend something false about the model.

The fix keeps TVM's float32 accumulator (what torch's bf16 GEMM does too) and restores torch's
contract around it: the bias is read in float32 (added to the float32 accumulator), and the result
is cast to the dtype torch's ``meta["val"]`` records for the node, so the ops downstream see the
dtypes torch saw. Float32 nodes are left to TVM's own converters untouched.

Measured on this CPU (AMD EPYC znver4 with avx512_bf16, 2 cores, apache-tvm 0.27, target
``-mcpu=znver4``): TVM legalizes ``matmul(bf16, bf16, out_dtype=float32)`` to a TIR loop that
widens each bf16 element to float32 (``T.Cast``, a 16-bit shift in the assembly) and multiply-adds
in float32; the generated assembly holds no ``vdpbf16ps`` (AVX-512-BF16's dot product), with
ptool's schedules or TVM's defaults (:func:`bf16_dot_instructions` counts them in a build). So bf16
on TVM is correct but not fast: a BERT of hidden size 256, 4 layers, seq 128, batch 1 ran in 31.9 ms
in bf16 vs 23.6 ms in float32 (medians of 30, interleaved; 1.30-1.42x slower over three runs), at
output cosine 0.999997 vs the same bf16 graph in torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: TVM 0.27 converters that compute in a float32 accumulator whatever the inputs' dtype, with the
#: position of the operand they add to it (the bias; None: the op has none).
FLOAT32_ACCUMULATORS: dict[str, int | None] = {
    "addmm.default": 0,
    "baddbmm.default": 0,
    "mm.default": None,
    "bmm.default": None,
    "matmul.default": None,
    "linear.default": 2,
    "convolution.default": 2,
    "conv1d.default": 2,
    "conv2d.default": 2,
    "conv3d.default": 2,
    "conv_transpose1d.default": 2,
    "conv_transpose2d.input": 2,
}

#: The instruction AVX-512-BF16 computes bf16 dot products with (two bf16 pairs per float32 lane).
BF16_DOT = "vdpbf16ps"


def _torch_dtype(node: torch.fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _reduced(node: torch.fx.Node) -> bool:
    return _torch_dtype(node) in (torch.bfloat16, torch.float16)


def converters(ep: torch.export.ExportedProgram) -> dict[str, Callable[[Any, Any], Any]]:
    """``custom_convert_map`` entries for TVM's float32-accumulating converters, when some op of
    ``ep`` computes in bf16 or fp16 (empty otherwise: TVM's converters agree with torch on float32).

    Every entry of :data:`FLOAT32_ACCUMULATORS` is given: the importer decomposes ``ep`` to core
    ATen itself (``linear`` becomes ``addmm``...), after this table is made. A node that is float32
    goes to TVM's converter unchanged."""
    if not any(node.op == "call_function" and _reduced(node) for node in ep.graph.nodes):
        return {}
    originals: dict[str, Callable[[Any], Any]] = {}  # TVM's own converters, bound to the importer

    def convert(name: str) -> Callable[[Any, Any], Any]:
        def run(node: torch.fx.Node, importer: Any) -> Any:
            if not originals:
                originals.update(importer.create_convert_map())
            if not _reduced(node):
                return originals[name](node)
            with _bias_in_float32(node, importer, FLOAT32_ACCUMULATORS[name]):
                out = originals[name](node)
            return _as_torch_dtype(out, node, importer)

        return run

    return {name: convert(name) for name in FLOAT32_ACCUMULATORS}


@contextlib.contextmanager
def _bias_in_float32(node: torch.fx.Node, importer: Any, position: int | None) -> Iterator[None]:
    """While TVM's converter runs, it reads the bias (``node.args[position]``) as float32, the
    accumulator's dtype; the importer's environment is restored afterwards."""
    from tvm import relax

    bias = node.args[position] if position is not None and len(node.args) > position else None
    if not isinstance(bias, torch.fx.Node) or _torch_dtype(bias) not in (torch.bfloat16, torch.float16):
        yield
        return
    before = importer.env[bias]
    importer.env[bias] = importer.block_builder.emit(relax.op.astype(before, "float32"))
    try:
        yield
    finally:
        importer.env[bias] = before


def _as_torch_dtype(out: Any, node: torch.fx.Node, importer: Any) -> Any:
    """``out`` cast to the dtype torch records for ``node`` (the float32 accumulator, rounded once)."""
    from tvm import relax

    want = str(_torch_dtype(node)).removeprefix("torch.")
    ty = getattr(out, "ty", None)
    if isinstance(ty, relax.TensorType) and str(ty.dtype) != want:
        return importer.block_builder.emit(relax.op.astype(out, want))
    return out


def bf16_dot_instructions(executable: Any) -> int:
    """How many ``vdpbf16ps`` instructions the host code of a ``tvm.compile`` result holds.

    Reads the LLVM module's assembly (``inspect_source("asm")`` on the library or its imports);
    -1 when no LLVM module is found to read.
    """
    lib = executable.mod if hasattr(executable, "mod") else executable
    modules = [lib, *getattr(lib, "imports", [])]
    sources = []
    for module in modules:
        with contextlib.suppress(Exception):
            sources.append(module.inspect_source("asm"))
    if not sources:
        return -1
    return sum(source.count(BF16_DOT) for source in sources)
