"""Property-based fuzz of the whole registry: option strings, then random pipelines on fixture models.

**Option strings** (no model, milliseconds per example). For every registered pass:

- a valid spec, written in any accepted spelling (``-`` or ``_`` in keys, ``yes``/``ON``/``0`` for
  booleans, padding, empty items), parses to the values written, and ``spec()`` round-trips;
- an invalid one (unknown option, a value of the wrong type, a value out of range, nan/inf, an
  integer past 64 bits, ``key`` without ``=``, an option given twice, an unknown pass) raises
  ``PassError`` naming the pass and the option (or saying what syntax is allowed);
- arbitrary text after ``name:`` gives a pass or a ``PassError`` - never another exception.

**Pipelines.** One to four passes drawn from the whole registry (any order, repeats allowed, any
valid options, costly ones - training steps, feature widths - kept small) run by ``run_pipeline``
on a deep copy of a fixture captured once per test module, with calibration data and verification on
the example batch plus a held-out batch. Properties:

- a pass fails only with a ptool error that names it, never with a torch exception (the manager
  wraps those as ``pass '...' failed (RuntimeError: ...)``: that is a crash, i.e. a bug). The one
  user error a random pipeline may trigger is a ``layers=`` selection the model does not have;
- an exact pass never drifts past its tolerance (the manager raises ``VerificationError``: a bug),
  and an all-exact pipeline stays within the sum of its passes' tolerances of the original model;
- a pass that rewrote nothing left the outputs bit-identical and the node count unchanged;
- every pass keeps the output structure and finite outputs;
- an approximate pass stays within its declared bound *where it claims it* (:data:`CLAIMS`).

Where approximate passes claim their bound: the bound of a ``Lossy`` pass is measured at its
reference configuration (its docstring, and ``test_conformance.py``) and recorded as
``within_contract`` for every other one, "because the user or the autotuner decides what is
acceptable" (``ptool/pipeline/manager.py``). The fuzz found these configurations outside the bounds on the
random-weight fixtures; each is documented behaviour of the method, not a bug, so it is left out of
:data:`CLAIMS` rather than loosening the bound:

- ``repbn`` without a >= 60-step fine-tune (0.11-0.94 on the ViT): its docstring says the bound is
  what a fine-tune reaches and a post-training replacement does not;
- ``sigmoid-attention`` on the causal Llama with fewer than its 200 conversion steps (0.89): its
  rows are not normalized, so early causal rows start far off until the bias is trained;
- ``linear-attention`` with another feature map or an under-trained conversion (``transfer_steps``
  below the default): e.g. TransNormer's NormAttention (unit-RMS output, 0.2-0.3 on the Llama and
  the ViT: "distillation sets the scale"), the sliding-window hybrid (its window weight starts at
  0.9: 0.84-0.93);
- ``softplus-attention:reweight=true`` (LSSAR sharpening, 0.80-0.86 on near-uniform rows) and
  ``sparse-attention`` with a window or top-k much narrower than the sequence: they drop most keys
  by design;
- ``log-quant`` at 2 bits, with a fixed ``log2``/``sqrt2`` base, or a non-default ``gelu_shift``
  (0.89-0.95 on the ViT): its docstring claims the bound for the adaptive base at >= 3 bits;
- ``quantize:mode=int8-static,observer=percentile`` clipping at a percentile below 99 (0.26 at
  50.5, 0.74 at 90 on the ViT): clipping 10% of every activation is the option doing what it says.

Example counts: the CI defaults below - 550 option-string examples and 120 pipelines (24 on each
of 5 fixtures), about 30 s under ``pytest -n 2`` on 2 cores. ``PTOOL_FUZZ_EXAMPLES=N`` runs N
examples in every test (N pipelines per fixture);
``PTOOL_FUZZ_SEED=S`` turns derandomization off and seeds the run (S=0: a fresh random seed);
``PTOOL_FUZZ_MODELS=a,b`` picks the zoo fixtures; ``PTOOL_FUZZ_LOG=path`` appends one JSON line per
pass run (for ``tools/fuzz_pipelines.py``, the nightly runner, which sets them).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import typing
import zlib
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import pytest
import torch
from hypothesis import HealthCheck, example, given, note, seed, settings
from hypothesis import strategies as st

import ptool
from ptool.errors import PassError, PtoolError, VerificationError
from ptool.frontends.torch_export import capture
from ptool.options import field_types
from ptool.passes.base import Pass, PassContext
from ptool.passes.quant.logquant import GELU_SHIFT
from ptool.passes.quant.quantize import Quantize
from ptool.passes.registry import parse_pass, registry
from ptool.pipeline.fx_ir import FxIR, run_reference
from ptool.pipeline.manager import run_pipeline
from ptool.verify import EPS_FACTOR, Close, Exact, compare_many
from tests.models import zoo

PASSES = registry()
NAMES = sorted(PASSES)
INT64 = (-(2**63), 2**63 - 1)
TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}  # any case

# ---------------------------------------------------------------------------------------------
# run settings (env vars so the nightly runner can scale the same tests up)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


_EXAMPLES = _env_int("PTOOL_FUZZ_EXAMPLES", 0)  # 0: the CI count of each test
_SEED = os.environ.get("PTOOL_FUZZ_SEED", "")
MODELS = [m for m in os.environ.get("PTOOL_FUZZ_MODELS", "resnet,repvgg,bert,llama,vit").split(",") if m]
_LOG = os.environ.get("PTOOL_FUZZ_LOG", "")


def fuzz_settings(ci_examples: int):
    """Deterministic in CI (``derandomize``); seeded and random when ``PTOOL_FUZZ_SEED`` is set."""
    randomized = bool(_SEED)
    common = settings(max_examples=_EXAMPLES or ci_examples, deadline=None, database=None,
                      derandomize=not randomized, print_blob=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                             HealthCheck.filter_too_much])

    def apply(test):
        test = common(test)
        return seed(int(_SEED))(test) if randomized and int(_SEED) else test

    return apply


# ---------------------------------------------------------------------------------------------
# option values: every valid value, and values each option must refuse

_OK_TEXT = st.text(st.characters(categories=("L", "N"), include_characters="._*?[]/:=-"), min_size=1, max_size=8)


def _floats(lo: float | None = None, hi: float | None = None, **kw: bool) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, **kw)


_NONNEG = st.integers(0, INT64[1])
_POSITIVE = _floats(0, exclude_min=True)
_PERCENT = _floats(50, 100, exclude_min=True)
_SITES = st.lists(_NONNEG, max_size=4).map(tuple)
_QUANT_CHOICES = st.lists(st.sampled_from(["float", "int8", "int4"]), min_size=1, max_size=3, unique=True).map(tuple)
_PATTERNS = st.lists(_OK_TEXT, max_size=3).map(tuple)
_ATTENTION = {"layers": _SITES, "transfer_steps": _NONNEG, "transfer_lr": _POSITIVE,
              "transfer_mse_weight": _floats(0), "distill_steps": _NONNEG, "distill_lr": _POSITIVE,
              "distill_rank": st.integers(1, INT64[1]), "distill_site_weight": _floats(0),
              "distill_batch": st.integers(1, INT64[1]), "seed": st.integers(*INT64)}

#: Every valid value of each int / float / tuple option (bools and Literals are derived from the type).
VALID: dict[str, dict[str, st.SearchStrategy]] = {
    "constant-fold": {"max_growth_bytes": _NONNEG},
    "repbn": {"layers": _SITES, "eta_init": _floats(), "bn_eps": _POSITIVE, "finetune_steps": _NONNEG,
              "lr": _POSITIVE, "decay_fraction": _floats(0, 1, exclude_min=True)},
    "linear-attention": {**_ATTENTION, "feature_dim": _NONNEG, "chunk_size": st.integers(1, INT64[1]),
                         "diag_layers": st.integers(-1, INT64[1]), "window": _NONNEG},
    "sigmoid-attention": _ATTENTION,
    "softplus-attention": _ATTENTION,
    "sparse-attention": {**_ATTENTION, "k": _POSITIVE, "window": st.integers(1, INT64[1]),
                         "block_size": st.integers(1, INT64[1]), "feature_dim": _NONNEG},
    "quantize": {"group_size": st.integers(1, INT64[1] // 2).map(lambda n: 2 * n), "percentile": _PERCENT,
                 "exclude": _PATTERNS, "keep_float": _NONNEG, "damp": _floats(0, 1, exclude_min=True),
                 "awq_grid": st.integers(1, INT64[1]), "budget": _floats(0, 1, exclude_min=True),
                 "max_error": _floats(0), "choices": _QUANT_CHOICES},
    "smooth-quant": {"alpha": _floats(0, 1), "layers": _PATTERNS},
    "rotate": {"seed": st.integers(*INT64), "train_steps": st.integers(1, INT64[1]), "lr": _POSITIVE,
               "weight_bits": st.integers(2, 16), "act_bits": st.integers(2, 16), "layers": _PATTERNS},
    "log-quant": {"bits": st.integers(2, 8), "search_steps": st.integers(2, INT64[1]), "eq_n": st.integers(0, 1000),
                  "gelu_shift": _floats(0)},
    "repquant": {"bits": st.integers(2, 16), "percentile": _PERCENT},
    "shift-linear": {"exclude": _PATTERNS, "keep_float": _NONNEG},
    "binary-attention": {**_ATTENTION, "bits": st.integers(8, 64)},
    "precision": {"exclude": _PATTERNS, "keep_float": _NONNEG},
    "token-reduce": {"keep": _floats(0, 1, exclude_min=True, exclude_max=True), "layers": _SITES,
                     "temperature": _POSITIVE, "prefix": st.integers(-1, INT64[1])},
}

_NEGATIVE = st.integers(INT64[0], -1)
_NOT_POSITIVE = _floats(None, 0)
_ATTENTION_BAD = {"layers": st.lists(_NEGATIVE, min_size=1, max_size=3).map(tuple), "transfer_steps": _NEGATIVE,
                  "transfer_lr": _NOT_POSITIVE, "transfer_mse_weight": _floats(None, 0, exclude_max=True),
                  "distill_steps": _NEGATIVE, "distill_lr": _NOT_POSITIVE, "distill_rank": st.integers(INT64[0], 0),
                  "distill_site_weight": _floats(None, 0, exclude_max=True), "distill_batch": st.integers(INT64[0], 0)}

#: Values of the right type that each option must refuse (ranges from the pass docstrings).
OUT_OF_RANGE: dict[str, dict[str, st.SearchStrategy]] = {
    "constant-fold": {"max_growth_bytes": _NEGATIVE},
    "repbn": {"layers": _ATTENTION_BAD["layers"], "bn_eps": _NOT_POSITIVE, "finetune_steps": _NEGATIVE,
              "lr": _NOT_POSITIVE, "decay_fraction": _floats(None, 0) | _floats(1, exclude_min=True)},
    "linear-attention": {**_ATTENTION_BAD, "feature_dim": _NEGATIVE, "chunk_size": st.integers(INT64[0], 0),
                         "diag_layers": st.integers(INT64[0], -2), "window": _NEGATIVE},
    "sigmoid-attention": _ATTENTION_BAD,
    "softplus-attention": _ATTENTION_BAD,
    "sparse-attention": {**_ATTENTION_BAD, "k": _NOT_POSITIVE, "window": st.integers(INT64[0], 0),
                         "block_size": st.integers(INT64[0], 0), "feature_dim": _NEGATIVE},
    "quantize": {"group_size": (st.integers(INT64[0] // 2, 0).map(lambda n: 2 * n)  # even but < 2, or odd
                                | st.integers(-50, 50).map(lambda n: 2 * n + 1)),
                 "percentile": _floats(None, 50) | _floats(100, exclude_min=True), "keep_float": _NEGATIVE,
                 "damp": _floats(None, 0) | _floats(1, exclude_min=True), "awq_grid": st.integers(INT64[0], 0),
                 "budget": _floats(None, 0) | _floats(1, exclude_min=True), "max_error": _floats(None, 0, exclude_max=True)},
    "smooth-quant": {"alpha": _floats(None, 0, exclude_max=True) | _floats(1, exclude_min=True)},
    "rotate": {"train_steps": st.integers(INT64[0], 0), "lr": _NOT_POSITIVE,
               "weight_bits": st.integers(INT64[0], 1) | st.integers(17, INT64[1]),
               "act_bits": st.integers(INT64[0], 1) | st.integers(17, INT64[1])},
    "log-quant": {"bits": st.integers(INT64[0], 1) | st.integers(9, INT64[1]), "search_steps": st.integers(INT64[0], 1),
                  "eq_n": _NEGATIVE | st.integers(1001, INT64[1]), "gelu_shift": _floats(None, 0, exclude_max=True)},
    "repquant": {"bits": st.integers(INT64[0], 1) | st.integers(17, INT64[1]),
                 "percentile": _floats(None, 50) | _floats(100, exclude_min=True)},
    "shift-linear": {"keep_float": _NEGATIVE},
    "binary-attention": {**_ATTENTION_BAD, "bits": st.integers(INT64[0], 7) | st.integers(65, INT64[1])},
    "precision": {"keep_float": _NEGATIVE},
    "token-reduce": {"keep": _floats(None, 0) | _floats(1), "layers": _ATTENTION_BAD["layers"],
                     "temperature": _NOT_POSITIVE, "prefix": st.integers(INT64[0], -2)},
}


def _options(name: str) -> dict[str, Any]:
    """Option name -> resolved field type of pass ``name``."""
    return field_types(PASSES[name])


def _valid(name: str, key: str) -> st.SearchStrategy:
    tp = _options(name)[key]
    if tp is bool:
        return st.booleans()
    if get_origin(tp) is Literal:
        return st.sampled_from(get_args(tp))
    return VALID[name][key]


def _spellings(value: Any) -> st.SearchStrategy[str]:
    """The ways a user may write ``value`` that must parse back to it exactly."""
    if isinstance(value, bool):
        words = sorted(TRUE_WORDS if value else FALSE_WORDS)
        return st.sampled_from(words).flatmap(lambda w: st.sampled_from([w, w.upper(), w.capitalize()]))
    if isinstance(value, int):
        padded = str(value).replace("-", "-0", 1) if value < 0 else f"0{value}"  # a leading zero
        return st.sampled_from([str(value), f" {value} ", padded])
    if isinstance(value, float):
        return st.sampled_from([repr(value), f"{value:.17e}", f" {value!r}"])
    if isinstance(value, tuple):
        return st.just("+".join(map(str, value))) | st.just("+".join(map(str, value)) + "+")
    return st.just(str(value))


# ---------------------------------------------------------------------------------------------
# option-string fuzz


def test_every_option_has_a_strategy():
    """A new option must be added to VALID (else the fuzz would silently skip it)."""
    for name in NAMES:
        for key, tp in _options(name).items():
            if tp is not bool and get_origin(tp) is not Literal:
                assert key in VALID.get(name, {}), f"{name}.{key} ({tp}) has no valid-value strategy"
        for key in OUT_OF_RANGE.get(name, {}):
            assert key in _options(name), f"OUT_OF_RANGE names {name}.{key}, which is not an option"


@st.composite
def valid_specs(draw) -> tuple[str, str, dict[str, Any]]:
    """``(name, spec text, {option: value written})`` with options in random order and spelling."""
    name = draw(st.sampled_from(NAMES))
    keys = draw(st.lists(st.sampled_from(sorted(_options(name)) or [""]), unique=True, max_size=6))
    values = {k: draw(_valid(name, k)) for k in keys if k}
    items = []
    for key, value in values.items():
        spelled_key = draw(st.sampled_from([key, key.replace("_", "-"), f" {key}"]))
        items.append(f"{spelled_key}={draw(_spellings(value))}")
        if draw(st.integers(0, 4)) == 0:
            items.append(" ")  # empty items are allowed
    spec = name + (":" + ",".join(items) if items or draw(st.booleans()) else "")
    return name, spec, values


@fuzz_settings(ci_examples=200)
@given(valid_specs())
@example(("quantize", "quantize:exclude=a=b+c:d", {"exclude": ("a=b", "c:d")}))
@example(("linear-attention", "linear-attention:seed=-9223372036854775808", {"seed": INT64[0]}))
def test_valid_specs_parse_to_their_values_and_round_trip(case):
    name, spec, values = case
    cls = PASSES[name]
    try:
        expected = cls(**values)
    except ValueError as e:  # a combination the pass refuses (int4-weight with per-tensor)
        with pytest.raises(PassError, match=f"pass '{name}'"):
            parse_pass(spec)
        note(f"refused combination: {e}")
        return
    p = parse_pass(spec)
    assert p == expected, (spec, p)
    for key, value in values.items():
        assert getattr(p, key) == value and type(getattr(p, key)) is type(value), key
    canonical = p.spec()
    assert parse_pass(canonical) == p
    assert parse_pass(canonical).spec() == canonical


def _not_parseable(tp: Any, text: str) -> bool:
    """``text`` is not a valid spelling of type ``tp`` (as parse_value reads it)."""
    text = text.strip()
    if tp is bool:
        return text.lower() not in TRUE_WORDS | FALSE_WORDS
    if get_origin(tp) is Literal:
        return text not in map(str, get_args(tp))
    if tp in (int, float):
        try:
            value = tp(text)
        except ValueError:
            return True
        return not math.isfinite(value) if tp is float else not INT64[0] <= value <= INT64[1]
    if get_origin(tp) is tuple:
        return any(_not_parseable(get_args(tp)[0], part) for part in text.split("+") if part)
    return False  # str: anything goes


def _bad_texts(tp: Any) -> st.SearchStrategy[str]:
    special = {bool: ["maybe", "2", "tru", ""], int: ["1.5", "1e3", "0x10", "", "true", str(2**63), str(-(2**63) - 1)],
               float: ["nan", "inf", "-inf", "1e999", "", "1;5", "one"]}
    if get_origin(tp) is Literal:
        choices = [str(a) for a in get_args(tp)]
        fixed = [c.upper() for c in choices if c.upper() != c] + [c + "x" for c in choices] + [""]
    elif get_origin(tp) is tuple:
        fixed = [f"0+{t}" for t in special.get(get_args(tp)[0], []) if t]
    else:
        fixed = special.get(tp, [])
    free = st.text(_printable(",+"), max_size=10)
    return (st.sampled_from(fixed) if fixed else st.nothing()) | free


def _printable(exclude: str) -> st.SearchStrategy[str]:
    """Characters a user could type on one line (errors echo the value and stay one line), minus ``exclude``."""
    return st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"), exclude_characters=exclude)


def _typed_options(name: str) -> list[str]:
    return [k for k, tp in _options(name).items() if not (get_origin(tp) is tuple and get_args(tp)[0] is str)]


@st.composite
def invalid_specs(draw) -> tuple[str, str, tuple[str, ...]]:
    """``(kind, spec, phrases the PassError must contain)``."""
    name = draw(st.sampled_from(NAMES))
    options = _options(name)
    kinds = ["unknown-option", "no-equals", "empty-key", "twice", "unknown-pass"]
    kinds += ["bad-text"] if _typed_options(name) else []
    kinds += ["out-of-range"] if OUT_OF_RANGE.get(name) else []
    kind = draw(st.sampled_from(kinds))
    if kind == "unknown-option":
        key = draw(st.from_regex(r"[a-z][a-z0-9_]{0,14}", fullmatch=True).filter(lambda k: k not in options))
        return kind, f"{name}:{key}=1", (f"pass '{name}'", f"no option '{key}'", "allowed")
    if kind == "no-equals":
        item = draw(st.text(_printable(",="), min_size=1, max_size=12).filter(str.strip))
        return kind, f"{name}:{item}", (f"pass '{name}'", "key=value")
    if kind == "empty-key":
        return kind, f"{name}: ={draw(st.text(_printable(','), max_size=5))}", (f"pass '{name}'", "key=value")
    if kind == "twice":
        key = draw(st.sampled_from(sorted(options) or ["opt"]))
        return kind, f"{name}:{key}=1,{key.replace('_', '-')}=2", (f"pass '{name}'", f"'{key}' given twice")
    if kind == "unknown-pass":
        other = draw(st.from_regex(r"[a-z][a-z0-9-]{0,14}", fullmatch=True).filter(lambda n: n not in PASSES))
        return kind, f"{other}:x=1", (f"unknown pass '{other}'", "ptool passes")
    if kind == "bad-text":
        key = draw(st.sampled_from(_typed_options(name)))
        text = draw(_bad_texts(options[key]).filter(lambda t: _not_parseable(options[key], t)))
        return kind, f"{name}:{key}={text}", (f"pass '{name}'", f"'{key}'")
    key = draw(st.sampled_from(sorted(OUT_OF_RANGE[name])))
    value = draw(OUT_OF_RANGE[name][key])
    text = "+".join(map(str, value)) if isinstance(value, tuple) else repr(value)
    return kind, f"{name}:{key}={text}", (f"pass '{name}'", key)


@fuzz_settings(ci_examples=250)
@given(invalid_specs())
@example(("bad-text", "repbn:eta_init=nan", ("pass 'repbn'", "'eta_init'", "finite")))
@example(("bad-text", "linear-attention:window=100000000000000000000", ("'window'", "out of range")))
@example(("out-of-range", "linear-attention:transfer_mse_weight=-1",
          ("pass 'linear-attention'", "transfer_mse_weight")))
@example(("out-of-range", "linear-attention:diag_layers=-2", ("pass 'linear-attention'", "diag_layers")))
@example(("out-of-range", "constant-fold:max_growth_bytes=-1", ("pass 'constant-fold'", "max_growth_bytes")))
@example(("empty-key", "dce:=5", ("pass 'dce'", "key=value")))
def test_invalid_specs_raise_pass_error_naming_pass_and_option(case):
    kind, spec, phrases = case
    with pytest.raises(PassError) as err:
        parse_pass(spec)
    message = str(err.value)
    for phrase in phrases:
        assert phrase in message, f"{kind}: {spec!r} -> {message!r} does not say {phrase!r}"
    assert "\n" not in message.strip()


@st.composite
def option_text(draw) -> tuple[str, str]:
    """A pass name and text after its ``:``: random characters mixed with its keys, separators and values."""
    name = draw(st.sampled_from(NAMES))
    tokens = [*_options(name), "=", "=", ",", ",", "+", "-", " ", "true", "no", "-1", "0", "1e999", "nan", "0.5",
              *(str(a) for tp in _options(name).values() if get_origin(tp) is Literal for a in get_args(tp))]
    parts = draw(st.lists(st.sampled_from(tokens) | st.text(max_size=3), max_size=12))
    return name, "".join(parts)


@fuzz_settings(ci_examples=100)
@given(option_text())
def test_arbitrary_option_text_parses_or_raises_pass_error(case):
    name, text = case
    try:
        p = parse_pass(f"{name}:{text}")
    except PassError as e:
        assert f"pass '{name}'" in str(e), str(e)
    else:
        assert isinstance(p, PASSES[name]) and parse_pass(p.spec()) == p


# ---------------------------------------------------------------------------------------------
# pipelines: strategies

#: Where each approximate pass claims its declared bound (module docstring). Exact passes always do.
CLAIMS: dict[str, typing.Callable[[Any], bool]] = {
    # every mode, granularity and observer holds 0.97 on the fixtures (cosine >= 0.988 measured),
    # unless the percentile observer clips more than 1% of the activations
    "quantize": lambda p: not (p.mode == "int8-static" and p.observer == "percentile" and p.percentile < 99),
    # the docstring: defaults (adaptive base, 4 bits) and 3 bits; 2 bits and fixed bases may not
    "log-quant": lambda p: p.base == "adaptive" and p.bits >= 3 and p.gelu_shift == GELU_SHIFT,
    # the docstring's "fine-tuned" regime, as test_conformance.py configures it
    "repbn": lambda p: p == dataclasses.replace(PASSES["repbn"](finetune_steps=60), layers=p.layers,
                                                fold_linear=p.fold_linear, finetune_steps=max(p.finetune_steps, 60)),
    # converted with the default recipe; which sites and the seed do not matter
    **{name: (lambda p: p == dataclasses.replace(type(p)(), seed=p.seed, layers=p.layers))
       for name in ("linear-attention", "sigmoid-attention", "softplus-attention", "sparse-attention")},
    # the random hash at 16+ bits (cosine >= 0.997 on the fixtures); shift and shift2 weights
    # (>= 0.945 on MobileNetV2, where every pointwise conv is rewritten); ternary and binary may not
    "binary-attention": lambda p: p == dataclasses.replace(type(p)(), seed=p.seed, layers=p.layers, bits=p.bits),
    "shift-linear": lambda p: p.mode in ("shift", "shift2"),
    # every dtype and choice of float32 sites (cosine >= 0.9999 on the fixtures, 0.99999 on MiniLM)
    "precision": lambda p: True,
    # the defaults, in every block but with no stage chosen in the first alone (cosine 0.91 on the random
    # BERT, 0.999 on the ViT); where=block before the first block has only the token norm to choose by
    "token-reduce": lambda p: p == dataclasses.replace(type(p)(), layers=p.layers) and 0 not in p.layers,
}


def claims_bound(p: Pass) -> bool:
    """Whether ``p``'s declared numerics bound is claimed for its configuration."""
    return p.exact or CLAIMS[p.name](p)


def test_every_approximate_pass_says_where_it_claims_its_bound():
    for name, cls in PASSES.items():
        if not cls.numerics.exact:
            assert name in CLAIMS, f"add {name} to CLAIMS"
            assert claims_bound(_reference(name)), f"{name}: its reference configuration must be claimed"


def _reference(name: str) -> Pass:
    return PASSES[name](finetune_steps=60) if name == "repbn" else PASSES[name]()


_SMALL = {  # options whose cost grows with the value: small in pipelines (full ranges are fuzzed above)
    "transfer_steps": st.integers(0, 3), "distill_steps": st.integers(0, 2), "finetune_steps": st.integers(0, 3),
    "train_steps": st.integers(1, 3), "search_steps": st.integers(2, 6), "eq_n": st.integers(0, 48),
    "feature_dim": st.integers(0, 16), "chunk_size": st.integers(1, 64), "block_size": st.integers(1, 24),
    "keep_float": st.integers(0, 4), "group_size": st.sampled_from([2, 4, 8, 16, 32, 64]),
    "distill_rank": st.integers(1, 8), "distill_site_weight": st.sampled_from([0.0, 0.5, 1.0]),
    "distill_batch": st.integers(1, 3),
    "max_growth_bytes": st.sampled_from([0, 64, 4096, 1 << 20]),
    "k": st.sampled_from([0.05, 0.25, 0.5, 1.0, 3.0, 100.0]),
    "seed": st.integers(0, 2**32), "diag_layers": st.integers(-1, 3),
    # floats: a few values across each valid range
    "lr": st.sampled_from([1e-4, 1e-3, 1e-2, 0.1]), "transfer_lr": st.sampled_from([1e-3, 1e-2, 0.1]),
    "distill_lr": st.sampled_from([1e-4, 1e-3, 1e-2]), "transfer_mse_weight": st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    "eta_init": st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]), "bn_eps": st.sampled_from([1e-6, 1e-5, 1e-3, 0.1]),
    "decay_fraction": st.sampled_from([0.1, 0.5, 1.0]), "percentile": st.sampled_from([50.5, 90.0, 99.0, 99.99, 100.0]),
    "alpha": st.sampled_from([0.0, 0.25, 0.5, 0.85, 1.0]), "gelu_shift": st.sampled_from([0.0, GELU_SHIFT, 0.5]),
    "damp": st.sampled_from([1e-3, 0.01, 0.1, 1.0]), "awq_grid": st.integers(1, 20),
    # quantize:mode=auto (0.05 is below every model's smallest choice: the clear error)
    "budget": st.sampled_from([0.05, 0.2, 0.3, 1.0]), "max_error": st.sampled_from([0.0, 1e-3, 1.0]),
    "choices": st.sampled_from([("float", "int8", "int4"), ("int8", "int4"), ("float", "int4"), ("int4",)]),
    "keep": st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]), "temperature": st.sampled_from([0.03, 0.1, 1.0]),
    "prefix": st.integers(-1, 3),
}
_SITE_CHOICES = st.sampled_from([(), (), (), (), (), (0,), (1,), (0, 1)])  # mostly all sites
_MODULE_CHOICES = st.sampled_from([(), (), (), ("attention",), ("mlp",), ("layer.0",), ("no-such-module",)])
_EXCLUDE_CHOICES = st.sampled_from([(), (), ("*attention*",), ("lm_head",), ("*",), ("*.0.*",)])


def _cheap(name: str, key: str) -> st.SearchStrategy:
    tp = _options(name)[key]
    if key == "window":
        return st.integers(1, 24)
    if key in _SMALL:
        return _SMALL[key]
    if get_origin(tp) is tuple:
        return _SITE_CHOICES if get_args(tp)[0] is int else (_EXCLUDE_CHOICES if key == "exclude" else _MODULE_CHOICES)
    assert tp is not float, f"{name}.{key}: give it a few values in _SMALL"
    return _valid(name, key)


def _build(cls: type[Pass], kwargs: dict) -> Pass | None:
    try:
        return cls(**kwargs)
    except ValueError:  # a refused combination; the option fuzz covers the error
        return None


#: Options whose default is costly (200 conversion steps, 100 training steps, 129 searched bases):
#: always drawn from _SMALL in pipelines.
_ALWAYS_SMALL = ("transfer_steps", "train_steps", "eq_n")


def cheap_pass(name: str) -> st.SearchStrategy[Pass]:
    """Pass ``name`` with any subset of its options at cheap, valid values."""
    cls = PASSES[name]
    required = {key: _cheap(name, key) for key in _options(name) if key in _ALWAYS_SMALL}
    optional = {key: _cheap(name, key) for key in _options(name) if key not in _ALWAYS_SMALL}
    return (st.fixed_dictionaries(required, optional=optional).map(lambda kw: _build(cls, kw))
            .filter(lambda p: p is not None))


def claimed_pass(name: str) -> st.SearchStrategy[Pass]:
    """Pass ``name`` in the configuration its bound is claimed for (costs up to a few seconds)."""
    reference = _reference(name)
    if name == "log-quant":
        return st.builds(lambda bits, targets, steps, eq_n: dataclasses.replace(
            reference, bits=bits, targets=targets, search_steps=steps, eq_n=eq_n),
            st.integers(3, 8), st.sampled_from(["softmax", "gelu", "both"]), st.integers(2, 6), st.integers(0, 48))
    if name == "repbn":
        return st.booleans().map(lambda fold: dataclasses.replace(reference, fold_linear=fold))
    if name in ("linear-attention", "sigmoid-attention", "softplus-attention", "sparse-attention"):
        return st.builds(lambda s, layers: dataclasses.replace(reference, seed=s, layers=layers),
                         st.integers(0, 2**32), _SITE_CHOICES)
    if name == "binary-attention":
        return st.builds(lambda s, layers, bits: dataclasses.replace(reference, seed=s, layers=layers, bits=bits),
                         st.integers(0, 2**32), _SITE_CHOICES, st.sampled_from([16, 32, 64]))
    if name == "token-reduce":
        return _SITE_CHOICES.filter(lambda layers: 0 not in layers).map(
            lambda layers: dataclasses.replace(reference, layers=layers))
    if name == "shift-linear":
        return st.builds(lambda mode, sites: dataclasses.replace(reference, mode=mode, sites=sites),
                         st.sampled_from(["shift", "shift2"]), st.sampled_from(["all", "mlp"]))
    return st.just(reference)


def weight_only_quantize() -> st.SearchStrategy[Pass]:
    """``quantize:mode=int4-weight`` with a calibrated ``method`` (a free draw of the options seldom pairs
    ``method=gptq|awq`` with the one mode they run in)."""
    return st.builds(lambda method, group, act_order, damp, grid, embeddings: Quantize(
        mode="int4-weight", method=method, group_size=group, act_order=act_order, damp=damp, awq_grid=grid,
        embeddings=embeddings), st.sampled_from(["gptq", "awq"]), _SMALL["group_size"], st.booleans(),
        _SMALL["damp"], _SMALL["awq_grid"], st.booleans())


def any_pass(name: str) -> st.SearchStrategy[Pass]:
    if name == "quantize":  # 1 in 3: a calibrated weight-only method
        return st.integers(0, 2).flatmap(lambda i: weight_only_quantize() if i == 0 else cheap_pass(name))
    if PASSES[name].numerics.exact:
        return cheap_pass(name)
    # the claimed configurations cost up to seconds (200 conversion steps, a 60-step fine-tune): 1 in 3
    return st.integers(0, 2).flatmap(lambda i: claimed_pass(name) if i == 0 else cheap_pass(name))


EXACT_NAMES = [n for n in NAMES if PASSES[n].numerics.exact]


@st.composite
def pipelines(draw) -> list[Pass]:
    names = EXACT_NAMES if draw(st.integers(0, 2)) == 0 else NAMES  # a third are all-exact by construction
    return draw(st.lists(st.sampled_from(names).flatmap(any_pass), min_size=1, max_size=4))


# ---------------------------------------------------------------------------------------------
# pipelines: fixtures and the property


@dataclass
class Captured:
    """One fixture, captured once per module; each example runs on a deep copy of ``gm``."""

    name: str
    gm: torch.fx.GraphModule
    ctx: PassContext
    reference: list  # (args, kwargs): the example batch and a held-out one


def _repvgg() -> zoo.Fixture:
    """RepVGG blocks (3x3 conv+BN || 1x1 conv+BN || identity BN, summed) from test_merge_branches:
    the zoo's CNNs have no branches merge-branches can merge."""
    from tests.passes.test_merge_branches import repvgg

    def make(seed: int) -> zoo.Inputs:
        return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)),), {}

    args, kwargs = make(0)
    return zoo.Fixture(name="repvgg", model=repvgg(), example_inputs=args, example_kwargs=kwargs, make_inputs=make,
                       kind="bn")


FIXTURES = {**zoo.FIXTURES, "repvgg": _repvgg}


@pytest.fixture(scope="module")
def _one_thread():
    """One torch thread per process while this module runs: under ``pytest -n 2`` on 2 cores, two
    workers with two threads each oversubscribe the cores, and the small fixtures' ops are too
    small to gain from a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=MODELS)
def captured(request, _one_thread) -> Captured:
    fixture = FIXTURES[request.param]()
    gm = capture(fixture.model, fixture.example_inputs, fixture.example_kwargs).graph_module
    calls = fixture.batches(2)
    ctx = PassContext(example_inputs=fixture.example_inputs, example_kwargs=fixture.example_kwargs,
                      calibration=[args for args, _ in calls], calibration_calls=calls)
    reference = [(fixture.example_inputs, fixture.example_kwargs), fixture.heldout()]
    return Captured(request.param, gm, ctx, reference)


def _close_bound(p: Pass, scale: float, eps: float) -> float:
    n = p.numerics
    if isinstance(n, Exact):
        return 0.0
    assert isinstance(n, Close)
    return n.atol + max(n.rtol, EPS_FACTOR * eps) * scale


def _log(model: str, specs: list[str], rows: list[dict]) -> None:
    if _LOG:
        with open(_LOG, "a") as f:
            for row in rows:
                f.write(json.dumps({"model": model, "pipeline": specs, **row}) + "\n")


def _expected_user_error(err: PassError, pipeline: list[Pass]) -> bool:
    """The PassErrors a random pipeline may hit: ``layers=`` picks sites the graph does not have;
    ``quantize:mode=auto`` with a budget below the smallest size its choices reach."""
    msg = str(err)
    if "quantize': budget=" in msg and "is below the smallest size" in msg:  # mode=auto: an unreachable budget
        return True
    return any(f"pass '{p.name}': layers=" in msg and getattr(p, "layers", ()) and "but the graph has" in msg
               for p in pipeline)


def test_pipeline_fuzz(captured):
    """Random pipelines on one fixture. Each fixture draws its own pipelines: the seed is
    ``PTOOL_FUZZ_SEED`` (unset in CI: 0, so CI is deterministic) plus a hash of the fixture's name
    (``derandomize``, or one ``--hypothesis-seed``, would draw the same pipelines for every model)."""
    fresh = _SEED and not int(_SEED)  # PTOOL_FUZZ_SEED=0: hypothesis picks a random seed
    seeded = (lambda test: test) if fresh else seed(int(_SEED or 0) + zlib.crc32(captured.name.encode()))

    @seeded
    @settings(max_examples=_EXAMPLES or 24, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(pipeline=pipelines())
    def check(pipeline):
        _check_pipeline(captured, pipeline)

    check()


def _check_pipeline(captured: Captured, pipeline: list[Pass]) -> None:
    specs = [p.spec() for p in pipeline]
    note(f"{captured.name}: {specs}")
    gm = copy.deepcopy(captured.gm)
    original = run_reference(gm, captured.reference)
    try:
        records = run_pipeline(gm, pipeline, captured.ctx, FxIR(), captured.reference)
    except VerificationError as e:  # an exact pass drifted, or a pass left a graph that does not run
        _log(captured.name, specs, [{"error": str(e)}])
        raise AssertionError(f"{captured.name} {specs}: {e}") from e
    except PassError as e:
        _log(captured.name, specs, [{"error": str(e), "expected": _expected_user_error(e, pipeline)}])
        assert _expected_user_error(e, pipeline), f"{captured.name} {specs}: unexpected PassError: {e}"
        assert e.__cause__ is None or isinstance(e.__cause__, PtoolError), f"a crash behind the PassError: {e}"
        return
    except PtoolError as e:  # the manager's wrapper around an exception from inside a pass
        _log(captured.name, specs, [{"error": str(e)}])
        raise AssertionError(f"{captured.name} {specs}: a pass crashed: {e}") from e

    rows = []
    for p, rec in zip(pipeline, records, strict=True):
        fid = rec.fidelity
        claimed = claims_bound(p)
        rows.append({"pass": p.name, "spec": rec.spec, "exact": p.exact, "claimed": claimed,
                     "within_contract": rec.within_contract, "rewritten": rec.rewritten,
                     "cosine": fid.cosine, "max_rel_error": fid.max_rel_error, "seconds": rec.seconds})
    _log(captured.name, specs, rows)
    for p, rec in zip(pipeline, records, strict=True):
        fid = rec.fidelity
        where = f"{captured.name} {specs}: {rec.spec}"
        assert fid is not None and fid.mismatched_leaves == 0, f"{where} changed the output structure"
        assert math.isfinite(fid.max_abs_error), f"{where} made outputs non-finite ({fid})"
        if rec.rewritten == 0:
            assert fid.max_abs_error == 0 and rec.nodes_after == rec.nodes_before, \
                f"{where} rewrote nothing but changed the graph"
        if claims_bound(p):
            assert rec.within_contract, f"{where} is outside its declared bound {rec.numerics}: {fid}"
    if all(p.exact for p in pipeline):
        total = compare_many(original, run_reference(gm, captured.reference))
        bound = sum(_close_bound(p, max(rec.fidelity.ref_scale, total.ref_scale), total.eps)
                    for p, rec in zip(pipeline, records))
        assert total.max_abs_error <= bound, \
            f"{captured.name} {specs}: all-exact pipeline drifted {total} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------
# regressions the fuzz found (each also reachable by the tests above)


def test_training_after_quantize_backpropagates_through_the_quantized_layers():
    """bert [quantize, repbn:finetune_steps, sigmoid-attention:distill_steps] failed with "Trying to
    backward through ptool_quant.linear_static_int8 but no autograd formula was registered"."""
    fixture = zoo.bert()
    m2 = ptool.transform(fixture.model, ["quantize:mode=int8-static", "repbn:finetune_steps=3",
                                         "sigmoid-attention:transfer_steps=0,distill_steps=2,distill_params=all"],
                         fixture.example_inputs, example_kwargs=fixture.example_kwargs, calibration=fixture.batches(2))
    quantize, repbn, sigmoid = m2.report
    assert quantize.rewritten > 0 and repbn.rewritten == 5 and sigmoid.rewritten == 2
    assert repbn.notes["distill_mse_before"] != repbn.notes["distill_mse_after"]  # the fine-tune moved the weights
    assert sigmoid.notes["distill_steps"] == 2
    assert sigmoid.notes["distill_mse_before"] != sigmoid.notes["distill_mse_after"]
    assert all(r.fidelity.mismatched_leaves == 0 for r in m2.report)


def test_quantize_that_rewrites_nothing_leaves_the_graph_alone():
    """llama [quantize:exclude=*] reported 0 sites rewritten but removed the captured graph's dead nodes."""
    fixture = zoo.llama()
    gm = capture(fixture.model, fixture.example_inputs, fixture.example_kwargs).graph_module
    nodes = [n.name for n in gm.graph.nodes]
    assert any(not n.users and n.op == "call_function" for n in gm.graph.nodes), "the fixture needs dead code"
    result = Quantize(exclude=("*",)).run(gm, PassContext())
    assert not result.changed and result.rewritten == 0 and len(result.skipped) == 16  # 15 linears, 1 embedding
    assert [n.name for n in gm.graph.nodes] == nodes
