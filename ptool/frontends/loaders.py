"""Resolve whatever the user hands ptool into a loaded model.

Accepted (API.md): an ``nn.Module``, an ``ExportedProgram``, an ONNX ``ModelProto``, or a path —
``.onnx``, ``.pt2`` (ExportedProgram), or a Hugging Face model folder (``config.json`` +
safetensors). Pickled ``.pt``/``.pth`` files are refused: unpickling runs code from the file.

ONNX models stay ONNX: ptool runs the passes that make sense at that level on an ONNX IR (see
``ptool/frontends/onnx_import.py``) instead of converting them back to torch.
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


def load_model(model: Any) -> LoadedModel:
    """Turn a module, program, ONNX proto or path into a :class:`LoadedModel`.

    Raises:
        ModelLoadError: missing path, unsupported file type, a folder without config.json, an
            ONNX file that fails the checker, a pickle file.
    """
    if isinstance(model, (str, os.PathLike)):
        return _load_path(pathlib.Path(model))
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


def _load_path(path: pathlib.Path) -> LoadedModel:
    if not path.exists():
        raise ModelLoadError(f"model path '{path}' does not exist")
    if path.is_dir():
        from ptool.frontends.huggingface import load_hf_folder

        model, args, kwargs = load_hf_folder(path)
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
        raise ModelLoadError(
            f"'{path.name}' is a pickle file, which can run arbitrary code when loaded; ptool refuses it — "
            "save the model as an ExportedProgram (.pt2), a Hugging Face folder with safetensors, or ONNX"
        )
    raise ModelLoadError(
        f"unsupported model file '{path.name}': use a .onnx or .pt2 file, or a Hugging Face model folder"
    )


def _checked_onnx(proto: Any, where: str) -> Any:
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ModelLoadError(f"ONNX model {where} fails onnx.checker: {str(e).splitlines()[0][:200]}") from None
    return proto
