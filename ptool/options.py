"""Parse and format pass options: ``"name:key=value,key=value"`` <-> typed dataclass fields.

Options are parsed once, here at the edge, into the pass dataclass's field types (bool, int,
float, str, Enum, Literal, tuples of those, Optional). Passes never see raw strings.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin

from ptool.errors import PassError, did_you_mean

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_LIST_SEP = "+"  # "layers=0+1+2": commas already separate options
# Integer options reach torch (seeds, window widths, step counts), which takes 64-bit integers:
# a larger value would fail deep inside a pass with an OverflowError instead of here.
_INT_RANGE = (-(2**63), 2**63 - 1)


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``"name:key=value,key=value"`` into the name and raw option strings.

    Raises:
        PassError: on an option without ``=`` or an option given twice.
    """
    name, _, rest = spec.strip().partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise PassError(f"pass '{name}': option '{item}' must be written key=value")
        key = key.strip().replace("-", "_")
        if key in options:
            raise PassError(f"pass '{name}': option '{key}' given twice")
        options[key] = value.strip()
    return name.strip(), options


def _describe(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(str(m.value) for m in tp)
    if get_origin(tp) is Literal:
        return " | ".join(str(a) for a in get_args(tp))
    if get_origin(tp) in (tuple,):
        return f"{_describe(get_args(tp)[0])} joined by '{_LIST_SEP}'"
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def describe_type(tp: Any) -> str:
    """A short human description of the values a field type allows (for errors and docs)."""
    return _describe(tp)


def parse_value(tp: Any, text: str, *, where: str) -> Any:
    """Convert ``text`` to a value of type ``tp``; raise PassError naming ``where`` if it can't."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and text.lower() in {"none", ""}:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(arg, text, where=where)
            except PassError as e:
                errors.append(str(e))
        raise PassError(f"{where}: '{text}' is not a valid value (allowed: {_describe(tp)})")
    if origin is Literal:
        allowed = get_args(tp)
        for a in allowed:
            if str(a) == text:
                return a
        raise PassError(f"{where}: '{text}' is not allowed (allowed: {_describe(tp)}){did_you_mean(text, map(str, allowed))}")
    if origin is tuple:
        (item,) = get_args(tp)[:1]
        return tuple(parse_value(item, part, where=where) for part in text.split(_LIST_SEP) if part)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for m in tp:
            if str(m.value) == text or m.name.lower() == text.lower():
                return m
        values = [str(m.value) for m in tp]
        raise PassError(f"{where}: '{text}' is not allowed (allowed: {_describe(tp)}){did_you_mean(text, values)}")
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise PassError(f"{where}: '{text}' is not a boolean (allowed: true | false)")
    if tp in (int, float):
        try:
            value = tp(text)
        except ValueError:
            raise PassError(f"{where}: '{text}' is not a{'n' if tp is int else ''} {tp.__name__}") from None
        if tp is float and not math.isfinite(value):
            # nan/inf pass every range check written as a comparison that rejects (nan > 0 is
            # False but so is nan <= 0), and nan != nan breaks the spec round trip.
            raise PassError(f"{where}: '{text}' is not a finite float")
        if tp is int and not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            low, high = _INT_RANGE
            raise PassError(f"{where}: '{text}' is out of range (integers are 64-bit: {low}..{high})")
        return value
    if tp is str:
        return text
    raise PassError(f"{where}: options of type {tp} cannot be set from a string")


def format_value(value: Any) -> str:
    """Inverse of :func:`parse_value` for the CLI spelling."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return _LIST_SEP.join(format_value(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a pass dataclass's option fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_pass(cls: type, raw: dict[str, str]) -> Any:
    """Instantiate pass class ``cls`` from raw option strings, validating every key and value."""
    types_ = field_types(cls)
    kwargs = {}
    for key, text in raw.items():
        if key not in types_:
            allowed = ", ".join(types_) or "none"
            raise PassError(
                f"pass '{cls.name}' has no option '{key}' (allowed: {allowed}){did_you_mean(key, types_)}"
            )
        kwargs[key] = parse_value(types_[key], text, where=f"pass '{cls.name}' option '{key}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PassError(f"pass '{cls.name}': {e}") from None
