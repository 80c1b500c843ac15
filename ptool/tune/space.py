"""The search space: pass pipelines x backends x backend options, declared by the parts themselves.

Passes join the space by declaring the configurations worth trying as a class variable::

    class Quantize(Pass):
        tuning_candidates: ClassVar[tuple[str, ...]] = ("quantize:mode=int8-dynamic",)

(a classmethod returning the specs works too). Exact passes need no declaration: the exact
default pipeline (cleanup, fold-bn) is the base of every candidate. Each approximate candidate is
tried on top of that base and kept only while its fidelity stays within ``max_error``.

Backends declare their option variants with a module-level ``tuning_variants(fingerprint,
tvm_trials=0)`` returning a list of option dicts (the first is the backend's default); a backend
without one is tried with its defaults only. A backend that cannot run a number format fast declares
``tuning_left_out(formats, options)`` returning the reason (ONNX Runtime's CPU provider and bf16):
such candidates get one row with it and are never built.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ptool.errors import UsageError, did_you_mean

if TYPE_CHECKING:
    from ptool.tune.fingerprint import DeviceFingerprint

__all__ = ["TuningConfig", "backend_variants", "declared_pass_candidates", "available_backends", "split_passes"]


@dataclass(frozen=True)
class TuningConfig:
    """One point of the search space, re-appliable: ``ptool.transform`` then ``ptool.compile``.

    Attributes:
        passes: pass specs, in order (the exact base pipeline plus at most one approximate pass).
        backend: ``torch``, ``onnxruntime`` or ``tvm``.
        options: backend options as sorted ``(key, value)`` pairs (values JSON-serializable).
    """

    passes: tuple[str, ...]
    backend: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, passes: Sequence[str], backend: str, options: dict[str, Any] | None = None) -> TuningConfig:
        return cls(tuple(passes), backend, tuple(sorted((options or {}).items())))

    @property
    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def backend_label(self) -> str:
        """``onnxruntime[intra_op_threads=2]`` (the backend alone with default options)."""
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.backend}[{opts}]" if opts else self.backend

    def label(self, base: Sequence[str] = ()) -> str:
        """A short row label: extra passes over ``base`` (or ``exact``) + backend and options."""
        extra = [p for p in self.passes if p not in base]
        return f"{' + '.join(extra) if extra else 'exact'} | {self.backend_label}"

    def to_dict(self) -> dict:
        return {"passes": list(self.passes), "backend": self.backend, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: dict) -> TuningConfig:
        return cls.make(d["passes"], d["backend"], d.get("options") or {})

    def apply(self, model: Any, example_inputs: Any = None, *, example_kwargs: dict | None = None,
              calibration: Any = None, device: str = "cpu") -> Any:
        """Transform ``model`` with :attr:`passes` and compile it for :attr:`backend`; returns the callable."""
        import ptool

        m2 = ptool.transform(model, list(self.passes), example_inputs, example_kwargs=example_kwargs,
                             calibration=calibration)
        return ptool.compile(m2, backend=self.backend, device=device, **self.options_dict)

    def __str__(self) -> str:
        return f"passes [{', '.join(self.passes) or 'none'}] on {self.backend_label}"


def declared_pass_candidates() -> list[str]:
    """The specs every registered pass declares through ``tuning_candidates`` (see the module docstring)."""
    from ptool.passes.registry import registry

    specs: list[str] = []
    for cls in registry().values():
        declared = getattr(cls, "tuning_candidates", ())
        if callable(declared):
            declared = declared()
        specs.extend(str(s) for s in declared or ())
    return specs


def split_passes(specs: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """User pass specs -> (exact ones, joining the base pipeline; approximate ones, each a candidate).

    Raises:
        PassError: an unknown pass or option (parsed here, once, before anything runs).
    """
    from ptool.passes.registry import parse_pass

    exact, approximate = [], []
    for spec in specs or ():
        p = parse_pass(spec)
        (exact if p.exact else approximate).append(p.spec())
    return exact, approximate


def precision_candidates(specs: Sequence[str], fp: DeviceFingerprint) -> tuple[list[tuple[str, ...]],
                                                                              list[tuple[tuple[str, ...], str]]]:
    """The approximate candidates with the precision dimension: each spec alone, and every integer
    ``quantize`` spec followed by every usable ``precision`` spec (integer matmuls, the rest in
    bf16/fp16). Candidates whose number format the device cannot run fast are returned apart, with
    the reason (the fingerprint's flags: ``avx512_bf16`` / ``amx_bf16``, VNNI / ``amx_int8``, a GPU's
    compute capability).

    Returns:
        ``(candidates, left_out)``: pass-spec tuples to try, and ``(specs, reason)`` pairs.
    """
    from ptool.passes.registry import parse_pass

    usable: list[str] = []
    left_out: list[tuple[tuple[str, ...], str]] = []
    precisions, integer = [], []
    for spec in specs:
        p = parse_pass(spec)
        formats = _number_formats(p)
        verdicts = {f: fp.supports(f) for f in formats}
        missing = [f"{f} left out: {why}" for f, (ok, why) in verdicts.items() if not ok]
        if missing:
            left_out.append(((spec,), "; ".join(missing)))
            continue
        usable.append(spec)
        if p.name == "precision":
            precisions.append(spec)
        elif "int8" in formats:
            integer.append(spec)
    candidates = [(s,) for s in usable] + [(q, p) for q in integer for p in precisions]
    return candidates, left_out


def backend_left_out(backend: str, specs: Sequence[str], options: dict[str, Any]) -> str | None:
    """Why ``backend`` with ``options`` should not build the candidate ``specs`` (None: build it), as the
    backend declares it with a module-level ``tuning_left_out(formats, options)``: given the number
    formats the candidate's passes compute in, a backend that has no kernels for one says so."""
    from ptool.backends import _MODULES
    from ptool.passes.registry import parse_pass

    declare = getattr(importlib.import_module(_MODULES[backend]), "tuning_left_out", None)
    if declare is None:
        return None
    formats = {f for s in specs for f in _number_formats(parse_pass(s))}
    return declare(formats, options) if formats else None


def _number_formats(p: Any) -> list[str]:
    """The number formats a pass computes its matmuls in, where the hardware decides their speed
    (``quantize:attention=bf16``: int8 linears, bf16 attention products)."""
    if p.name == "precision":
        return [p.dtype]
    if p.name != "quantize":
        return []
    formats = ["int8"] if p.mode.startswith("int8") else []
    return formats + (["bf16"] if p.attention == "bf16" else [])


# -- backends ----------------------------------------------------------------------------------------


_REQUIRES = {"onnxruntime": "onnxruntime", "tvm": "tvm", "torch": "torch"}


def available_backends() -> list[str]:
    """Backends whose library is installed, in :data:`ptool.backends.BACKENDS` order."""
    from ptool.backends import BACKENDS

    return [b for b in BACKENDS if importlib.util.find_spec(_REQUIRES[b]) is not None]


def check_backends(names: Sequence[str] | str | None) -> list[str]:
    """Validate ``backends=`` (a list or a comma-separated string); default: every installed one."""
    from ptool.backends import BACKENDS

    if names is None:
        return available_backends()
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise UsageError(f"backends= is empty (allowed: {', '.join(BACKENDS)})")
    for b in names:
        if b not in BACKENDS:
            raise UsageError(f"unknown backend '{b}' (allowed: {', '.join(BACKENDS)}){did_you_mean(b, BACKENDS)}")
        if importlib.util.find_spec(_REQUIRES[b]) is None:
            raise UsageError(f"backend '{b}' needs the '{_REQUIRES[b]}' package, which is not installed")
    return list(dict.fromkeys(names))


def approximate_variants(backend: str, variants: list[dict[str, Any]], best: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The option dicts an approximate candidate is tried with on ``backend``: the best variant of the
    exact pipeline, plus those of ``variants`` the backend marks with ``REDUCED_PRECISION_VARIANTS``
    (a variant that loses on float32 can win on bf16 / int8: torch's Inductor freezing pre-packs
    the bf16 weights and fuses the int8 quantization, and is slower than eager on float32 here)."""
    from ptool.backends import _MODULES

    marked = getattr(importlib.import_module(_MODULES[backend]), "REDUCED_PRECISION_VARIANTS", ())
    out = [best] if best is not None else [variants[0]] if variants else [{}]
    out += [v for v in variants if v in marked and v not in out]
    return out


def backend_variants(backend: str, fp: DeviceFingerprint, *, tvm_trials: int = 0) -> list[dict[str, Any]]:
    """Option dicts to try for ``backend`` (the first is its default), as the backend declares them."""
    from ptool.backends import _MODULES

    declare = getattr(importlib.import_module(_MODULES[backend]), "tuning_variants", None)
    variants = declare(fp, tvm_trials=tvm_trials) if declare else [{}]
    for v in variants:
        json.dumps(v)  # records are JSON: a declaration must stick to JSON values
    return variants
