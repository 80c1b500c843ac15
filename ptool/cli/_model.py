"""Resolve the CLI's ``MODEL`` argument.

``MODEL`` is one of:

- nothing: the embedded default, all-MiniLM-L6-v2 as a sentence embedder on real tokenized
  sentences (sequence length 128, batch 1), with calibration and held-out batches;
- a path: ``.onnx``, ``.pt2`` (an ExportedProgram) or a Hugging Face model folder (``config.json`` +
  safetensors) — see :func:`ptool.frontends.loaders.load_model`;
- ``package.module:function``: ``function()`` returns ``(model, example_inputs)`` or
  ``(model, args, kwargs)``; ``example_inputs`` is a tensor, a tuple of tensors, or a dict of keyword
  inputs. The current directory is importable, as with ``python -m``.

A path that exists wins over the ``module:function`` reading of the same text.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptool.errors import ModelLoadError, UsageError, did_you_mean

__all__ = ["ResolvedModel", "add_model_arguments", "resolve_model", "DEFAULT_LABEL", "split_specs"]

DEFAULT_LABEL = "default: all-MiniLM-L6-v2 sentence embedder on real sentences (seq 128, batch 1)"
_FUNCTION_SPEC = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<func>[A-Za-z_]\w*)$")


@dataclass
class ResolvedModel:
    """A loaded model plus the example call (and data) the CLI runs it with.

    Attributes:
        loaded: the :class:`~ptool.frontends.loaders.LoadedModel` (torch, exported program or ONNX).
        label: how the model is named in output.
        args / kwargs: one example call.
        calibration: extra input tuples (``(args, kwargs)`` pairs) for verification, if any.
        suggested_name: a file stem for outputs (``minilm``, the function name, the file stem).
    """

    loaded: Any
    label: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    calibration: list = field(default_factory=list)
    suggested_name: str = "model"

    @property
    def is_onnx(self) -> bool:
        return self.loaded.kind.value == "onnx"

    @property
    def obj(self) -> Any:
        return self.loaded.obj

    def eager(self) -> Any:
        """A callable running the model as given: the module, ``ep.module()``, or ONNX Runtime."""
        kind = self.loaded.kind.value
        if kind == "exported-program":
            return self.obj.module()
        if kind == "onnx":
            from ptool.onnx_module import OnnxTransformedModule
            from ptool.report import Report

            return OnnxTransformedModule(self.obj, Report(capture="onnx"))
        return self.obj

    def calibration_items(self) -> list | None:
        """The extra batches in the form ``ptool.transform(calibration=...)`` takes, or None."""
        items = []
        for args, kwargs in self.calibration:
            if args and kwargs:
                return None  # mixed calls cannot be expressed as calibration items
            items.append(tuple(args) if args else dict(kwargs))
        return items or None

    def input_summary(self) -> str:
        """``input_ids (1, 128) int64, attention_mask (1, 128) int64``-style text."""
        import torch

        def one(name: str, value: Any) -> str:
            if isinstance(value, torch.Tensor):
                return f"{name} {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
            return f"{name} {type(value).__name__}"

        if self.is_onnx:
            from ptool.onnx_module import input_specs

            names = [s.name for s in input_specs(self.obj)][: len(self.args)]
            names += [f"arg{i}" for i in range(len(names), len(self.args))]
        else:
            names = _positional_names(self.eager(), len(self.args))
        parts = [one(n, a) for n, a in zip(names, self.args, strict=True)] + [one(k, v) for k, v in self.kwargs.items()]
        return ", ".join(parts) or "(none)"


def _positional_names(module: Any, count: int) -> list[str]:
    """Names of ``forward``'s first ``count`` positional parameters (``arg0``... when unknown)."""
    import inspect

    names: list[str] = []
    try:
        params = list(inspect.signature(module.forward).parameters.values()) if module is not None else []
    except (TypeError, ValueError, AttributeError):
        params = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and len(names) < count:
            names.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            break
    return names + [f"arg{i}" for i in range(len(names), count)]


def split_specs(values: list[str] | None) -> list[str]:
    """Split comma-separated pass specs, keeping ``name:key=v,key2=w`` options together.

    ``["dce,cse", "linear-attention:feature_map=elu,dce"]`` -> ``["dce", "cse",
    "linear-attention:feature_map=elu", "dce"]``: a comma-separated piece holding ``=`` but no ``:``
    is another option of the previous pass (pass names never contain ``=``).
    """
    out: list[str] = []
    for value in values or []:
        for piece in (p.strip() for p in value.split(",")):
            if not piece:
                continue
            if out and "=" in piece and ":" not in piece and ":" in out[-1]:
                out[-1] = f"{out[-1]},{piece}"
            else:
                out.append(piece)
    return out


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``MODEL`` and ``--allow-pickle``: what every command that loads a model takes."""
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="path (.onnx, .pt2, HF folder), module:function, or omit for the default model")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled weights (pytorch_model.bin, .pt), read with torch.load(weights_only=True) "
                        "only; refused by default because unpickling can run code")


def resolve_model(spec: str | None, *, allow_pickle: bool = False) -> ResolvedModel:
    """Load ``MODEL`` (see the module docstring); ``allow_pickle`` as in :func:`ptool.transform`.

    Raises:
        ModelLoadError / UsageError: a missing path, a bad folder or file, a module or function that
            cannot be found or called, a function returning the wrong thing (exit code 2).
    """
    if spec is None or spec == "":
        return _default()
    path = Path(spec)
    m = _FUNCTION_SPEC.match(spec)
    if m and not path.exists():
        return _from_function(spec, m["module"], m["func"])
    from ptool.frontends.loaders import load_model

    loaded = load_model(path, allow_pickle=allow_pickle)
    args = tuple(loaded.example_inputs or ())
    kwargs = dict(loaded.example_kwargs or {})
    if loaded.kind.value == "onnx" and not args and not kwargs:
        args = onnx_example_inputs(loaded.obj)
    stem = path.resolve().name if path.is_dir() else path.stem
    return ResolvedModel(loaded, str(spec), args, kwargs, suggested_name=_safe_stem(stem))


def onnx_example_inputs(proto: Any) -> tuple:
    """Synthesize one call for an ONNX file (which carries no example data).

    Fixed dims are kept; a symbolic first dim becomes 1 (batch), other symbolic dims 16. Integer
    inputs are ones (a valid token id, attention-mask value and token-type id alike), floats are
    seeded standard normals.

    Raises:
        UsageError: an input whose rank or element type the file does not state.
    """
    import numpy as np
    import torch

    from ptool.onnx_module import input_specs

    gen = torch.Generator().manual_seed(0)
    out = []
    for spec in input_specs(proto):
        if spec.dims is None or spec.dtype is None:
            raise UsageError(
                f"ONNX input '{spec.name}' has no static rank or element type; pass the model as "
                "module:function with example inputs instead"
            )
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 16) for i, d in enumerate(spec.dims)]
        dtype = torch.from_numpy(np.zeros((), dtype=spec.dtype)).dtype
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.ones(shape, dtype=torch.bool))
        else:
            out.append(torch.ones(shape, dtype=dtype))
    return tuple(out)


def _safe_stem(stem: str) -> str:
    return re.sub(r"[^\w.-]+", "_", stem) or "model"


def _default() -> ResolvedModel:
    from ptool.default_model import default_model
    from ptool.frontends.loaders import LoadedModel, ModelKind

    d = default_model()
    loaded = LoadedModel(ModelKind.TORCH, d.module, tuple(d.example_inputs), dict(d.example_kwargs), source="default")
    calibration = [(tuple(b), {}) for b in d.calibration_batches[1:]]
    return ResolvedModel(loaded, DEFAULT_LABEL, tuple(d.example_inputs), dict(d.example_kwargs), calibration,
                         suggested_name="minilm")


def _import(module_name: str, spec: str):
    cwd = os.getcwd()
    if cwd not in sys.path:  # like `python -m`: modules in the current directory are importable
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ModelLoadError(
                f"'{spec}' is neither an existing path nor an importable module:function "
                f"(no module named '{e.name}')"
            ) from None
        raise ModelLoadError(f"importing module '{module_name}' for '{spec}' failed: {e}") from None
    except Exception as e:  # a SyntaxError or a failing import inside the user's module
        raise ModelLoadError(f"importing module '{module_name}' for '{spec}' failed: {type(e).__name__}: {e}") from None


def _from_function(spec: str, module_name: str, func_name: str) -> ResolvedModel:
    module = _import(module_name, spec)
    func = getattr(module, func_name, None)
    if func is None:
        public = [n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ModelLoadError(f"module '{module_name}' has no function '{func_name}'{did_you_mean(func_name, public)}")
    if not callable(func):
        raise ModelLoadError(f"'{spec}' is not callable (it is a {type(func).__name__})")
    try:
        result = func()
    except Exception as e:
        raise ModelLoadError(f"calling '{spec}()' failed: {type(e).__name__}: {e}") from None
    model, args, kwargs = _unpack(spec, result)
    from ptool.frontends.loaders import load_model

    loaded = load_model(model)
    return ResolvedModel(loaded, spec, args, kwargs, suggested_name=_safe_stem(func_name))


def _unpack(spec: str, result: Any) -> tuple[Any, tuple, dict]:
    """``(model, example_inputs)`` or ``(model, args, kwargs)`` -> ``(model, args, kwargs)``."""
    import torch

    expected = f"'{spec}' must return (model, example_inputs) or (model, args, kwargs)"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        got = f"a {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise UsageError(f"{expected}, got {got}")
    model, inputs = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if isinstance(inputs, torch.Tensor):
        args = (inputs,)
    elif isinstance(inputs, dict) and len(result) == 2:
        args, kwargs = (), inputs
    elif isinstance(inputs, (tuple, list)):
        args = tuple(inputs)
    else:
        raise UsageError(f"{expected}; example_inputs is a {type(inputs).__name__}, not a tensor, tuple or dict")
    if not isinstance(kwargs, dict):
        raise UsageError(f"{expected}; kwargs is a {type(kwargs).__name__}, not a dict")
    if not args and not kwargs:
        raise UsageError(f"{expected}; the example inputs are empty")
    return model, args, dict(kwargs)
