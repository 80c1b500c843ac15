"""What every backend shares: the call contract, typed options, and the compiled-model wrapper.

A backend is compiled from one example call. From it we learn, once:

- the *input layout*: the example ``(args, kwargs)`` bound to ``forward``'s signature, put in
  signature order and flattened with torch's pytree. Tensor leaves become the compiled model's
  inputs, in that order (this is also the order ``torch.export`` and the ONNX exporter use, so
  a graph input ``i`` is flat tensor leaf ``i``). Non-tensor leaves (ints, flags) are
  specialized by ``torch.export``; a later call must pass the same values.
- the *output layout*: the module's own output on the example (tuple, dict, Hugging Face
  ``ModelOutput``...), flattened the same way. Backends return a flat list of tensors and
  :class:`CompiledModel` rebuilds the structure, so ``compiled(x)`` looks like ``module(x)``.

Options are parsed once, here at the edge, into a frozen dataclass per backend.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import torch
import torch.utils._pytree as pytree

from ptool.errors import InputError, PassError, UsageError, did_you_mean, first_line
from ptool.inputs import check_inputs
from ptool.options import describe_type, parse_value

# --------------------------------------------------------------------------------------------
# Options


def _check_value(tp: Any, value: Any, where: str) -> Any:
    """Validate an already-typed Python value against a field type (no silent coercion)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _check_value(arg, value, where)
            except UsageError:
                continue
        raise UsageError(f"{where}: {value!r} is not allowed (allowed: {describe_type(tp)})")
    if origin is Literal:
        if value in get_args(tp):
            return value
        allowed = [str(a) for a in get_args(tp)]
        raise UsageError(
            f"{where}: {value!r} is not allowed (allowed: {describe_type(tp)}){did_you_mean(str(value), allowed)}"
        )
    if tp is type(None):
        if value is None:
            return None
        raise UsageError(f"{where}: expected none, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UsageError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise UsageError(f"{where}: {value!r} is not a valid value (allowed: {describe_type(tp)})")


def _from_text(tp: Any, text: str, where: str) -> Any:
    """Parse a CLI string (``"intra_op_threads=2"``) with the pass-option parser, as UsageError."""
    try:
        return parse_value(tp, text, where=where)
    except PassError as e:
        raise UsageError(str(e)) from None


def parse_options(cls: type, backend: str, options: Mapping[str, Any]) -> Any:
    """Build the frozen options dataclass ``cls`` of ``backend`` from user options.

    Values may be typed Python values or CLI strings (``"2"``, ``"true"``); both are checked
    against the field's type.

    Raises:
        UsageError: an unknown key (naming the allowed keys) or a bad value (naming the allowed
            values).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for raw_key, value in options.items():
        key = raw_key.replace("-", "_")
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise UsageError(
                f"backend '{backend}' has no option '{raw_key}' (allowed: {allowed}){did_you_mean(key, fields)}"
            )
        tp = fields[key]
        where = f"backend '{backend}' option '{key}'"
        if isinstance(value, str) and tp is not str and tp is not Any and not _accepts_str(tp):
            kwargs[key] = _from_text(tp, value, where)
        else:
            kwargs[key] = _check_value(tp, value, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"backend '{backend}': {first_line(e)}") from None


def _accepts_str(tp: Any) -> bool:
    """True if a plain string is itself a valid value (``str`` / Literal of strings)."""
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return False  # Literal strings go through the checker (exact match, did-you-mean)
    if get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in get_args(tp))
    return False


def options_dict(opts: Any) -> dict[str, Any]:
    """A backend options dataclass as a plain dict (what ``CompiledModel.options`` shows)."""
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


# --------------------------------------------------------------------------------------------
# The call contract


def _describe_leaf(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)}:{str(x.dtype).removeprefix('torch.')}"
    return repr(x) if isinstance(x, (int, float, bool, str, type(None))) else type(x).__name__


@dataclass(frozen=True)
class CallConvention:
    """How a module wants to be called: its signature, and for an unlifted ``ExportedProgram``
    module, which arguments must be positional and which keywords.

    ``ExportedProgram.module()`` checks every call against the exported ``(args, kwargs)``
    structure, so a module exported with ``(ids,), {"attention_mask": m}`` rejects ``(ids, m)``;
    this convention lets the compiled model accept either spelling and pass on the right one.
    """

    signature: inspect.Signature | None
    num_positional: int | None = None
    keywords: tuple[str, ...] | None = None

    @classmethod
    def of(cls, module: Any) -> CallConvention:
        fn = getattr(module, "forward", module)
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None
        in_spec = getattr(module, "_in_spec", None)
        try:
            args_spec, kwargs_spec = in_spec.children()
            if args_spec.type is tuple and kwargs_spec.type is dict:
                return cls(sig, args_spec.num_children, tuple(kwargs_spec.context))
        except Exception:  # no spec, or not the (args, kwargs) shape: plain signature binding
            pass
        return cls(sig)

    def canonical(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Bind ``(args, kwargs)`` and return them in the module's preferred spelling.

        Positional prefix stays positional; everything else becomes keywords ordered as the
        signature lists them (``**kwargs`` extras sorted by name). Two calls that mean the same
        thing (``m(ids, mask)`` vs ``m(input_ids=ids, attention_mask=mask)``) flatten to the same
        leaves.

        Raises:
            InputError: the arguments do not fit the signature.
        """
        sig = self.signature
        if sig is None:
            return tuple(args), dict(kwargs)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise InputError(f"inputs do not fit forward{sig}: {e}") from None
        if self.num_positional is not None and self.keywords is not None:
            names = [n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            values = [bound.arguments[n] for n in names if n in bound.arguments]
            if len(values) == len(names) == self.num_positional + len(self.keywords):
                by_name = dict(zip(names, values))
                if all(k in by_name for k in self.keywords):
                    return tuple(values[: self.num_positional]), {k: by_name[k] for k in self.keywords}
        return _signature_order(sig, bound)


def _signature_order(sig: inspect.Signature, bound: inspect.BoundArguments) -> tuple[tuple, dict]:
    out_args: list[Any] = []
    out_kwargs: dict[str, Any] = {}
    positional = True
    for name, param in sig.parameters.items():
        if name not in bound.arguments:
            if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD, param.VAR_POSITIONAL):
                positional = False
            continue
        value = bound.arguments[name]
        if param.kind is param.VAR_POSITIONAL:
            out_args.extend(value)
        elif param.kind is param.VAR_KEYWORD:
            out_kwargs.update(sorted(value.items()))
        elif positional and param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            out_args.append(value)
        else:
            positional = False
            out_kwargs[name] = value
    return tuple(out_args), out_kwargs


def canonical_call(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``CallConvention.of(module).canonical(args, kwargs)``."""
    return CallConvention.of(module).canonical(args, kwargs)


@dataclass(frozen=True)
class InputLayout:
    """How one call's ``(args, kwargs)`` map to the flat tensor inputs of a compiled graph.

    Attributes:
        convention: how the module is called (see :class:`CallConvention`).
        spec: pytree spec of the canonical example ``(args, kwargs)``.
        tensor_leaves: indices of the flat leaves that are tensors (graph inputs, in order).
        constants: the non-tensor leaves, which the compiled graph specialized.
        dtypes / shapes: the example tensors' dtypes and shapes, in graph-input order.
        names: a readable name per graph input (``input_ids``, ``pair_0``...), from the signature.
        leaf_names: the same for every leaf, tensors or not.
    """

    convention: CallConvention
    spec: Any
    tensor_leaves: tuple[int, ...]
    constants: dict[int, Any]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]
    leaf_names: tuple[str, ...]

    @classmethod
    def from_example(cls, convention: CallConvention, args: tuple, kwargs: dict) -> InputLayout:
        leaves_with_path, spec = pytree.tree_flatten_with_path((args, kwargs))
        tensor_leaves, constants, dtypes, shapes = [], {}, [], []
        sig = convention.signature
        params = list(sig.parameters) if sig is not None else []
        leaf_names = tuple(_input_name(path, params, i) for i, (path, _) in enumerate(leaves_with_path))
        for i, (_, leaf) in enumerate(leaves_with_path):
            if isinstance(leaf, torch.Tensor):
                tensor_leaves.append(i)
                dtypes.append(leaf.dtype)
                shapes.append(tuple(leaf.shape))
            else:
                constants[i] = leaf
        names = tuple(leaf_names[i] for i in tensor_leaves)
        return cls(
            convention, spec, tuple(tensor_leaves), constants, tuple(dtypes), tuple(shapes), names, leaf_names
        )

    def flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The graph inputs for one call, checked against the example's structure.

        Raises:
            InputError: a different set of arguments, a changed specialized constant, or a
                tensor where the example had none (and vice versa).
        """
        args, kwargs = self.convention.canonical(args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.spec:
            raise InputError(
                f"inputs have a different structure than the example call ({self.describe()}); "
                "compile again with example inputs of the structure you call with"
            )
        for i, expected in self.constants.items():
            got = leaves[i]
            if isinstance(got, torch.Tensor) or type(got) is not type(expected) or got != expected:
                raise InputError(
                    f"input '{self.leaf_names[i]}' is {_describe_leaf(got)} but the compiled model specialized it to "
                    f"{_describe_leaf(expected)}; compile again with that value"
                )
        tensors = []
        for name, i in zip(self.names, self.tensor_leaves):
            leaf = leaves[i]
            if not isinstance(leaf, torch.Tensor):
                raise InputError(f"input '{name}' must be a tensor, got {_describe_leaf(leaf)}")
            tensors.append(leaf)
        return tensors

    def describe(self) -> str:
        return ", ".join(
            f"{n}{list(s)}:{str(d).removeprefix('torch.')}" for n, s, d in zip(self.names, self.shapes, self.dtypes)
        )


def _input_name(path: tuple, params: list[str], index: int) -> str:
    """``((SequenceKey(0), SequenceKey(1)), ...)`` -> ``attention_mask`` (as torch.export names it)."""
    parts: list[str] = []
    if len(path) >= 2 and isinstance(path[0], pytree.SequenceKey):
        top, key = path[0].idx, path[1]
        if top == 0 and isinstance(key, pytree.SequenceKey):
            parts.append(params[key.idx] if key.idx < len(params) else f"input_{key.idx}")
        elif isinstance(key, pytree.MappingKey):
            parts.append(str(key.key))
        for entry in path[2:]:
            parts.append(_key_str(entry))
    name = "_".join(p for p in parts if p)
    return sanitize_name(name) or f"input_{index}"


def _key_str(entry: Any) -> str:
    if isinstance(entry, pytree.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, pytree.MappingKey):
        return str(entry.key)
    if isinstance(entry, pytree.GetAttrKey):
        return entry.name
    return str(entry)


def sanitize_name(name: str) -> str:
    """Keep graph value names to ``[A-Za-z0-9_]`` so every tool accepts them."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name).strip("_")


def output_names(spec: Any, count: int) -> list[str] | None:
    """Readable names for the tensor leaves of an output spec, or None if they do not line up.

    A single tensor is ``output``; a tuple gives ``output_0``, ``output_1``; dict and
    ``ModelOutput`` fields give their keys (``last_hidden_state``); nesting joins with ``_``.
    """
    try:
        if spec.num_leaves != count:
            return None
        dummy = pytree.tree_unflatten([torch.empty(0) for _ in range(count)], spec)
        paths = [path for path, _ in pytree.tree_flatten_with_path(dummy)[0]]
    except Exception:  # an exotic container: keep the exporter's names
        return None
    names = []
    for path in paths:
        parts = [_key_str(e) for e in path]
        if not parts:
            name = "output"
        elif isinstance(path[0], pytree.SequenceKey):
            name = "output_" + "_".join(parts)
        else:
            name = "_".join(parts)
        names.append(sanitize_name(name) or f"output_{len(names)}")
    return names if len(set(names)) == len(names) else None


@dataclass(frozen=True)
class OutputLayout:
    """The module's output structure: which leaves are tensors, and the rest as constants."""

    spec: Any
    tensor_leaves: tuple[int, ...]
    constants: dict[int, Any]

    @classmethod
    def from_reference(cls, reference: Any) -> OutputLayout:
        leaves, spec = pytree.tree_flatten(reference)
        tensor_leaves = tuple(i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor))
        constants = {i: x for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor)}
        return cls(spec, tensor_leaves, constants)

    @property
    def num_tensors(self) -> int:
        return len(self.tensor_leaves)

    def names(self) -> list[str]:
        """Readable names of the tensor outputs (``last_hidden_state``, ``output_0``...)."""
        all_names = output_names(self.spec, self.spec.num_leaves)
        if all_names is None:
            return [f"output_{i}" for i in range(self.num_tensors)]
        return [all_names[i] for i in self.tensor_leaves]

    def unflatten(self, tensors: Sequence[torch.Tensor]) -> Any:
        if len(tensors) != self.num_tensors:
            raise AssertionError(f"backend returned {len(tensors)} outputs, expected {self.num_tensors}")
        leaves: list[Any] = [None] * self.spec.num_leaves
        for i, t in zip(self.tensor_leaves, tensors):
            leaves[i] = t
        for i, c in self.constants.items():
            leaves[i] = c
        return pytree.tree_unflatten(leaves, self.spec)


@dataclass(frozen=True)
class ExampleCall:
    """One example call of a module, and what it taught us (layouts, reference output)."""

    module: Any
    args: tuple
    kwargs: dict
    inputs: InputLayout
    outputs: OutputLayout
    reference: Any

    @classmethod
    def run(cls, module: Any, example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> ExampleCall:
        """Canonicalize the example call and run the module once (no grad) for the reference.

        Raises:
            InputError: the example inputs are malformed or the module fails on them.
        """
        args, kwargs = check_inputs(example_inputs, example_kwargs)
        convention = CallConvention.of(module)
        args, kwargs = convention.canonical(args, kwargs)
        try:
            with torch.no_grad():
                reference = module(*args, **kwargs)
        except Exception as e:  # the user's module rejected its own example inputs
            shapes = ", ".join(_describe_leaf(a) for a in pytree.tree_leaves((args, kwargs)))
            raise InputError(
                f"the model fails on the example inputs ({shapes}): {type(e).__name__}: {first_line(e)}"
            ) from None
        return cls(
            module,
            args,
            kwargs,
            InputLayout.from_example(convention, args, kwargs),
            OutputLayout.from_reference(reference),
            reference,
        )

    def exportable(self) -> Any:
        """The module to hand to an exporter: itself, or wrapped if its output has non-tensors."""
        if not self.outputs.constants:
            return self.module
        return TensorOutputs(self.module, self.outputs)

    def flat(self) -> tuple[Any, tuple[torch.Tensor, ...]]:
        """``(FlatCall wrapper, its example tensors)``: tensors in, tensors out."""
        tensors = tuple(self.inputs.flatten(self.args, self.kwargs))
        return FlatCall(self.module, self.inputs, self.outputs), tensors


class TensorOutputs(torch.nn.Module):
    """Wrap a module so it returns only its output's tensor leaves, as a flat tuple.

    Exporters take tensors only (an ``int`` in the output breaks the ONNX translator); the
    compiled model puts the non-tensor leaves back from the example call.
    """

    def __init__(self, module: Any, layout: OutputLayout) -> None:
        super().__init__()
        self.inner = module
        self._tensor_leaves = layout.tensor_leaves

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        leaves = pytree.tree_leaves(self.inner(*args, **kwargs))
        return tuple(leaves[i] for i in self._tensor_leaves)


class FlatCall(torch.nn.Module):
    """Wrap a module as ``forward(*tensors) -> tuple of tensors``.

    The non-tensor inputs of the example call are baked in (the compiled graph specializes them
    anyway) and the non-tensor outputs dropped, for importers that take tensors only (TVM's
    exported-program frontend fails on a ``float`` input).
    """

    def __init__(self, module: Any, inputs: InputLayout, outputs: OutputLayout) -> None:
        super().__init__()
        self.inner = module
        self._inputs = inputs
        self._tensor_outputs = outputs.tensor_leaves

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layout = self._inputs
        leaves: list[Any] = [None] * layout.spec.num_leaves
        for i, t in zip(layout.tensor_leaves, tensors):
            leaves[i] = t
        for i, c in layout.constants.items():
            leaves[i] = c
        args, kwargs = pytree.tree_unflatten(leaves, layout.spec)
        out = pytree.tree_leaves(self.inner(*args, **kwargs))
        return tuple(out[i] for i in self._tensor_outputs)



# --------------------------------------------------------------------------------------------
# The compiled model


class CompiledModel:
    """A module compiled by one backend: call it like the module, get torch tensors back.

    Attributes:
        backend: the backend's name (``"torch"``, ``"onnxruntime"``, ``"tvm"``).
        options: the backend options in force, defaults included.
        onnx_path: the ONNX file the model runs from (ONNX-based backends), else None.
        info: facts the backend found while compiling (frontend used, target, build seconds...).
    """

    def __init__(
        self,
        *,
        backend: str,
        options: dict[str, Any],
        example: ExampleCall,
        run_flat: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]] | None = None,
        run_direct: Callable[..., Any] | None = None,
        onnx_path: Any = None,
        info: dict[str, Any] | None = None,
        keepalive: Any = None,
    ) -> None:
        if (run_flat is None) == (run_direct is None):
            raise AssertionError("give exactly one of run_flat / run_direct")
        self.backend = backend
        self.options = options
        self.onnx_path = onnx_path
        self.info = dict(info or {})
        self._example = example
        self._run_flat = run_flat
        self._run_direct = run_direct
        self._keepalive = keepalive  # e.g. the temp dir holding the ONNX file

    @property
    def example_inputs(self) -> tuple:
        return self._example.args

    @property
    def example_kwargs(self) -> dict:
        return self._example.kwargs

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._example.inputs.names

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._run_direct is not None:
            args, kwargs = self._example.inputs.convention.canonical(args, kwargs)
            return self._run_direct(*args, **kwargs)
        tensors = self._example.inputs.flatten(args, kwargs)
        outputs = self._run_flat(tensors)  # type: ignore[misc]
        return self._example.outputs.unflatten(list(outputs))

    def verify(self, *args: Any, **kwargs: Any) -> Any:
        """Compare this backend with the source module on one call (default: the example).

        Returns:
            a :class:`ptool.verify.Fidelity` (max abs/rel error, cosine, SQNR) vs eager torch.
        """
        from ptool.verify import compare

        if not args and not kwargs:
            args, kwargs, reference = self._example.args, self._example.kwargs, self._example.reference
        else:
            args, kwargs = self._example.inputs.convention.canonical(args, kwargs)
            with torch.no_grad():
                reference = self._example.module(*args, **kwargs)
        return compare(reference, self(*args, **kwargs))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"CompiledModel(backend={self.backend!r}, {opts})"


def cast_input(name: str, tensor: torch.Tensor, expected: torch.dtype) -> torch.Tensor:
    """Cast between integer (or bool->int) dtypes the way eager torch would accept; else raise.

    Token ids arrive as int32 or int64 alike; a float where the graph wants another float
    precision is a user error (eager torch would fail too), so it is reported, not converted.

    Raises:
        InputError: an incompatible dtype.
    """
    if tensor.dtype == expected:
        return tensor
    integral = not tensor.dtype.is_floating_point and not tensor.dtype.is_complex
    if integral and not expected.is_floating_point and not expected.is_complex and expected != torch.bool:
        return tensor.to(expected)
    raise InputError(
        f"input '{name}' has dtype {str(tensor.dtype).removeprefix('torch.')}, the compiled model "
        f"expects {str(expected).removeprefix('torch.')}"
    )


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Raise InputError if ``tensor`` does not fit ``expected`` (None = any size)."""
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        want = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
        raise InputError(
            f"input '{name}' has shape {list(shape)}, the compiled model expects {want}; "
            "compile with dynamic_shapes to vary it"
        )
