"""Resolve whatever the user hands ptool into a loaded model.

Accepted (the public API, see the README): an ``nn.Module``, an ``ExportedProgram``, an ONNX
``ModelProto``, or a path — ``.onnx``, ``.pt2`` (ExportedProgram), or a Hugging Face model folder
(``config.json`` + safetensors). Pickled ``.pt``/``.pth`` files are refused: unpickling runs code from the file. With
``allow_pickle=True`` they are read with ``torch.load(weights_only=True)``, which rebuilds only
tensors and plain containers (never code) — so a pickled state dict is recognised and explained,
and a pickled module (which needs code to rebuild) is still refused.

ONNX models stay ONNX: ptool runs the passes that make sense at that level on an ONNX IR (see
``ptool/pipeline/onnx_ir.py``) instead of converting them back to torch.
"""

from __future__ import annotations

import enum
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

from ptool.errors import ModelLoadError


class ModelKind(str, enum.Enum):
    TORCH = "torch"
    EXPORTED = "exported-program"
    ONNX = "onnx"


@dataclass
class LoadedModel:
    """A model ready for a frontend, with example inputs when the source provides them."""

    kind: ModelKind
    obj: Any
    example_inputs: tuple | None = None
    example_kwargs: dict = field(default_factory=dict)
    source: str = "<object>"


_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".ckpt"}


def load_model(model: Any, *, allow_pickle: bool = False) -> LoadedModel:
    """Turn a module, program, ONNX proto or path into a :class:`LoadedModel`.

    ``allow_pickle`` opts in to pickled weights (a Hugging Face folder's ``pytorch_model.bin``,
    ``.pt``/``.pth`` files), read with ``torch.load(weights_only=True)`` only.

    Raises:
        ModelLoadError: missing path, unsupported file type, a folder without config.json, an
            ONNX file that fails the checker, a pickle file.
    """
    if isinstance(model, LoadedModel):  # already resolved (and checked) by ptool, e.g. by the CLI
        return model
    if isinstance(model, (str, os.PathLike)):
        return _load_path(pathlib.Path(model), allow_pickle=allow_pickle)
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        args, kwargs = model.example_inputs or ((), {})
        return LoadedModel(ModelKind.EXPORTED, model, tuple(args) or None, dict(kwargs))
    if isinstance(model, torch.nn.Module):
        return LoadedModel(ModelKind.TORCH, model)
    if type(model).__name__ == "ModelProto":
        return LoadedModel(ModelKind.ONNX, _checked_onnx(model, "<ModelProto>"))
    raise ModelLoadError(
        f"cannot use a {type(model).__name__} as a model: pass an nn.Module, an ExportedProgram, an "
        "ONNX ModelProto, or a path to a .onnx / .pt2 file or a Hugging Face model folder"
    )


def _load_path(path: pathlib.Path, *, allow_pickle: bool) -> LoadedModel:
    if not path.exists():
        raise ModelLoadError(f"model path '{path}' does not exist")
    if path.is_dir():
        from ptool.frontends.huggingface import load_hf_folder

        model, args, kwargs = load_hf_folder(path, allow_pickle=allow_pickle)
        return LoadedModel(ModelKind.TORCH, model, args, kwargs, source=str(path))
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from ptool.frontends.onnx_import import load_onnx

        return LoadedModel(ModelKind.ONNX, load_onnx(path), source=str(path))
    if suffix == ".pt2":
        import torch

        try:
            ep = torch.export.load(str(path))
        except Exception as e:
            raise ModelLoadError(f"'{path}' is not a loadable torch.export .pt2 file: {str(e).splitlines()[0][:200]}") from None
        args, kwargs = ep.example_inputs or ((), {})
        return LoadedModel(ModelKind.EXPORTED, ep, tuple(args) or None, dict(kwargs), source=str(path))
    if suffix in _PICKLE_SUFFIXES:
        if allow_pickle:
            _explain_pickle(path)
        raise ModelLoadError(
            f"'{path.name}' is a pickle file, which can run arbitrary code when loaded; ptool refuses it "
            "(opt in with allow_pickle=True / --allow-pickle to read plain weights with weights_only=True) — "
            "save the model as an ExportedProgram (.pt2), a Hugging Face folder with safetensors, or ONNX"
        )
    raise ModelLoadError(
        f"unsupported model file '{path.name}': use a .onnx or .pt2 file, or a Hugging Face model folder"
    )


def _unsupported_global(message: str) -> str | None:
    """The class torch's safe unpickler refused (``GLOBAL __main__.Net``), from its error message,
    whose other lines are advice to turn the safety off that ptool does not repeat."""
    import re

    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def _explain_pickle(path: pathlib.Path) -> None:
    """Read an opted-in pickle with ``weights_only=True`` and say why it is still not a model.

    ``weights_only`` rebuilds tensors and plain containers only, so what can come out is weights
    without an architecture; a pickled ``nn.Module`` needs its class's code and is refused by
    torch's safe unpickler itself.
    """
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        found = _unsupported_global(str(e))
        holds = (f"it holds a pickled {found}, which needs its code to rebuild," if found else
                 "it holds more than plain tensors (e.g. a pickled nn.Module, which needs code to rebuild)")
        raise ModelLoadError(
            f"'{path.name}' cannot be read with torch.load(weights_only=True): {holds} and ptool never runs code "
            "from a model file — save it with torch.export (.pt2), as safetensors, or as ONNX"
        ) from None
    kind = "a state dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise ModelLoadError(
        f"'{path.name}' holds {kind} (weights without an architecture): load it into your model and pass the "
        "nn.Module (or module:function on the command line), or save it with torch.export (.pt2)"
    )


def _checked_onnx(proto: Any, where: str) -> Any:
    """``onnx.checker`` on an in-memory model; past 2 GiB (protobuf's cap) through a temporary file
    with external data, which the path-based checker reads without the weights."""
    import onnx

    from ptool.ir.onnx_module import LARGE_MODEL_BYTES, saved_with_external_data, weight_bytes

    try:
        if weight_bytes(proto) <= LARGE_MODEL_BYTES:
            onnx.checker.check_model(proto)
        else:
            with saved_with_external_data(proto, "ptool-check-") as path:
                onnx.checker.check_model(str(path))
    except Exception as e:
        raise ModelLoadError(f"ONNX model {where} fails onnx.checker: {str(e).splitlines()[0][:200]}") from None
    return proto
