"""The ONNX-backed result of ``ptool.transform``: an ``nn.Module`` that runs ONNX Runtime.

An ONNX model handed to ptool stays ONNX (see ``ptool/frontends/onnx_import.py``), so what
``transform`` returns for it is not an FX graph but an ONNX ``ModelProto`` behind an ONNX Runtime
``InferenceSession``. :class:`OnnxTransformedModule` wraps that session in the same interface as
:class:`ptool.transformed.TransformedModule`: call it with torch tensors (or numpy arrays), get
torch tensors back, read ``.report``.

This module also holds the small runtime helpers the ONNX pass manager shares with it: the graph's
input signature (:func:`input_specs`), turning a call into an ORT feed dict (:func:`feeds_from_call`)
and opening a session (:func:`ort_session`). onnxruntime is imported lazily, only when a session
is opened.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ptool.errors import BackendError, InputError, did_you_mean, first_line, onnxruntime_failure
from ptool.report import Report

#: Models whose weights exceed this many bytes are handed to ONNX Runtime and written to disk with
#: external data: a single protobuf message cannot exceed 2 GiB.
LARGE_MODEL_BYTES = 1 << 30


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, numpy dtype and dims (an int, a symbolic name, or None)."""

    name: str
    elem_type: int
    dtype: np.dtype | None
    dims: tuple[int | str | None, ...] | None  # None: rank unknown

    def describe(self) -> str:
        dims = "?" if self.dims is None else "(" + ", ".join("?" if d is None else str(d) for d in self.dims) + ")"
        return f"{self.name}: {self.dtype or 'non-tensor'} {dims}"


def input_specs(model: Any) -> list[InputSpec]:
    """The runtime inputs of an ONNX model, in graph order (initializers listed as inputs excluded).

    Args:
        model: an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        import onnx_ir as ir

        return [_spec_of(ir.serde.serialize_value(v)) for v in model.graph.inputs if not v.is_initializer()]
    graph = model.graph
    initializers = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    return [_spec_of(value_info) for value_info in graph.input if value_info.name not in initializers]


def _spec_of(value_info: Any) -> InputSpec:
    import onnx

    tensor_type = value_info.type.tensor_type if value_info.type.HasField("tensor_type") else None
    if tensor_type is None:
        return InputSpec(value_info.name, 0, None, None)
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except (KeyError, TypeError, ValueError):
        dtype = None
    dims = None
    if tensor_type.HasField("shape"):
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
    return InputSpec(value_info.name, tensor_type.elem_type, dtype, dims)


def contiguous(array: np.ndarray) -> np.ndarray:
    """``array`` in C order, keeping its rank: ``np.ascontiguousarray`` turns a scalar into shape (1,)."""
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


_FAMILY = {"b": "bool", "i": "int", "u": "int", "f": "float", "c": "complex"}


def _host_value(value: Any) -> Any:
    """A sequence / optional input as ONNX Runtime takes it: lists of numpy arrays, None kept."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_host_value(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def _to_numpy(name: str, value: Any, spec: InputSpec) -> Any:
    if spec.elem_type == 0:  # a sequence, map or optional input: passed through as given
        return _host_value(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            raise InputError(f"input '{name}' is bfloat16, which numpy (and so ONNX Runtime's Python API) cannot carry")
        array = value.numpy()
    elif isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, (int, float, bool, list, tuple, np.generic)):
        array = np.asarray(value, dtype=spec.dtype)
    else:
        raise InputError(f"input '{name}' must be a torch tensor or numpy array, not {type(value).__name__}")
    if spec.dtype is not None and array.dtype != spec.dtype:
        # Cast within a family (float64 -> float32, int32 -> int64), never across (int -> float).
        if _FAMILY.get(array.dtype.kind) != _FAMILY.get(spec.dtype.kind):
            raise InputError(f"input '{name}' has dtype {array.dtype}; the ONNX model expects {spec.dtype}")
        array = array.astype(spec.dtype)
    if spec.dims is not None:
        if array.ndim != len(spec.dims):
            raise InputError(
                f"input '{name}' has shape {tuple(array.shape)}; the ONNX model expects rank {len(spec.dims)} "
                f"({spec.describe()})"
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.dims)):
            if isinstance(want, int) and want > 0 and got != want:
                raise InputError(
                    f"input '{name}' has size {got} on axis {axis}; the ONNX model fixes it to {want} ({spec.describe()})"
                )
    return contiguous(array)


def partial_feeds(
    specs: Sequence[InputSpec], args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """The inputs one call gives (positional in graph-input order, and/or by name) as numpy arrays,
    checked and cast; inputs it leaves out are simply absent.

    Raises:
        InputError: too many inputs, unknown or duplicate names, a dtype that cannot be cast
            safely, or a shape that contradicts the model's static dims.
    """
    kwargs = dict(kwargs or {})
    names = [s.name for s in specs]
    if len(args) > len(specs):
        raise InputError(f"the ONNX model takes {len(specs)} input(s) ({', '.join(names)}), got {len(args)} positional")
    given: dict[str, Any] = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise InputError(f"the ONNX model has no input '{key}'{did_you_mean(key, names)} (inputs: {', '.join(names)})")
        if key in given:
            raise InputError(f"input '{key}' given both positionally and by name")
        given[key] = value
    return {s.name: _to_numpy(s.name, given[s.name], s) for s in specs if s.name in given}


def feeds_from_call(
    specs: Sequence[InputSpec], args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Map one call (positional in graph-input order, and/or by name) to an ORT feed dict.

    Raises:
        InputError: as :func:`partial_feeds`, and missing inputs.
    """
    feeds = partial_feeds(specs, args, kwargs)
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise InputError(
            f"missing ONNX input(s) {', '.join(missing)}; the model takes: {'; '.join(s.describe() for s in specs)}"
        )
    return feeds


def ir_weight_bytes(model: Any) -> int:
    """Bytes of tensor data held by an ``onnx_ir.Model``'s initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


@contextlib.contextmanager
def saved_with_external_data(model: Any, prefix: str = "ptool-") -> Iterator[pathlib.Path]:
    """``model`` (``ModelProto`` or ``onnx_ir.Model``) written to a temporary folder with its
    weights in a file beside it — how a model past protobuf's 2 GiB reaches ORT or the checker.
    Yields the ``.onnx`` path; the folder is removed afterwards."""
    import onnx_ir as ir

    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        path = pathlib.Path(folder) / "model.onnx"
        ir.save(model if isinstance(model, ir.Model) else ir.from_proto(model), path, external_data="model.onnx.data")
        yield path


def weight_bytes(proto: Any) -> int:
    """Bytes of tensor data held by the model's initializers (loaded or external)."""
    total = 0
    for t in proto.graph.initializer:
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            for entry in t.external_data:
                if entry.key == "length":
                    total += int(entry.value)
    return total


def _session_options(*, optimize: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Spinning threads burn CPU between calls; ptool runs many short sessions (verification).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # ORT's own log lines are off: it warns about every unused initializer, and its errors reach
    # the user once, as the exception ptool wraps (run_session), not as a C++ dump on stderr first.
    options.log_severity_level = 4
    if not optimize:
        # Verification compares the pass's rewrite, not ORT's own fusions (which may differ
        # between the two graphs and move float rounding around).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # Verification sessions run a few calls: no pre-packed second copy of every weight.
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def ort_session(model: Any, *, optimize: bool = True) -> Any:
    """Open a CPU ``InferenceSession`` on an ``onnx.ModelProto`` or ``onnx_ir.Model``.

    Large models (over :data:`LARGE_MODEL_BYTES` of weights) go through a temporary folder with
    external data, since a single protobuf cannot exceed 2 GiB.

    Args:
        model: the model to run.
        optimize: let ORT apply its graph optimizations (off for verification runs).

    Raises:
        BackendError: ONNX Runtime cannot load the model.
    """
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    options = _session_options(optimize=optimize)
    providers = ["CPUExecutionProvider"]
    try:
        if isinstance(model, ir.Model):
            if ir_weight_bytes(model) <= LARGE_MODEL_BYTES:
                return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=providers)
        else:
            assert isinstance(model, onnx.ModelProto)
            if weight_bytes(model) <= LARGE_MODEL_BYTES:
                return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        with saved_with_external_data(model, "ptool-ort-") as path:
            return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:
        raise BackendError(f"ONNX Runtime cannot load the model: {first_line(e)}") from None


def to_torch(value: Any) -> Any:
    """An ONNX Runtime value for the torch side: numeric arrays as tensors (a scalar stays rank 0),
    string arrays as they are, sequences as lists, a missing optional as None."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OSU":
            return value
        canonical = np.dtype(value.dtype.name)  # numpy.ulonglong -> uint64, which torch takes
        return torch.from_numpy(contiguous(value if value.dtype.char == canonical.char else value.view(canonical)))
    if isinstance(value, (list, tuple)):
        return [to_torch(v) for v in value]
    return value


def run_session(session: Any, feeds: dict[str, np.ndarray]) -> list[torch.Tensor | Any]:
    """Run ``session`` on ``feeds``; outputs as torch tensors, in graph-output order.

    Raises:
        BackendError: ONNX Runtime failed; the message names the node (see
            :func:`ptool.errors.onnxruntime_failure`) and the input shapes.
    """
    try:
        outputs = session.run(None, feeds)
    except Exception as e:
        shapes = ", ".join(f"{n} {tuple(v.shape) if hasattr(v, 'shape') else type(v).__name__}" for n, v in feeds.items())
        raise BackendError(f"ONNX Runtime failed at {onnxruntime_failure(e)} (inputs: {shapes})") from None
    return [to_torch(o) for o in outputs]


class OnnxTransformedModule(nn.Module):
    """A transformed ONNX model behind ONNX Runtime, callable like a torch module.

    ``forward(*args, **kwargs)`` takes torch tensors or numpy arrays — positionally in graph-input
    order, or by input name — and returns torch tensors: a single tensor if the model has one
    output, else a tuple in graph-output order. The session (CPU, ORT graph optimizations on, no
    thread spinning) opens on the first call.

    The model is kept as given: an ``onnx_ir.Model`` (what ``transform`` returns) shares the
    tensors it did not rewrite with the model it was read from, so a big model is not held twice;
    ``onnx_model`` builds the ``ModelProto`` on first access, and from then on the proto is the
    model (edits to it are what runs and what is saved).

    Attributes:
        onnx_model: the transformed ``onnx.ModelProto``.
        report: what each pass did (:class:`ptool.report.Report`, ``capture="onnx"``).
        example_inputs / example_kwargs: the example call used to verify (torch tensors).
        input_names / output_names: the graph's runtime inputs and outputs.
    """

    def __init__(self, onnx_model: Any, report: Report, example_inputs: tuple = (), example_kwargs: dict | None = None):
        import onnx

        super().__init__()
        is_proto = isinstance(onnx_model, onnx.ModelProto)
        self._proto = onnx_model if is_proto else None
        self._ir = None if is_proto else onnx_model
        self.report = report
        self.example_inputs = tuple(example_inputs)
        self.example_kwargs = dict(example_kwargs or {})
        self._specs = input_specs(onnx_model)
        self.input_names = [s.name for s in self._specs]
        outputs = onnx_model.graph.output if is_proto else onnx_model.graph.outputs
        self.output_names = [o.name for o in outputs]
        self._session = None

    @property
    def onnx_model(self) -> Any:
        """The transformed ``onnx.ModelProto`` (built from the IR on first access)."""
        if self._proto is None:
            import onnx_ir as ir

            self._proto, self._ir = ir.to_proto(self._ir), None
        return self._proto

    def _model(self) -> Any:
        """The model in whichever form is current: the IR, or the proto once it was asked for."""
        return self._ir if self._ir is not None else self._proto

    @property
    def session(self) -> Any:
        """The ONNX Runtime ``InferenceSession`` (opened on first use)."""
        if self._session is None:
            self._session = ort_session(self._model(), optimize=True)
        return self._session

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple:
        outputs = run_session(self.session, feeds_from_call(self._specs, args, kwargs))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> pathlib.Path:
        """Write the model to ``path`` atomically and check it with ``onnx.checker``.

        The file is written into a temporary folder beside ``path``, checked, then moved into
        place with ``os.replace``; on any failure nothing is left at ``path``. Large models (or
        ``external_data=True``) get their weights in ``<name>.data`` beside the ``.onnx`` file
        (moved into place first, so the ``.onnx`` never points at a missing file).

        Args:
            path: the ``.onnx`` file to write (its folder is created if needed).
            external_data: force (True) or forbid (False) external weights; default: only when
                the weights exceed :data:`LARGE_MODEL_BYTES`.

        Returns:
            The path written.

        Raises:
            BackendError: the model could not be written or fails the checker.
        """
        import onnx
        import onnx_ir as ir

        from ptool.staging import move_into_place, staging_folder

        path = pathlib.Path(path)
        model = self._ir if self._ir is not None else ir.from_proto(self._proto)
        if external_data is None:
            external_data = ir_weight_bytes(model) > LARGE_MODEL_BYTES
        data_name = path.name + ".data" if external_data else None
        try:
            with staging_folder(path) as folder:
                staged = folder / path.name
                ir.save(model, staged, external_data=data_name)
                onnx.checker.check_model(str(staged))
                move_into_place(folder, path)
        except Exception as e:
            raise BackendError(f"could not save the ONNX model to '{path}': {first_line(e)}") from None
        return path

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_session"] = None  # sessions do not pickle or deepcopy; reopened on demand
        state["_proto"], state["_ir"] = self.onnx_model, None  # the proto pickles
        return state

    def __repr__(self) -> str:
        return f"OnnxTransformedModule(passes=[{', '.join(r.spec for r in self.report)}])"
