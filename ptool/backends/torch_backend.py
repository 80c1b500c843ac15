"""The reference backend: run the module itself in eager torch, or through ``torch.compile``.

Calls run under ``torch.no_grad()`` like the other backends (their outputs carry no autograd
graph either), so latency comparisons are fair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ptool.backends._common import CompiledModel, ExampleCall, first_line, options_dict
from ptool.errors import BackendError

NAME = "torch"


@dataclass(frozen=True, kw_only=True)
class Options:
    """Options of the torch backend.

    Attributes:
        compile: wrap the module in ``torch.compile`` (Inductor; needs a C++ compiler on CPU).
        mode: ``torch.compile`` mode (only with ``compile=True``).
        dynamic: let ``torch.compile`` generate shape-generic code (None: torch decides).
    """

    compile: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    dynamic: bool | None = None



def tuning_variants(fingerprint: Any, tvm_trials: int = 0) -> list[dict[str, Any]]:
    """The autotuner's torch candidates: eager, and ``torch.compile`` (Inductor) where a C++ compiler exists."""
    import shutil

    variants: list[dict[str, Any]] = [{}]
    if shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"):
        variants.append({"compile": True})
    return variants


def compile(module: Any, example: ExampleCall, opts: Options) -> CompiledModel:  # noqa: A001
    """Wrap ``module`` (optionally ``torch.compile`` d, warmed up on the example call).

    Raises:
        BackendError: ``torch.compile`` failed on the example call.
    """
    fn = module
    if opts.compile:
        fn = torch.compile(module, mode=opts.mode, dynamic=opts.dynamic)
        try:
            with torch.no_grad():
                fn(*example.args, **example.kwargs)  # compile now, so failures surface here
        except Exception as e:
            raise BackendError(f"torch.compile failed: {type(e).__name__}: {first_line(e)}") from e

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return fn(*args, **kwargs)

    return CompiledModel(backend=NAME, options=options_dict(opts), example=example, run_direct=run)
