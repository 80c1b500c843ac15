"""Matching state and outcome: :class:`Match` or :class:`NoMatch` with its reason.

:class:`Match` and :class:`NoMatch` are the values that flow from the matcher
(:mod:`ptool.ir.pattern`) to the rule driver (:mod:`ptool.ir.rules`): a pattern's ``match`` and a
rule's ``check`` both return one. They live apart from the pattern elements because they are the
interface between the two, and a rule author works with them (captures, skipped noise,
self-containment, erasing the interior) without the matcher's internals.

The search state is here too, because it is what a match is built from: :class:`PartialMatch`
(the captures, nodes, skipped noise and scales bound so far on one backtracking path) and
:class:`SearchLog` (the failure that got farthest, which becomes the :class:`NoMatch` reason).
Only the pattern elements use these two. :func:`describe` is how every reason names a value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch.fx as fx

from ptool.ir.analysis import is_assert, users_outside

if TYPE_CHECKING:
    from ptool.ir.pattern import Pattern

__all__ = ["Match", "NoMatch", "describe"]


def describe(value: Any) -> str:
    """How a no-match reason names ``value``: ``"mul_1 (aten.mul.Tensor)"``, ``"x (placeholder)"``,
    or ``"constant 2.0"`` for a non-node."""
    if isinstance(value, fx.Node):
        what = value.target if value.op == "call_function" else value.op
        return f"{value.name} ({what})"
    return f"constant {value!r}"


# ------------------------------------------------------------------------------ the search
@dataclass(frozen=True)
class PartialMatch:
    """One partial assignment during the backtracking search (immutable; copied on update).

    Used by the pattern elements in :mod:`ptool.ir.pattern`; :meth:`Pattern.match
    <ptool.ir.pattern.Pattern.match>` turns the first complete one into a :class:`Match`.
    ``progress`` counts bindings and taken nodes, so :class:`SearchLog` can tell which failure
    got farthest.
    """

    captures: dict = field(default_factory=dict)
    nodes: tuple = ()
    skipped: dict = field(default_factory=dict)
    scales: dict = field(default_factory=dict)
    progress: int = 0

    def bind(self, name: str | None, value: Any) -> PartialMatch:
        """This state with ``name`` captured as ``value`` (unchanged if ``name`` is None)."""
        if name is None:
            return self
        return replace(self, captures={**self.captures, name: value}, progress=self.progress + 1)

    def take(self, *nodes: fx.Node) -> PartialMatch:
        """This state with ``nodes`` added to the match interior."""
        return replace(self, nodes=self.nodes + nodes, progress=self.progress + len(nodes))

    def skip(self, name: str | None, nodes: tuple) -> PartialMatch:
        """This state with ``nodes`` recorded as skipped above the capture ``name``."""
        if name is None or not nodes:
            return self
        return replace(self, skipped={**self.skipped, name: self.skipped.get(name, ()) + nodes})


class SearchLog:
    """Search-wide bookkeeping: the failure that got farthest into the pattern is the reason.

    Failures at the same depth and place (an optional op and its fallback, alternatives) merge
    their expectations: ``"arg 0 of softmax: expected aten.add.Tensor or aten.matmul.default"``.
    """

    def __init__(self) -> None:
        self.progress, self.where, self.expected, self.got = -1, "", [], ""

    def fail(self, st: PartialMatch, where: str, expected: str, got: Any) -> None:
        """Record that at ``where``, with ``st`` bound so far, ``expected`` was wanted and ``got`` found."""
        got = got if isinstance(got, str) else describe(got)
        if st.progress > self.progress:
            self.progress, self.where, self.expected, self.got = st.progress, where, [expected], got
        elif st.progress == self.progress and where == self.where and expected not in self.expected:
            self.expected.append(expected)

    @property
    def reason(self) -> str:
        """The farthest failure as one line, or ``""`` if nothing failed."""
        return f"{self.where}: expected {' or '.join(self.expected)}, got {self.got}" if self.expected else ""


# ----------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class NoMatch:
    """Why a pattern (or a rule's check) did not apply. Falsy, so ``if m := p.match(n):`` works."""

    reason: str
    node: fx.Node | None = None

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True, eq=False)
class Match:
    """A successful match.

    Attributes:
        pattern: the pattern that matched.
        root: the node the pattern was matched at.
        nodes: root plus interior nodes (matched ops, skipped noise between them, folded scales),
            in match order; the nodes a rewrite of the whole match replaces.
        captures: name -> captured node or constant; names of unmatched optional parts are ``None``.
        skipped: name -> noise nodes skipped above that capture (consumer side first); for a
            :class:`~ptool.ir.pattern.Scaled` name, the folded mul/div nodes.
        scales: :class:`~ptool.ir.pattern.Scaled` name -> folded factor.
    """

    pattern: Pattern
    root: fx.Node
    nodes: tuple[fx.Node, ...]
    captures: Mapping[str, Any]
    skipped: Mapping[str, tuple[fx.Node, ...]]
    scales: Mapping[str, float]

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        caps = ", ".join(f"{k}={v.name if isinstance(v, fx.Node) else repr(v)}" for k, v in self.captures.items())
        return f"Match(root={self.root.name}, nodes=[{', '.join(n.name for n in self.nodes)}], {caps})"

    def __getitem__(self, name: str) -> Any:
        if name not in self.captures:
            raise KeyError(f"no capture named {name!r}; the pattern captures {sorted(self.captures)}")
        return self.captures[name]

    def __contains__(self, name: str) -> bool:
        return self.captures.get(name) is not None

    def get(self, name: str, default: Any = None) -> Any:
        """The capture ``name``, or ``default`` if it is unbound."""
        value = self.captures.get(name)
        return default if value is None else value

    def outer(self, name: str) -> Any:
        """The value ``name`` as its consumer in the match reads it (before skipped noise)."""
        chain = self.skipped.get(name, ())
        return chain[0] if chain and name not in self.scales else self[name]

    @property
    def interior(self) -> tuple[fx.Node, ...]:
        """The matched nodes other than the root."""
        return self.nodes[1:]

    def external_users(self) -> dict[fx.Node, list[fx.Node]]:
        """Interior nodes that nodes outside the match also use (asserts ignored)."""
        return {n: us for n, us in users_outside(self.nodes).items() if n is not self.root}

    def is_self_contained(self) -> bool:
        """True if no interior node is used outside the match, so replacing the root frees them all."""
        return not self.external_users()

    def require_self_contained(self) -> Match | NoMatch:
        """This match, or a :class:`NoMatch` naming an interior node used from outside and its users."""
        for node, users in self.external_users().items():
            names = ", ".join(u.name for u in users)
            return NoMatch(f"{self.root.name}: interior node {describe(node)} is also used outside the "
                           f"match by {names}", self.root)
        return self

    def erase_interior(self) -> int:
        """Erase the interior nodes (and assert nodes on them) that no longer have users.

        Call after the rewrite redirected the root's users. Returns the number of nodes erased.
        """
        graph, erased, alive = self.root.graph, 0, [n for n in self.nodes if not n._erased]
        progress = True
        while progress:
            progress = False
            for node in alive:
                if node._erased:
                    continue
                for user in [u for u in node.users if is_assert(u)]:
                    graph.erase_node(user)
                    erased += 1
                if not node.users:
                    graph.erase_node(node)
                    erased, progress = erased + 1, True
        return erased
