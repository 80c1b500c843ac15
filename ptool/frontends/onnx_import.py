"""The ONNX frontend: load ``.onnx`` files safely and make the example inputs of an ONNX model.

An ONNX model handed to ptool stays ONNX: the pipeline (``ptool/pipeline/onnx_ir.py``) runs the
passes on an ``onnx_ir.Model``; this module only loads the file and turns the user's inputs (or,
failing those, the graph's declared types) into ONNX Runtime feeds.

Loading (:func:`load_onnx`) is defensive: external-data locations that are absolute or leave the
model's folder are refused *before* any data is read, the file must pass ``onnx.checker`` (run on
the path, so models over 2 GiB work), and every failure is a one-line
:class:`~ptool.errors.ModelLoadError`.

Inputs: when the user gives no example inputs, :func:`example_inputs_for` synthesizes them from the
graph's input types (see its docstring for the rules).
"""

from __future__ import annotations

import os
import pathlib
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ptool.errors import InputError, ModelLoadError, did_you_mean, first_line
from ptool.ir.onnx_flops import onnx_graphs


def _all_tensors(proto: Any) -> Iterator[Any]:
    """Every TensorProto of the model that may carry external data: initializers (dense and
    sparse) and tensor attributes, in the main graph, subgraphs and functions."""

    def from_nodes(nodes: Any) -> Iterator[Any]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                for sparse in attr.sparse_tensors:
                    yield sparse.values
                    yield sparse.indices

    for graph in onnx_graphs(proto.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from from_nodes(graph.node)
    for function in proto.functions:
        yield from from_nodes(function.node)


def _check_external_locations(proto: Any, path: pathlib.Path) -> None:
    """Refuse external-data locations that are absolute or resolve outside the model's folder."""
    import onnx

    folder = path.resolve().parent
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if not location:
            raise ModelLoadError(f"ONNX file '{path.name}': tensor '{tensor.name}' has external data without a location")
        parts = re.split(r"[\\/]", location)
        absolute = location.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", location)) or os.path.isabs(location)
        if absolute or ".." in parts:
            raise ModelLoadError(
                f"ONNX file '{path.name}': tensor '{tensor.name}' points at external data '{location}' outside "
                "the model's folder; ptool only reads external data stored beside the model"
            )
        target = (folder / location).resolve()  # also catches symlinks leading out of the folder
        if not target.is_relative_to(folder):
            raise ModelLoadError(
                f"ONNX file '{path.name}': external data '{location}' of tensor '{tensor.name}' resolves outside "
                "the model's folder; ptool only reads external data stored beside the model"
            )


def load_onnx(path: str | os.PathLike) -> Any:
    """Load an ``.onnx`` file, with its external data, after checking it.

    Order matters: the protobuf is read without external data, the external-data locations are
    checked (no absolute paths, nothing outside the model's folder), ``onnx.checker`` runs on the
    path (which works for models over 2 GiB), and only then is the external data read.

    Args:
        path: the ``.onnx`` file.

    Returns:
        The ``onnx.ModelProto`` with all weights in memory.

    Raises:
        ModelLoadError: the file is missing, is not an ONNX protobuf, refers to external data
            outside its folder, fails ``onnx.checker``, or its external data cannot be read.
    """
    import onnx
    import onnx.external_data_helper

    path = pathlib.Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file '{path}' does not exist or is not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelLoadError(f"'{path.name}' is not a readable ONNX protobuf file: {first_line(e, 200)}") from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(f"'{path.name}' is not an ONNX model (no graph or no opset imports)")
    _check_external_locations(proto, path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ModelLoadError(f"ONNX file '{path.name}' fails onnx.checker: {first_line(e, 200)}") from None
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(path.resolve().parent))
    except Exception as e:
        raise ModelLoadError(f"ONNX file '{path.name}': cannot read its external data: {first_line(e, 200)}") from None
    return proto


# --- example inputs -------------------------------------------------------------------------

_BATCH_NAMES = {"n", "b", "bs", "batch", "batch_size", "batchsize", "num_batches"}
#: Token ids are drawn from [0, _ID_HIGH) — or fewer if an embedding table says the vocab is smaller.
_ID_HIGH = 100
#: Symbolic non-batch dims (sequence length, spatial size, ...) are set to this.
_OTHER_DIM = 16


def _is_batch_dim(dim: str | None, axis: int, rank: int) -> bool:
    if dim is not None and ("batch" in dim.lower() or dim.lower() in _BATCH_NAMES):
        return True
    return axis == 0 and rank >= 2


def _vocab_size(proto: Any, input_name: str) -> int | None:
    """The row count of an initializer table that ``Gather`` indexes with this input, if any."""
    tables = {t.name: t for t in proto.graph.initializer}
    sizes = [
        tables[node.input[0]].dims[0]
        for node in proto.graph.node
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == input_name
        and node.input[0] in tables and tables[node.input[0]].dims
    ]
    return min(sizes) if sizes else None


def _named(dim: Any) -> bool:
    """A symbolic dim with a real name (``batch``, ``p2o.DynamicDimension.0``), not an anonymous ``?``."""
    return isinstance(dim, str) and any(c.isalnum() for c in dim)


def _known_dims(specs: Sequence[Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Symbolic dim name -> size, read off the inputs whose shapes are known.

    Raises:
        InputError: one dim name given two different sizes (``batch`` is 1 in one input, 2 in another).
    """
    known: dict[str, int] = {}
    seen_in: dict[str, str] = {}
    for spec in specs:
        shape = shapes.get(spec.name)
        if shape is None or spec.dims is None or len(shape) != len(spec.dims):
            continue
        for dim, size in zip(spec.dims, shape):
            if not _named(dim):
                continue
            if known.setdefault(dim, size) != size:
                raise InputError(f"dim '{dim}' is {known[dim]} in input '{seen_in[dim]}' but {size} in input '{spec.name}'")
            seen_in.setdefault(dim, spec.name)
    return known


def _synthesized_value(proto: Any, name: str, shape: tuple[int, ...], dtype: np.dtype, rng: Any) -> np.ndarray:
    lower = name.lower()
    if dtype.kind in "iu":
        if "mask" in lower:
            return np.ones(shape, dtype)
        if "token_type" in lower:
            return np.zeros(shape, dtype)
        if "position" in lower and len(shape) >= 1:
            return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        if "ids" in lower:
            vocab = _vocab_size(proto, name)
            high = min(_ID_HIGH, vocab) if vocab else _ID_HIGH
            return rng.integers(0, high, size=shape).astype(dtype)
        return np.zeros(shape, dtype)
    if dtype.kind == "b":
        return np.ones(shape, dtype)
    if dtype.kind in "fc":
        return rng.standard_normal(shape).astype(dtype)
    raise InputError(f"cannot make up a value for ONNX input '{name}' of dtype {dtype}; give it (e.g. --inputs FILE.npz)")


def example_inputs_for(
    proto: Any,
    seed: int = 0,
    *,
    given: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, tuple[tuple[int, ...], np.dtype | None]] | None = None,
) -> dict[str, np.ndarray]:
    """One value per runtime graph input: the ``given`` arrays, the rest made up from the graph's types.

    Shapes of made-up inputs: ``shapes[name]`` (shape, optional dtype) when the user stated it;
    otherwise static dims are kept, and a symbolic dim takes the size the same dim name has in a
    given or shaped input (``batch``, ``seq_len`` ...). A dim still unknown is 1 if it is a batch dim
    (its name contains "batch" or is N/B/bs, or it is axis 0 of an input of rank >= 2) and 16
    otherwise.

    Values (seeded, so reruns agree):

    - integer inputs whose name mentions ``mask``: ones; ``token_type``: zeros; ``position_ids``:
      ``0..L-1`` along the last axis; other ``*ids*``: random ints in ``[0, 100)`` (fewer if a
      ``Gather`` on an embedding table shows a smaller vocabulary); any other integer input: zeros.
    - boolean inputs: True.
    - floating-point inputs: standard normal.

    Args:
        proto: the ``onnx.ModelProto``.
        seed: the random seed.
        given: arrays by input name, used as they are.
        shapes: ``{name: (shape, dtype or None)}`` for inputs to make up at a stated shape.

    Returns:
        ``{input name: numpy array}`` in graph-input order.

    Raises:
        InputError: a name the model does not have; an input that is not a tensor (sequence, map,
            optional) or has an unsupported element type and was not given; a stated shape or dtype
            that contradicts the model; one dim name given two sizes.
    """
    from ptool.ir.onnx_module import input_specs

    given, shapes = dict(given or {}), dict(shapes or {})
    specs = input_specs(proto)
    names = [s.name for s in specs]
    for name in [*given, *shapes]:
        if name not in names:
            raise InputError(f"the ONNX model has no input '{name}'{did_you_mean(name, names)} (inputs: {', '.join(names)})")
    known = _known_dims(specs, {**{n: s for n, (s, _) in shapes.items()}, **{n: a.shape for n, a in given.items()}})
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name in given:
            feeds[spec.name] = given[spec.name]
            continue
        stated_shape, stated_dtype = shapes.get(spec.name, (None, None))
        dtype = spec.dtype if stated_dtype is None else np.dtype(stated_dtype)
        if dtype is None or (spec.dims is None and stated_shape is None):
            raise InputError(
                f"cannot make up a value for ONNX input '{spec.name}' (not a tensor of known rank and type); "
                "give it (--inputs FILE.npz, or example_inputs= in Python)"
            )
        if spec.dtype is not None and stated_dtype is not None and dtype != spec.dtype:
            raise InputError(f"input '{spec.name}' is {spec.dtype} in the model, not {dtype}")
        if stated_shape is not None:
            _check_static_dims(spec, stated_shape)
            shape = tuple(stated_shape)
        else:
            rank = len(spec.dims)
            shape = tuple(
                d if isinstance(d, int) and d > 0
                else known[d] if _named(d) and d in known
                else 1 if _is_batch_dim(d if isinstance(d, str) else None, axis, rank)
                else _OTHER_DIM
                for axis, d in enumerate(spec.dims)
            )
        feeds[spec.name] = _synthesized_value(proto, spec.name, shape, dtype, rng)
    return feeds


def _check_static_dims(spec: Any, shape: tuple[int, ...]) -> None:
    if spec.dims is None:
        return
    if len(shape) != len(spec.dims):
        raise InputError(f"input '{spec.name}' has rank {len(spec.dims)} in the model ({spec.describe()}), "
                         f"not {len(shape)}")
    for axis, (want, got) in enumerate(zip(spec.dims, shape)):
        if isinstance(want, int) and want > 0 and got != want:
            raise InputError(f"input '{spec.name}' has size {want} on axis {axis} in the model ({spec.describe()}), "
                             f"not {got}")


# --- transform -----------------------------------------------------------------------------

def _as_call(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """``example_inputs`` (positional, one tensor or array, or a dict by input name) plus ``example_kwargs``."""
    kwargs = dict(example_kwargs or {})
    if example_inputs is None:
        return (), kwargs
    if isinstance(example_inputs, Mapping):
        return (), {**dict(example_inputs), **kwargs}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), kwargs
    return (example_inputs,), kwargs


def example_call(proto: Any, example_inputs: Any, example_kwargs: dict | None = None) -> dict[str, np.ndarray]:
    """The feeds of ``transform``'s ``example_inputs`` / ``example_kwargs`` (see :func:`example_feeds`)."""
    return example_feeds(proto, *_as_call(example_inputs, example_kwargs))


def example_feeds(proto: Any, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
    """The feeds of one example call; inputs it leaves out are made up (:func:`example_inputs_for`),
    with a warning that names them and says how to give them."""
    from ptool.ir.onnx_module import input_specs, partial_feeds

    specs = input_specs(proto)
    given = partial_feeds(specs, args, kwargs)
    if len(given) == len(specs):
        return given
    feeds = example_inputs_for(proto, given=given)
    made_up = ", ".join(f"{n} {tuple(v.shape)} {v.dtype}" for n, v in feeds.items() if n not in given)
    warnings.warn(f"made up ONNX input(s) {made_up} from the model's declared types; give real ones as "
                  "example_inputs={name: array} (CLI: --input NAME=SHAPE[:DTYPE] or --inputs FILE.npz)",
                  stacklevel=3)
    return feeds
