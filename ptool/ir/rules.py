"""The rule driver: :class:`Rule`, :func:`apply_rules` and what it reports (:class:`RuleStats`).

A :class:`Rule` has a ``pattern`` (:mod:`ptool.ir.pattern`), ``check(match)`` (never mutates;
returns the match or a :class:`~ptool.ir.match.NoMatch`) and ``rewrite(match, gm)``.
:func:`apply_rules` applies rules in priority order until nothing changes, rejects matches whose
interior is used outside the match, counts hits, keeps reasons, and rolls a failed rewrite back
(:class:`RewriteError`).

It is its own module because it is the layer above the matcher: it mutates graphs and speaks
the pass vocabulary (:class:`~ptool.passes.base.PassResult`), while patterns only read them.
The dependency runs one way - this module imports the matcher, never the reverse - so
:mod:`ptool.ir.pattern` does not re-export these names.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from ptool.errors import PtoolError
from ptool.ir.match import Match, NoMatch
from ptool.ir.pattern import Pattern, root_candidates
from ptool.passes.base import PassResult

__all__ = ["RewriteError", "Rule", "RuleStats", "apply_rules"]


class RewriteError(PtoolError):
    """A rule's rewrite raised or left an invalid graph; the graph was rolled back."""


class Rule:
    """One rewrite: a ``pattern``, a non-mutating ``check`` and a ``rewrite``.

    Subclasses set ``pattern`` (class attribute or property) and implement :meth:`rewrite`;
    ``priority`` orders rules in :func:`apply_rules` (higher first, ties keep list order).
    The rule's ``name`` (class name by default) keys the hit counts and reasons.
    """

    pattern: Pattern
    priority: ClassVar[int] = 0

    @property
    def name(self) -> str:
        """The key used in :class:`RuleStats` (the class name unless overridden)."""
        return type(self).__name__

    def check(self, match: Match) -> Match | NoMatch:
        """Decide whether ``match`` can be rewritten; never mutates the graph. Default: accept."""
        return match

    def rewrite(self, match: Match, gm: fx.GraphModule) -> None:
        """Replace the matched subgraph in ``gm``. Runs only after :meth:`check` accepted."""
        raise NotImplementedError(f"{self.name}.rewrite")


@dataclass
class RuleStats(PassResult):
    """What :func:`apply_rules` did; a :class:`~ptool.passes.base.PassResult`, so a pass can return it.

    Attributes:
        hits: rule name -> rewrites done.
        reasons: rule name -> ``[(site, reason)]`` for every candidate root the rule did not
            rewrite in the last iteration (pattern, self-containment or check failures), for
            ``--explain``. Only check/self-containment rejections also appear in ``skipped``.
        iterations: rounds run over all rules.
        converged: False if ``max_iterations`` stopped a rule set that kept changing the graph.
    """

    hits: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    iterations: int = 0
    converged: bool = True

    def explain(self) -> str:
        """A readable account: hits per rule, then each site a rule left alone and why."""
        lines = []
        for rule, count in self.hits.items():
            lines.append(f"{rule}: {count} rewritten")
            lines.extend(f"  {site}: {reason}" for site, reason in self.reasons.get(rule, []))
        if not self.converged:
            lines.append(f"stopped after {self.iterations} iterations without converging")
        return "\n".join(lines)


def apply_rules(gm: fx.GraphModule, rules: Iterable[Rule], ctx: Any = None, *,
                max_iterations: int = 16, transactional: bool = True) -> RuleStats:
    """Apply ``rules`` to ``gm`` until none matches any more.

    Each iteration runs the rules in priority order; each rule tries the nodes carrying its
    pattern's root op in graph order. A match is rewritten only if its interior has no users
    outside it and ``rule.check`` accepts it; both happen before any mutation. With
    ``transactional`` the graph (and ``gm``'s attributes) are snapshotted before each rewrite
    and restored if the rewrite raises or leaves a graph that fails ``lint``.

    Args:
        gm: the graph module, rewritten in place (recompiled at the end if changed).
        rules: the rules.
        ctx: the pass context, accepted so a pass can forward its own; rules get their
            configuration from their fields, so the driver does not read it.
        max_iterations: stop after this many rounds (``converged`` is then False and a skip
            is recorded) so a rule set that keeps matching its own output cannot loop forever.
        transactional: snapshot and roll back around each rewrite.

    Returns:
        The :class:`RuleStats` (``changed``/``rewritten``/``skipped`` as in a PassResult).

    Raises:
        RewriteError: a rewrite failed; the graph is as it was before that rewrite.
    """
    del ctx
    ordered = sorted(rules, key=lambda r: -r.priority)
    stats = RuleStats(hits={r.name: 0 for r in ordered}, reasons={r.name: [] for r in ordered})
    rejected: dict[str, list[tuple[str, str]]] = {}
    for _ in range(max_iterations):
        stats.iterations += 1
        changed = False
        rejected = {}
        for rule in ordered:
            stats.reasons[rule.name] = reasons = []
            for node in root_candidates(gm.graph, rule.pattern):
                if node._erased:
                    continue
                m = rule.pattern.match(node)
                if m:
                    m = m.require_self_contained()
                    if m:
                        m = rule.check(m)
                    if not m:
                        rejected.setdefault(rule.name, []).append((node.name, m.reason))
                if not m:
                    reasons.append((node.name, m.reason))
                    continue
                _rewrite(rule, m, gm, transactional)
                stats.hits[rule.name] += 1
                changed = True
        if not changed:
            break
    else:
        stats.converged = False
        stats.skip("graph", f"rules still matching after {max_iterations} iterations; stopped")
    for name, items in rejected.items():
        for site, reason in items:
            stats.skip(site, f"{name}: {reason}")
    stats.hit(sum(stats.hits.values()))
    if stats.changed:
        gm.graph.lint()
        gm.recompile()
    return stats


def _rewrite(rule: Rule, m: Match, gm: fx.GraphModule, transactional: bool) -> None:
    saved = _snapshot(gm) if transactional else None
    try:
        rule.rewrite(m, gm)
        if transactional:
            gm.graph.lint()
    except Exception as err:
        if saved is not None:
            _restore(gm, saved)
        rolled = "; the graph was rolled back" if saved is not None else ""
        raise RewriteError(f"rule {rule.name} failed to rewrite {m.root.name}: {err}{rolled}") from err


def _snapshot(gm: fx.GraphModule) -> tuple:
    with warnings.catch_warnings():  # torch's pytree spec copy warns about its own deprecations
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)  # nodes are copied, their meta (FakeTensors) shared
    return graph, set(gm._modules), set(gm._parameters), set(gm._buffers), set(gm.__dict__)


def _restore(gm: fx.GraphModule, saved: tuple) -> None:
    graph, modules, params, buffers, attrs = saved
    for key in set(gm._modules) - modules:
        del gm._modules[key]
    for key in set(gm._parameters) - params:
        del gm._parameters[key]
    for key in set(gm._buffers) - buffers:
        del gm._buffers[key]
    for key in set(gm.__dict__) - attrs:
        del gm.__dict__[key]
    gm.graph = graph
