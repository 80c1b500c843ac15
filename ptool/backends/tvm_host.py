"""The host CPU as TVM sees it: its LLVM target, and the threads TVM's runtime runs on."""

from __future__ import annotations

import os
from typing import Any


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (``znver4``, ``skylake-avx512``...)."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def host_target(mcpu: str | None = None, num_cores: int | None = None) -> Any:
    """The LLVM target for this CPU, as a TVM 0.27 JSON-style target."""
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu or host_cpu(), "num-cores": num_cores or usable_cores()})


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_threads(num_cores: int | None = None) -> int:
    """Make TVM's runtime thread pool run ``num_cores`` threads (default: every usable core);
    returns the number it will run.

    TVM sizes its pool once, at the first parallel kernel, from ``TVM_NUM_THREADS`` or else
    half the hardware threads (it assumes x86 CPUs run two per core). On a machine without SMT
    that is half the cores: on this 2-core host every TVM model ran on one thread. Setting the
    variable before the pool exists fixes it. A ``TVM_NUM_THREADS`` the user set is kept unless
    ``num_cores`` is given. A pool made earlier in this thread keeps its size; the return value
    says what it runs.
    """
    import tvm

    if num_cores is not None:
        os.environ["TVM_NUM_THREADS"] = str(num_cores)
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(usable_cores()))
    return int(tvm.get_global_func("runtime.NumThreads")())


__all__ = ["host_cpu", "host_target", "usable_cores", "use_threads"]
