"""Registry and option-string parsing: names, options, round trips, clear errors."""

import dataclasses
import enum
from typing import ClassVar, Literal

import pytest

import ptool
from ptool.errors import PassError
from ptool.options import build_pass, split_spec
from ptool.passes.base import Family, Pass
from ptool.passes.registry import parse_pass, parse_pipeline, registry
from ptool.verify import Exact

REQUIRED = {"dce", "cse", "constant-fold", "fold-bn"}


def test_registry_holds_the_foundation_passes():
    assert REQUIRED <= set(registry())


def test_list_passes_rows_describe_each_pass():
    rows = {r.name: r for r in ptool.list_passes()}
    assert rows["fold-bn"].family == "re-parameterization"
    assert rows["fold-bn"].exact is True
    assert "fold_into_next" in rows["fold-bn"].options
    assert rows["dce"].doc.startswith("Remove nodes")
    assert all(r.doc for r in rows.values())


def test_parse_name_and_options():
    p = parse_pass("fold-bn:fold_into_next=false")
    assert p == ptool.passes.FoldBatchNorm(fold_into_next=False)
    assert p.spec() == "fold-bn:fold_into_next=false"
    assert parse_pass("fold-bn").spec() == "fold-bn"


def test_dash_spelling_of_option_keys_is_accepted():
    assert parse_pass("fold-bn:fold-into-next=0") == ptool.passes.FoldBatchNorm(fold_into_next=False)


def test_pass_objects_and_classes_pass_through():
    obj = ptool.passes.ConstantFold(max_growth_bytes=10)
    assert parse_pass(obj) is obj
    assert parse_pass(ptool.passes.ConstantFold) == ptool.passes.ConstantFold()
    assert [p.name for p in parse_pipeline(["dce", obj])] == ["dce", "constant-fold"]


@pytest.mark.parametrize("cls", list(registry().values()), ids=lambda c: c.name)
def test_every_pass_round_trips_through_its_spec(cls):
    p = cls()
    assert parse_pass(p.spec()) == p
    assert hash(p) == hash(parse_pass(p.spec()))


def test_unknown_pass_suggests_the_closest_name():
    with pytest.raises(PassError, match=r"unknown pass 'fold-nb'.*did you mean 'fold-bn'"):
        parse_pass("fold-nb")


def test_unknown_option_names_the_allowed_ones():
    with pytest.raises(PassError, match=r"pass 'fold-bn' has no option 'fold_into'.*allowed: fold_into_next.*did you mean"):
        parse_pass("fold-bn:fold_into=1")


def test_bad_option_values_are_named():
    with pytest.raises(PassError, match=r"option 'fold_into_next': 'maybe' is not a boolean"):
        parse_pass("fold-bn:fold_into_next=maybe")
    with pytest.raises(PassError, match=r"'max_growth_bytes': 'lots' is not an int"):
        parse_pass("constant-fold:max_growth_bytes=lots")
    with pytest.raises(PassError, match="must be written key=value"):
        parse_pass("fold-bn:fold_into_next")
    with pytest.raises(PassError, match="given twice"):
        parse_pass("fold-bn:fold_into_next=1,fold_into_next=0")


def test_passes_are_frozen_and_keyword_only():
    p = ptool.passes.FoldBatchNorm()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.fold_into_next = False
    with pytest.raises(TypeError):
        ptool.passes.FoldBatchNorm(False)


class _Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Toy(Pass):
    """A pass with every option type the parser supports."""

    name: ClassVar[str] = "toy"
    family: ClassVar[Family] = Family.CLEANUP
    numerics: ClassVar = Exact()
    mode: _Mode = _Mode.FAST
    kind: Literal["a", "b"] = "a"
    layers: tuple[int, ...] = ()
    ratio: float = 0.5
    limit: int | None = None


def test_typed_options_parse_once_at_the_edge():
    _, raw = split_spec("toy:mode=slow,kind=b,layers=0+2+5,ratio=0.25,limit=none")
    p = build_pass(_Toy, raw)
    assert p == _Toy(mode=_Mode.SLOW, kind="b", layers=(0, 2, 5), ratio=0.25, limit=None)
    assert p.spec() == "toy:mode=slow,kind=b,layers=0+2+5,ratio=0.25"
    assert build_pass(_Toy, split_spec(p.spec())[1]) == p
    with pytest.raises(PassError, match=r"'medium' is not allowed \(allowed: fast \| slow\)"):
        build_pass(_Toy, {"mode": "medium"})
    with pytest.raises(PassError, match=r"'c' is not allowed \(allowed: a \| b\)"):
        build_pass(_Toy, {"kind": "c"})
