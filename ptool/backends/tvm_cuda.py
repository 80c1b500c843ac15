"""The TVM backend on an NVIDIA GPU: target, schedules and Relax passes for ``device="cuda"``.

The pipeline is TVM 0.27's own CUDA pipeline (``tvm.relax.backend.cuda.pipeline``) with ptool's
Relax rewrites in front (bounds-checked gathers, fast math) and one change: the kernels are
scheduled with ``tvm.s_tir.dlight``'s GPU rules (``Matmul``, ``GEMV``, ``Reduction``,
``GeneralReduction``, then ``Fallback`` for whatever is left) by ptool's
:func:`~ptool.backends.tvm_schedules.schedule_pass`, which skips a function a rule fails on
instead of aborting the build as dlight's ``ApplyDefaultSchedule`` does; a MetaSchedule database,
when given, is applied first, and dlight schedules only what it left. ptool's CPU schedules
(AVX-512 register tiles) do not apply to a GPU.

The target is built from the device itself: ``sm_XY`` from its compute capability, and the
shared memory, threads per block, warp size and L2 size TVM's dlight and MetaSchedule rules size
their tiles with. The pip wheel ``apache-tvm`` 0.27 ships its CUDA runtime as a sidecar library
that loads only where the NVIDIA driver (``libcuda.so.1``) is present; building CUDA kernels
needs ``nvcc``. Where the runtime is missing :func:`check_cuda` says so in one line instead of
failing deep in the build.
"""

from __future__ import annotations

from typing import Any

from ptool.backends.device import Device
from ptool.errors import BackendError

REGISTERS_PER_BLOCK = 65536
"""32-bit registers a thread block may use: the same on every GPU since compute capability 3.0
(TVM's device API does not report it)."""


def check_cuda(device: Device) -> None:
    """Raise a one-line BackendError unless this TVM can build for and run on ``device``.

    Raises:
        BackendError: TVM was built without CUDA, or it cannot see GPU ``device.index``.
    """
    import tvm

    if not tvm.runtime.enabled("cuda"):
        raise BackendError(f"TVM {tvm.__version__} cannot run on device '{device}': its CUDA runtime is not loaded "
                           "(tvm.runtime.enabled('cuda') is False: an apache-tvm built without CUDA, or no NVIDIA "
                           "driver, libcuda.so.1, on this machine)")
    if not tvm.cuda(device.index).exist:
        raise BackendError(f"TVM cannot see CUDA device {device.index} (tvm.cuda({device.index}).exist is False)")


def is_cuda(target: Any) -> bool:
    """Whether ``target`` is a CUDA target (the pipeline branches on it, as TVM's own does)."""
    return target.kind.name == "cuda"


def cuda_target(arch: str, *, host: Any = None, max_shared_memory_per_block: int = 49152,
                max_threads_per_block: int = 1024, thread_warp_size: int = 32,
                l2_cache_size_bytes: int | None = None) -> Any:
    """A TVM 0.27 CUDA target (JSON form; the ``"cuda -arch=..."`` strings are gone in 0.27).

    Args:
        arch: ``"sm_80"``, ``"sm_90"``...
        host: the host target (a ``tvm.target.Target`` or its dict), None for TVM's default.
        the rest: the device limits dlight's and MetaSchedule's GPU rules tile with (defaults:
            those of TVM's ``nvidia/nvidia-a100`` and ``nvidia-h100`` tags).
    """
    import tvm

    spec: dict[str, Any] = {
        "kind": "cuda", "arch": arch, "max_shared_memory_per_block": int(max_shared_memory_per_block),
        "max_threads_per_block": int(max_threads_per_block), "max_num_threads": int(max_threads_per_block),
        "thread_warp_size": int(thread_warp_size), "registers_per_block": REGISTERS_PER_BLOCK,
    }
    if l2_cache_size_bytes:
        spec["l2_cache_size_bytes"] = int(l2_cache_size_bytes)
    if host is not None:
        spec["host"] = host
    return tvm.target.Target(spec)


def arch_of(compute_version: str) -> str:
    """``"8.0"`` -> ``"sm_80"``; ``"9.0"`` -> ``"sm_90"``."""
    major, _, minor = compute_version.partition(".")
    return f"sm_{int(major)}{int(minor or 0)}"


def device_target(device: Device, host: Any = None) -> Any:
    """The CUDA target for GPU ``device.index``, its limits read from TVM's device API."""
    import tvm

    dev = tvm.cuda(device.index)
    return cuda_target(arch_of(str(dev.compute_version)), host=host,
                       max_shared_memory_per_block=dev.max_shared_memory_per_block,
                       max_threads_per_block=dev.max_threads_per_block, thread_warp_size=dev.warp_size,
                       l2_cache_size_bytes=_or_none(lambda: dev.l2_cache_size_bytes))


def _or_none(read: Any) -> Any:
    try:
        return read()
    except Exception:  # an attribute this TVM's device API does not report
        return None


def gpu_rules() -> list[Any]:
    """dlight's GPU rules, in the order TVM's CUDA pipeline applies them."""
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def front_passes(target: Any) -> list[Any]:
    """Library dispatch and legalization with fusion: TVM's CUDA ``legalize_passes`` without the
    scheduling at their end (the kernels MetaSchedule extracts and dlight schedules)."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda

    return cuda.library_dispatch_passes(target) + [
        tvm.relax.transform.LegalizeOps(),
        tvm.relax.transform.AnnotateTIROpPattern(),
        tvm.relax.transform.FoldConstant(),
        tvm.relax.transform.FuseOps(),
        tvm.relax.transform.FuseTIR(),
    ]


def schedule_passes(target: Any) -> list[Any]:
    """Every kernel not yet scheduled (by a tuning database) gets dlight's GPU schedule."""
    from ptool.backends.tvm_schedules import schedule_pass

    return [schedule_pass(target, gpu_rules())]


def lower_passes(target: Any) -> list[Any]:
    """TVM's CUDA dataflow lowering and finalization (memory planning, VM lowering)."""
    from tvm.relax.backend.cuda import pipeline as cuda

    return cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target)
