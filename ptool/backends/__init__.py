"""Backends: run a (transformed) torch module with eager torch, ONNX Runtime or TVM.

    run = compile_module(model, "onnxruntime", (x,), intra_op_threads=2)
    run(x)                # torch tensors, same structure as model(x)
    run.verify()          # ptool.verify.Fidelity vs eager torch on the example call

    run = compile_module(model, "tvm", (x,), device="cuda")   # outputs stay on the GPU

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

DEVICES = ("cpu", "cuda")
"""Device kinds the backends target (``cuda:N`` picks a GPU; see :mod:`ptool.backends.device`)."""

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
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (see :mod:`ptool.backends.device`). On
            CUDA the compiled model returns its outputs on the GPU. The torch backend runs a copy
            of ``module`` moved to the GPU (the caller's module stays where it was) and moves
            inputs there; ONNX Runtime (CUDA or TensorRT execution provider) and TVM (CUDA
            target) export and build from the module where it is (the example call is moved
            there) and take inputs on any device.
        **options: backend options (see ``Options`` in each backend module); CLI strings such
            as ``"2"`` or ``"true"`` are accepted too.

    Returns:
        A :class:`CompiledModel`: call it like ``module``; it returns torch tensors in the
        module's own output structure.

    Raises:
        UsageError: unknown backend, device or option; a CUDA device this machine lacks.
        InputError: example inputs that do not fit the module.
        BackendError: the backend could not export, build or load the model.
    """
    import torch

    from ptool.backends._common import ExampleCall
    from ptool.backends.device import check_available, parse_device

    mod = _backend_module(backend)
    dev = parse_device(device)
    opts = backend_options(backend, options)
    check_available(dev)
    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    if backend == "torch":
        # the module and the example call go to the device first; calls move their inputs there
        if dev.is_cuda:
            module = _module_on(module, dev.torch)
            example_inputs, example_kwargs = _tensors_to((example_inputs, example_kwargs), dev.torch)
        example = ExampleCall.run(module, example_inputs, example_kwargs)
        return mod.compile(module, example, opts, dev)
    # ONNX Runtime and TVM export the module where it is: the example call runs there too (inputs
    # already on the GPU, as a GPU caller has them, are fine)
    example_inputs, example_kwargs = _tensors_to((example_inputs, example_kwargs), _device_of(module))
    example = ExampleCall.run(module, example_inputs, example_kwargs)
    return mod.compile(module, example, opts, dev)


def _module_on(module: Any, device: Any) -> Any:
    """``module`` itself if its weights are all on ``device``, else a copy moved there (``.to`` is
    in place: moving the caller's model would be a surprise side effect of compiling it)."""
    import copy

    import torch

    tensors = [*module.parameters(), *module.buffers()] if isinstance(module, torch.nn.Module) else []
    if all(t.device == device for t in tensors):
        return module
    return copy.deepcopy(module).to(device)


def _device_of(module: Any) -> Any:
    """Where ``module``'s first weight lies (the CPU for a module without any)."""
    import torch

    if isinstance(module, torch.nn.Module):
        for t in (*module.parameters(), *module.buffers()):
            return t.device
    return torch.device("cpu")


def _tensors_to(tree: Any, device: Any) -> Any:
    """Every tensor leaf of ``tree`` moved to ``device`` (other leaves as they are)."""
    import torch
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def __getattr__(name: str) -> Any:
    # Lazy re-exports: keep `import ptool.backends` free of torch/onnx imports.
    if name == "CompiledModel":
        from ptool.backends._common import CompiledModel

        return CompiledModel
    if name == "export_onnx":
        from ptool.backends.onnx_export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'ptool.backends' has no attribute '{name}'")
