"""ptool: trace a PyTorch model, rewrite it with verified passes, lower it to ONNX Runtime or TVM.

    import ptool
    m2 = ptool.transform(model, passes=["fold-bn"], example_inputs=(x,))
    print(m2.report)

Importing ptool is cheap: torch, ONNX Runtime, TVM and transformers load only when used.
"""

from __future__ import annotations

import warnings

from ptool.errors import (
    BackendError,
    InputError,
    ModelLoadError,
    PassError,
    PtoolError,
    TraceError,
    UsageError,
    VerificationError,
)

__version__ = "0.1.0"

# torch warns about its own use of a deprecated pytree check whenever an exported program is copied
# (run_decompositions, deepcopy): nothing a ptool user can act on, so that one message is not shown.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

_LAZY = {
    "transform": "ptool.api",
    "export_onnx": "ptool.api",
    "compile": "ptool.api",
    "list_passes": "ptool.api",
    "autotune": "ptool.tune.tuner",
    "passes": "ptool.passes",
    "verify": "ptool.verify",
}

__all__ = [
    "BackendError", "InputError", "ModelLoadError", "PassError", "PtoolError", "TraceError",
    "UsageError", "VerificationError", "transform", "export_onnx", "compile", "list_passes",
    "autotune",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__ == f"ptool.{name}" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ptool' has no attribute '{name}'")
