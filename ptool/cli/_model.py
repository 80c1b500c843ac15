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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptool.errors import ModelLoadError, UsageError, did_you_mean

__all__ = ["ResolvedModel", "add_model_arguments", "resolve_from_args", "resolve_model", "DEFAULT_LABEL", "split_specs"]

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
        made_up: ``name (shape) dtype`` of each input ptool made up from an ONNX file's types
            because the user gave neither ``--input`` nor ``--inputs`` for it.
    """

    loaded: Any
    label: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    calibration: list = field(default_factory=list)
    suggested_name: str = "model"
    made_up: list[str] = field(default_factory=list)

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
            from ptool.ir.onnx_module import OnnxTransformedModule
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

    def input_names(self) -> list[str]:
        """Names of the example call's positional inputs (graph inputs of an ONNX file, else
        ``forward``'s parameters)."""
        if self.is_onnx:
            from ptool.ir.onnx_module import input_specs

            names = [s.name for s in input_specs(self.obj)][: len(self.args)]
            return names + [f"arg{i}" for i in range(len(names), len(self.args))]
        return _positional_names(self.eager(), len(self.args))

    def call_by_name(self) -> dict[str, Any]:
        """The example call's inputs by name (positional ones under :meth:`input_names`)."""
        return {**dict(zip(self.input_names(), self.args)), **self.kwargs}

    def input_summary(self) -> str:
        """``input_ids (1, 128) int64, attention_mask (1, 128) int64``-style text."""
        import torch

        def one(name: str, value: Any) -> str:
            if isinstance(value, torch.Tensor):
                return f"{name} {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
            return f"{name} {type(value).__name__}"

        parts = [one(n, a) for n, a in zip(self.input_names(), self.args, strict=True)] + [one(k, v) for k, v in self.kwargs.items()]
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
    """``MODEL``, ``--allow-pickle``, ``--input`` and ``--inputs``: what every command that loads a model takes."""
    from ptool.cli._inputs import add_input_arguments

    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="path (.onnx, .pt2, HF folder), module:function, or omit for the default model")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled weights (pytorch_model.bin, .pt), read with torch.load(weights_only=True) "
                        "only; refused by default because unpickling can run code")
    add_input_arguments(p)


def resolve_from_args(args: argparse.Namespace, ui: Any) -> ResolvedModel:
    """:func:`resolve_model` on a command's parsed arguments; says on stderr which inputs were made up."""
    src = resolve_model(args.model, allow_pickle=args.allow_pickle, inputs=getattr(args, "input", ()),
                        inputs_file=getattr(args, "inputs", None), calibration_file=getattr(args, "calibration", None))
    if src.made_up:
        ui.err(f"ptool: note: made up input(s) {'; '.join(src.made_up)} from the model's declared types; "
               "give real ones with --input NAME=SHAPE[:DTYPE] or --inputs FILE.npz")
    return src


def resolve_model(spec: str | None, *, allow_pickle: bool = False, inputs: Sequence[str] = (),
                  inputs_file: str | None = None, calibration_file: str | None = None) -> ResolvedModel:
    """Load ``MODEL`` (see the module docstring); ``allow_pickle`` as in :func:`ptool.transform`.

    ``inputs`` (``NAME=SHAPE[:DTYPE]`` texts) and ``inputs_file`` (an ``.npz``) set the example
    call: see :mod:`ptool.cli._inputs`.

    Raises:
        ModelLoadError / UsageError: a missing path, a bad folder or file, a module or function that
            cannot be found or called, a function returning the wrong thing, inputs that do not fit
            (exit code 2).
    """
    from ptool.cli._inputs import load_npz, parse_input_shape

    shapes = [parse_input_shape(text) for text in inputs or ()]
    given = load_npz(inputs_file) if inputs_file else {}
    both = sorted({s.name for s in shapes} & set(given))
    if both:
        raise UsageError(f"input(s) {', '.join(both)} given by both --input and --inputs; give each once")
    if spec is None or spec == "":
        src = _default()
    else:
        path = Path(spec)
        m = _FUNCTION_SPEC.match(spec)
        if m and not path.exists():
            src = _from_function(spec, m["module"], m["func"])
        else:
            from ptool.frontends.loaders import load_model

            loaded = load_model(path, allow_pickle=allow_pickle)
            stem = path.resolve().name if path.is_dir() else path.stem
            src = ResolvedModel(loaded, str(spec), tuple(loaded.example_inputs or ()), dict(loaded.example_kwargs or {}),
                                suggested_name=_safe_stem(stem))
    if src.is_onnx:
        if not src.args and not src.kwargs:
            _onnx_inputs(src, given, shapes)
    elif given or shapes:
        _torch_inputs(src, given, shapes)
    if calibration_file:
        src.calibration = _calibration(src, calibration_file)
    return src


def _calibration(src: ResolvedModel, path: str) -> list[tuple[tuple, dict]]:
    """The ``--calibration`` batches as calls of the example's form: by position in the example's
    order, an input the file leaves out taking the example's value."""
    import numpy as np
    import torch

    from ptool.cli._inputs import calibration_calls, load_npz
    from ptool.ir.onnx_module import contiguous

    names = src.input_names()
    current = src.call_by_name()
    batches = calibration_calls(load_npz(path), path)
    unknown = sorted(set(batches[0]) - set(current)) if batches else []
    if unknown:
        raise UsageError(f"--calibration '{path}' names input(s) {', '.join(unknown)} the model does not take "
                         f"(inputs: {', '.join(current)})")
    calls = []
    for batch in batches:
        values = {k: torch.from_numpy(contiguous(np.asarray(v))) for k, v in batch.items()}
        merged = {**current, **values}
        calls.append((tuple(merged[n] for n in names), {k: merged[k] for k in src.kwargs}))
    return calls


def _onnx_inputs(src: ResolvedModel, given: dict, shapes: list) -> None:
    """The example call of an ONNX file: the given arrays, the stated shapes, the rest made up."""
    from ptool.frontends.onnx_import import example_inputs_for
    from ptool.ir.onnx_module import input_specs, partial_feeds, to_torch

    arrays = partial_feeds(input_specs(src.obj), (), given)
    feeds = example_inputs_for(src.obj, given=arrays, shapes={s.name: (s.shape, s.dtype) for s in shapes})
    stated = set(arrays) | {s.name for s in shapes}
    src.made_up = [f"{name} {tuple(v.shape)} {v.dtype}" for name, v in feeds.items() if name not in stated]
    src.args = tuple(to_torch(v) for v in feeds.values())


def _torch_inputs(src: ResolvedModel, given: dict, shapes: list) -> None:
    """Replace inputs of a torch model's example call by name: by ``--inputs`` arrays, or made up at
    a ``--input`` shape (dtype: the stated one, else the replaced example's, else float32)."""
    import numpy as np
    import torch

    from ptool.ir.onnx_module import contiguous

    names = src.input_names()
    current = src.call_by_name()
    accepted = _forward_parameters(src.eager()) | set(current)
    gen = torch.Generator().manual_seed(0)
    new: dict[str, Any] = {}
    for name, array in given.items():
        new[name] = torch.from_numpy(contiguous(array))
    for s in shapes:
        old = current.get(s.name)
        dtype = (torch.from_numpy(np.zeros((), s.dtype)).dtype if s.dtype is not None
                 else old.dtype if isinstance(old, torch.Tensor) else torch.float32)
        new[s.name] = _made_up_tensor(s.name, s.shape, dtype, old, gen)
    for name in new:
        if name not in accepted:
            raise UsageError(f"the model takes no input '{name}'{did_you_mean(name, sorted(accepted))} "
                             f"(inputs: {', '.join(sorted(accepted))})")
    src.args = tuple(new.get(n, a) for n, a in zip(names, src.args))
    src.kwargs = {**{k: new.get(k, v) for k, v in src.kwargs.items()},
                  **{k: v for k, v in new.items() if k not in current}}
    src.calibration = []  # batches of the old shapes no longer fit


def _made_up_tensor(name: str, shape: tuple, dtype: Any, like: Any, gen: Any) -> Any:
    import torch

    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool or "mask" in name.lower():
        return torch.ones(shape, dtype=dtype)
    if isinstance(like, torch.Tensor) and like.numel() and not like.dtype.is_floating_point:
        low, high = int(like.min()), int(like.max())
        return torch.randint(low, high + 1, shape, generator=gen).to(dtype)
    return torch.zeros(shape, dtype=dtype)


def _forward_parameters(module: Any) -> set[str]:
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return set()
    return {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


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
