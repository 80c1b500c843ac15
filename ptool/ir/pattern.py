"""Declarative subgraph patterns over torch.export FX graphs: the elements and :func:`find_all`.

A pattern is a small tree of objects matched against a root node, walking from a value to the
op that produced it::

    scores = Scaled(Op(aten.matmul.default, Var("q", noise=True), Var("k", noise=True)))
    masked = Op(aten.add.Tensor, scores, Var("mask"), optional=True, noise=True)
    attn = Op(aten.matmul.default, Op(aten.softmax.int, masked, -1, noise=True), Var("v", noise=True))
    m = attn.match(node)          # Match (captures, interior nodes, skipped noise) or NoMatch(reason)

The matcher canonicalizes instead of enumerating variants:

* **Noise.** Where a pattern element allows it (``noise=True`` or :class:`Noise`), layout ops
  (view/reshape/transpose/permute/expand/...), casts (``to``/``type_as``) and identities
  (contiguous/clone/eval dropout) between a consumer and the expected producer are skipped. The
  skipped nodes are recorded in ``Match.skipped[name]`` (consumer side first), so a rewrite knows
  which transforms the captured value went through.
* **Scale placement.** :class:`Scaled` folds every multiplication/division by a scalar constant
  found on the path into one captured factor: ``(q@kT)/sqrt(d)``, ``(q*s)@kT``, ``q@(kT*s)``
  and ``(q@kT)*(1/sqrt(d))`` all match with ``match["scale"] == 1/sqrt(d)``. Factors are only
  looked for through ops that are linear in that operand (matmul, bmm, mm, einsum, noise ops).
* **Commutativity.** ``add``/``mul`` try both operand orders.

Matching backtracks (alternatives, optional ops, operand orders, how much noise to skip); on
failure the reason is the one that got farthest into the pattern, e.g.
``"arg 0 of softmax_1: expected aten.add.Tensor or aten.matmul.default, got mul (aten.mul.Tensor)"``.

The matcher is split by layer, each module importing only the ones before it:

* :mod:`ptool.ir.noise` - what counts as noise, compile-time scalars, scale steps (leaf);
* :mod:`ptool.ir.match` - the search state and the results :class:`Match` / :class:`NoMatch`;
* this module - the pattern elements (how each walks the graph) and :func:`find_all`;
* :mod:`ptool.ir.rules` - the rule driver (``Rule``, ``apply_rules``).

For convenience this module re-exports the noise op sets, :func:`constant_value`,
:class:`Match` and :class:`NoMatch`; it cannot re-export the driver, which imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx

from ptool.ir.match import Match, NoMatch, PartialMatch, SearchLog, describe
from ptool.ir.noise import (
    CAST_OPS, IDENTITY_OPS, LAYOUT_OPS, MISSING, NOISE_OPS, constant_value, is_noise, node_args, scale_step,
)

__all__ = [
    "ANY", "CAST_OPS", "IDENTITY_OPS", "LAYOUT_OPS", "NOISE_OPS", "AnyOf", "Const", "Match", "NoMatch",
    "Noise", "Op", "Pattern", "Scaled", "Var", "Wildcard", "constant_value", "find_all", "root_candidates",
]

aten = torch.ops.aten

_COMMUTATIVE = frozenset({aten.add.Tensor, aten.add.Scalar, aten.mul.Tensor, aten.mul.Scalar})
_SCALE_LINEAR = frozenset({aten.matmul.default, aten.bmm.default, aten.mm.default, aten.einsum.default})


class _Sentinel:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


_UNBOUND = _Sentinel("<unbound>")


# ----------------------------------------------------------------------------------- helpers
def _targets_match(target: Any, targets: tuple) -> bool:
    for t in targets:
        if target == t:
            return True
        if isinstance(t, torch._ops.OpOverloadPacket) and getattr(target, "overloadpacket", None) is t:
            return True
    return False


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return type(a) is type(b) and a == b


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _wrap(x: Any) -> Pattern:
    if isinstance(x, Pattern):
        return x
    if isinstance(x, (list, tuple)):
        return _Seq(tuple(_wrap(i) for i in x))
    return Const(x)


# ----------------------------------------------------------------------------------- patterns
class Pattern:
    """Base of all pattern elements. Use :meth:`match` on a root node.

    Subclasses implement ``_here`` (match the value at this position, after noise/scale
    skipping). ``noise`` is the set of ops that may be skipped above this element; ``leaf`` says
    whether to prefer skipping as much as possible (captures) or as little (structured ops).
    """

    name: str | None = None
    noise: frozenset = frozenset()
    leaf: bool = False

    def match(self, node: fx.Node) -> Match | NoMatch:
        """Match this pattern with ``node`` as root.

        Returns:
            The first :class:`Match` in backtracking order, or a :class:`NoMatch` whose reason
            names the first failing node and what was expected there.
        """
        search = SearchLog()
        for st in self._gen(node, PartialMatch(), search, "root", None):
            nodes = tuple(dict.fromkeys((node, *st.nodes)))
            captures = {**dict.fromkeys(self._names()), **st.captures}
            return Match(self, node, nodes, captures, dict(st.skipped), dict(st.scales))
        return NoMatch(search.reason or f"{node.name}: no match", node)

    def _gen(self, value: Any, st: PartialMatch, search: SearchLog, where: str,
             scale: str | None) -> Iterator[PartialMatch]:
        chains = list(_peel(value, st, self.noise, scale))
        for v, s, chain, scaled in reversed(chains) if self.leaf else chains:
            s = self._absorb(s, chain, scaled)
            at = f"{where}, past {', '.join(n.name for n in chain)}" if chain else where
            yield from self._here(v, s, search, at, scale)

    def _absorb(self, st: PartialMatch, chain: tuple, scaled: tuple) -> PartialMatch:
        noise = tuple(n for n in chain if n not in scaled)
        if self.leaf:  # skipped noise above a capture stays outside, unless a folded scale lies beyond it
            last = max((i for i, n in enumerate(chain) if n in scaled), default=-1)
            return st.take(*chain[: last + 1]).skip(self.name, noise)
        return st.take(*chain).skip(self.name, noise)

    def _here(self, value: Any, st: PartialMatch, search: SearchLog, where: str,
              scale: str | None) -> Iterator[PartialMatch]:
        raise NotImplementedError

    def _roots(self) -> tuple | None:
        """Targets a root node must have, or ``None`` if any node may be a root."""
        return None

    def _names(self) -> Iterator[str]:
        if self.name:
            yield self.name


def _peel(value: Any, st: PartialMatch, noise: frozenset, scale: str | None) -> Iterator[tuple]:
    """Yield ``(value, state, chain, scaled)`` for each number of noise/scale ops skipped, shallow first."""
    chain: tuple = ()
    scaled: tuple = ()
    yield value, st, chain, scaled
    while isinstance(value, fx.Node) and value.op == "call_function":
        step = scale_step(value) if scale is not None else None
        if step is not None:
            factor, nxt = step
            st = replace(st, scales={**st.scales, scale: st.scales[scale] * factor})
            st = st.skip(scale, (value,))
            scaled += (value,)
        elif noise and is_noise(value, noise):
            nxt = value.args[0]
        else:
            return
        chain += (value,)
        value = nxt
        yield value, st, chain, scaled


class Var(Pattern):
    """Matches any value (node or constant) and captures it as ``name``.

    A name used twice must bind the same node. ``where`` is an optional predicate on the value.
    With ``noise=True`` the capture sees through noise ops (as many as possible); the skipped
    nodes stay outside the match (they are its boundary) and are listed in ``skipped[name]``.
    """

    leaf = True

    def __init__(self, name: str | None = None, *, where: Callable[[Any], bool] | None = None,
                 noise: bool | Iterable = False) -> None:
        self.name, self.where, self.noise = name, where, _noise_set(noise)

    def _here(self, value, st, search, where, scale):
        if value is MISSING:
            search.fail(st, where, f"a value for '{self.name}'", "nothing")
            return
        if self.where is not None and not self.where(value):
            search.fail(st, where, f"a value passing the condition on '{self.name}'", value)
            return
        bound = st.captures.get(self.name, _UNBOUND) if self.name else _UNBOUND
        if bound is not _UNBOUND and not _same(bound, value):
            search.fail(st, where, f"{describe(bound)} (bound to '{self.name}' elsewhere)", value)
            return
        yield st.bind(self.name, value)

    def __repr__(self) -> str:
        return f"Var({self.name!r})"


class Wildcard(Pattern):
    """Matches anything (also an absent optional argument) and captures nothing."""

    leaf = True

    def _here(self, value, st, search, where, scale):
        yield st

    def __repr__(self) -> str:
        return "ANY"


ANY = Wildcard()
"""The wildcard: any value in this position."""


class Const(Pattern):
    """Matches a constant: a literal argument, or a node that folds to a scalar (:func:`constant_value`).

    Args:
        value: the expected value; numbers compare with ``rel_tol``. Omit to accept any constant.
        name: capture the constant's value (a Python scalar/list, never a node) under this name.
    """

    leaf = True

    def __init__(self, value: Any = _UNBOUND, name: str | None = None, *, rel_tol: float = 1e-6) -> None:
        self.value, self.name, self.rel_tol = value, name, rel_tol

    def _here(self, value, st, search, where, scale):
        got = constant_value(value) if isinstance(value, fx.Node) else value
        if isinstance(value, fx.Node) and got is None:
            search.fail(st, where, "a constant", value)
            return
        if self.value is not _UNBOUND and not self._equal(got):
            search.fail(st, where, repr(self.value), got)
            return
        yield st.bind(self.name, got)

    def _equal(self, got: Any) -> bool:
        if _is_number(got) and _is_number(self.value):
            return math.isclose(got, self.value, rel_tol=self.rel_tol)
        return _same(got, self.value)

    def __repr__(self) -> str:
        return "Const()" if self.value is _UNBOUND else f"Const({self.value!r})"


class _Seq(Pattern):
    """A list/tuple argument (``cat``'s tensors, ``einsum``'s operands), matched element-wise."""

    def __init__(self, items: tuple) -> None:
        self.items = items

    def _here(self, value, st, search, where, scale):
        if not isinstance(value, (list, tuple)) or len(value) != len(self.items):
            search.fail(st, where, f"a list of {len(self.items)}", value)
            return
        pairs = [(p, v, f"{where}[{i}]") for i, (p, v) in enumerate(zip(self.items, value))]
        yield from _chain(pairs, st, search, scale)

    def _names(self):
        for p in self.items:
            yield from p._names()


def _chain(pairs: list, st: PartialMatch, search: SearchLog, scale: str | None) -> Iterator[PartialMatch]:
    if not pairs:
        yield st
        return
    (p, v, where), rest = pairs[0], pairs[1:]
    for s in p._gen(v, st, search, where, scale):
        yield from _chain(rest, s, search, scale)


class Op(Pattern):
    """Matches a ``call_function`` node by target, then its arguments.

    Args:
        target: an ATen overload (``aten.softmax.int``), a packet (``aten.softmax``: any
            overload), any other callable target, or a tuple of these (alternatives).
        *args: patterns for the arguments in schema order; plain values mean ``Const(value)``,
            lists mean element-wise lists. Arguments past the given ones are unconstrained.
        name: capture the matched node.
        noise: skip noise ops between the consumer and this op (``True`` = :data:`NOISE_OPS`).
        optional: the op may be absent, in which case the value (after allowed noise) must
            match ``args[through]``.
        commutative: try both orders of the first two arguments; default for add/mul.
        **kwargs: patterns for arguments by schema name (``dim=-1``, ``scale=Var("s")``).
    """

    def __init__(self, target: Any, *args: Any, name: str | None = None, noise: bool | Iterable = False,
                 optional: bool = False, through: int = 0, commutative: bool | None = None,
                 **kwargs: Any) -> None:
        self.targets = tuple(target) if isinstance(target, (tuple, list, set, frozenset)) else (target,)
        self.args = tuple(_wrap(a) for a in args)
        self.kwargs = {k: _wrap(v) for k, v in kwargs.items()}
        self.name, self.noise = name, _noise_set(noise)
        self.optional, self.through, self.commutative = optional, through, commutative
        if optional and through >= len(self.args):
            raise ValueError(f"Op(optional=True) needs an argument pattern at index {through} to fall back to")

    def _gen(self, value, st, search, where, scale):
        yield from super()._gen(value, st, search, where, scale)
        if self.optional:  # absent: the fallback fills this position, noise allowance included
            for v, s, chain, _ in _peel(value, st, self.noise, None):
                at = f"{where}, past {', '.join(n.name for n in chain)}" if chain else where
                yield from self.args[self.through]._gen(v, s.take(*chain), search, at, scale)

    def _here(self, value, st, search, where, scale):
        if not (isinstance(value, fx.Node) and value.op == "call_function"
                and _targets_match(value.target, self.targets)):
            search.fail(st, where, self._expected(), value)
            return
        bound = st.captures.get(self.name, _UNBOUND) if self.name else _UNBOUND
        if bound is not _UNBOUND and bound is not value:
            search.fail(st, where, f"{describe(bound)} (bound to '{self.name}' elsewhere)", value)
            return
        st = st.take(value).bind(self.name, value)
        args, index = node_args(value)
        inner = scale if value.target in _SCALE_LINEAR else None
        for order in self._orders(value, args, index):
            pairs = []
            for i, p in enumerate(self.args):
                j = order[i] if i < len(order) else i
                if j >= len(args):
                    search.fail(st, describe(value), f"an argument {j}", f"{len(args)} arguments")
                    break
                pairs.append((p, args[j], f"arg {j} of {value.name}"))
            else:
                for key, p in self.kwargs.items():
                    got = args[index[key]] if key in index else value.kwargs.get(key, MISSING)
                    pairs.append((p, got, f"{key}= of {value.name}"))
                yield from _chain(pairs, st, search, inner)

    def _orders(self, node: fx.Node, args: list, index: dict[str, int]) -> list[tuple[int, ...]]:
        swap = self.commutative if self.commutative is not None else node.target in _COMMUTATIVE
        alpha = args[index["alpha"]] if "alpha" in index else 1  # a + alpha*b is not symmetric
        return [(0, 1), (1, 0)] if swap and len(self.args) >= 2 and alpha == 1 else [(0, 1)]

    def _expected(self) -> str:
        return " or ".join(str(t) for t in self.targets)

    def _roots(self):
        return None if self.optional else self.targets

    def _names(self):
        yield from super()._names()
        for p in (*self.args, *self.kwargs.values()):
            yield from p._names()

    def __repr__(self) -> str:
        args = ", ".join([repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()])
        return f"Op({self._expected()}, {args})"


def _noise_set(noise: bool | Iterable) -> frozenset:
    if noise is True:
        return NOISE_OPS
    return frozenset(noise) if noise else frozenset()


class AnyOf(Pattern):
    """Alternatives: the first of ``patterns`` that matches (backtracking into later ones)."""

    def __init__(self, *patterns: Any, name: str | None = None) -> None:
        self.patterns, self.name = tuple(_wrap(p) for p in patterns), name

    def _here(self, value, st, search, where, scale):
        for p in self.patterns:
            for s in p._gen(value, st, search, where, scale):
                yield s.bind(self.name, value) if self.name else s

    def _roots(self):
        roots = [p._roots() for p in self.patterns]
        return None if any(r is None for r in roots) else tuple(t for r in roots for t in r)

    def _names(self):
        yield from super()._names()
        for p in self.patterns:
            yield from p._names()

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(map(repr, self.patterns))})"


class Noise(Pattern):
    """``inner`` seen through noise ops: ``Noise(p)`` is ``p`` with ``noise=ops`` at its position.

    The skipped nodes are recorded under ``name`` (defaults to ``inner``'s name).
    """

    def __init__(self, inner: Pattern, ops: Iterable = NOISE_OPS, name: str | None = None) -> None:
        self.inner, self.noise = _wrap(inner), frozenset(ops)
        self.name = name or self.inner.name
        self.leaf = self.inner.leaf

    def _here(self, value, st, search, where, scale):
        yield from self.inner._gen(value, st, search, where, scale)

    def _roots(self):
        return None

    def _names(self):
        yield from self.inner._names()

    def __repr__(self) -> str:
        return f"Noise({self.inner!r})"


class Scaled(Pattern):
    """``inner`` times a scalar constant that may sit anywhere on the path; the product is captured.

    Scalar ``mul``/``div`` nodes are folded into ``match[name]`` (1.0 if there are none) where
    they sit on this value or, through ops linear in that operand (matmul, bmm, mm, einsum and
    noise ops allowed by the pattern), on the operands of ``inner``. The folded nodes are part
    of the match interior and are listed in ``match.skipped[name]``.
    """

    def __init__(self, inner: Pattern, name: str = "scale") -> None:
        self.inner, self.name = _wrap(inner), name

    def _gen(self, value, st, search, where, scale):
        if self.name in st.scales:
            raise ValueError(f"Scaled(name={self.name!r}) is nested inside a Scaled of the same name")
        st = replace(st, scales={**st.scales, self.name: 1.0})
        for s in self.inner._gen(value, st, search, where, self.name):
            yield s.bind(self.name, s.scales[self.name])

    def _roots(self):
        return None

    def _names(self):
        yield from super()._names()
        yield from self.inner._names()

    def __repr__(self) -> str:
        return f"Scaled({self.inner!r}, {self.name!r})"


# ---------------------------------------------------------------------------------- finding
def find_all(graph: fx.Graph | fx.GraphModule, pattern: Pattern, *,
             self_contained: bool = False) -> list[Match]:
    """All non-overlapping matches of ``pattern``, in the topological order of their roots.

    Roots are tried in graph order; a match that shares a root or interior node with an earlier
    one is dropped (captured boundary values such as a shared mask may be shared).

    Args:
        graph: the graph (or GraphModule) to search.
        pattern: the pattern; its root op narrows the candidate nodes.
        self_contained: keep only matches whose interior is not used outside them.
    """
    g = graph.graph if isinstance(graph, fx.GraphModule) else graph
    claimed: set[fx.Node] = set()
    found = []
    for node in root_candidates(g, pattern):
        m = pattern.match(node)
        if not m or claimed.intersection(m.nodes) or (self_contained and not m.is_self_contained()):
            continue
        claimed.update(m.nodes)
        found.append(m)
    return found


def root_candidates(graph: fx.Graph, pattern: Pattern) -> list[fx.Node]:
    """The ``call_function`` nodes of ``graph`` that could be ``pattern``'s root, in graph order.

    A pattern whose root is an :class:`Op` (not optional) narrows them to that op's targets.
    """
    roots = pattern._roots()
    return [n for n in graph.nodes if n.op == "call_function"
            and (roots is None or _targets_match(n.target, roots))]
