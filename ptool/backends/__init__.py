"""Backends: run a (transformed) torch module with eager torch, ONNX Runtime or TVM.

    run = compile_module(model, "onnxruntime", (x,), intra_op_threads=2)
    run(x)                # torch tensors, same structure as model(x)
    run.verify()          # ptool.verify.Fidelity vs eager torch on the example call

Importing this package is cheap: torch, onnxruntime and TVM are imported by the backend that
needs them, when it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ptool.errors import UsageError, did_you_mean

if TYPE_CHECKING:
    from ptool.backends._common import CompiledModel
    from ptool.backends.onnx_export import export_onnx

BACKENDS = ("torch", "onnxruntime", "tvm")
"""Backend names, in the order tables list them."""

DEVICES = ("cpu",)
"""Devices the backends target (this build has no GPU path)."""

_MODULES = {
    "torch": "ptool.backends.torch_backend",
    "onnxruntime": "ptool.backends.onnxruntime_backend",
    "tvm": "ptool.backends.tvm_backend",
}

__all__ = ["BACKENDS", "DEVICES", "CompiledModel", "backend_options", "compile_module", "export_onnx"]


def _backend_module(backend: str) -> Any:
    if backend not in BACKENDS:
        raise UsageError(
            f"unknown backend '{backend}' (allowed: {', '.join(BACKENDS)}){did_you_mean(str(backend), BACKENDS)}"
        )
    return importlib.import_module(_MODULES[backend])


def backend_options(backend: str, options: Mapping[str, Any] | None = None) -> Any:
    """Parse ``options`` into ``backend`` 's frozen options dataclass (defaults filled in).

    Raises:
        UsageError: unknown backend, unknown option key or bad value (naming the allowed ones).
    """
    from ptool.backends._common import parse_options

    mod = _backend_module(backend)
    return parse_options(mod.Options, backend, dict(options or {}))


def compile_module(
    module: Any,
    backend: str,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    device: str = "cpu",
    **options: Any,
) -> CompiledModel:
    """Compile ``module`` for ``backend`` from one example call.

    Args:
        module: an ``nn.Module``: plain, or a GraphModule from ``ExportedProgram.module()``
            (possibly edited by passes), or an ``ExportedProgram``. Put it in eval mode first.
        backend: one of :data:`BACKENDS`.
        example_inputs / example_kwargs: one call, ``module(*example_inputs, **example_kwargs)``;
            the compiled model takes calls of the same structure (and the same shapes unless
            compiled with ``dynamic_shapes``).
        device: one of :data:`DEVICES`.
        **options: backend options (see ``Options`` in each backend module); CLI strings such
            as ``"2"`` or ``"true"`` are accepted too.

    Returns:
        A :class:`CompiledModel`: call it like ``module``; it returns torch tensors in the
        module's own output structure.

    Raises:
        UsageError: unknown backend, device or option.
        InputError: example inputs that do not fit the module.
        BackendError: the backend could not export, build or load the model.
    """
    import torch

    from ptool.backends._common import ExampleCall

    mod = _backend_module(backend)
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}' (allowed: {', '.join(DEVICES)})")
    opts = backend_options(backend, options)
    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    example = ExampleCall.run(module, example_inputs, example_kwargs)
    return mod.compile(module, example, opts)


def __getattr__(name: str) -> Any:
    # Lazy re-exports: keep `import ptool.backends` free of torch/onnx imports.
    if name == "CompiledModel":
        from ptool.backends._common import CompiledModel

        return CompiledModel
    if name == "export_onnx":
        from ptool.backends.onnx_export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'ptool.backends' has no attribute '{name}'")
