"""``token-reduce``: training-free token reduction between the blocks of a transformer encoder.

Before each chosen block the residual stream ``X`` (``(B, N, d)``) becomes ``X' = T X`` with
``M < N`` tokens (Token Transforming; ToMe-style merging and pruning are its special cases, see
:mod:`ptool.passes.tokens.transform` for the maths). The prefix tokens (CLS, a distillation token) are
kept apart. Everything after the block then runs on ``M`` tokens: the graph's static shapes
(``view(x, [8, 17, -1, 12])``) are rewritten to the new count, and tensors that enter the reduced
blocks from outside with a token axis (the attention mask) are gathered at the kept tokens (sliced
where they do not depend on the inputs and hide nothing: ViT's all-true mask). Graph
outputs that are per-token (a ``last_hidden_state``) are un-merged back to ``N`` tokens before they
leave (``X ~= W X'``), so the model keeps its output structure; a CLS-pooled output needs no
un-merging.

**Approximate, training-free.** The model's function changes; the declared bound is the cosine of
the outputs against the pass's input (0.9, claimed at the default ``keep`` from the second block on). Measured on the digits models (``BENCHMARKS.md``,
section ``token-reduce``).

**Finding blocks.** A block is found from its attention site (:mod:`ptool.passes.attention.sites`):
the block input is what its query projection reads - the input of the pre-norm (ViT, DeiT) or the
post-norm output the residual also reads (BERT). ``layers=`` selects the sites (blocks) to reduce
*before*; by default every block but the first, ToMe's schedule. The previous block's attention gives
the importance (CLS attention); before the first block the token norm does.

**Limits** (each a skip with its reason): causal attention (decoders need every position);
cross-attention; a block input that is not ``(batch, tokens, width)``; a graph where the token
count equals another dimension (the batch, the width: its shapes would be ambiguous) - the kept
count is moved by a token or two when it would collide with another dimension; a per-token output
with the tokens on another axis than 1.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

from ptool.errors import PassError, first_line
from ptool.ir.analysis import ancestors, descendants
from ptool.ir.flops import estimate_flops
from ptool.ir.graph import eliminate_dead_code, is_op, refresh_meta
from ptool.ir.noise import CAST_OPS, IDENTITY_OPS, LAYOUT_OPS, scale_step
from ptool.ir.record import record_values
from ptool.passes.attention.sites import AttentionSite
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.verify import Lossy, Numerics

aten = torch.ops.aten

_LINEAR = (aten.linear.default,)
_NORMS = (aten.layer_norm.default, aten.rms_norm.default) if hasattr(aten, "rms_norm") else (aten.layer_norm.default,)
_UNMERGE_META = "ptool.token_unmerge"


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _projection_input(node: fx.Node) -> fx.Node | None:
    """The input of the linear layer that produced ``node`` (through layout ops, casts, a scale)."""
    for _ in range(12):
        if is_op(node, *_LINEAR):
            return node.args[0]
        if node.op != "call_function":
            return None
        if node.target in LAYOUT_OPS | CAST_OPS | IDENTITY_OPS or scale_step(node) is not None:
            node = node.args[0]
            continue
        return None
    return None


def block_input(site: AttentionSite, tokens: int | None = None) -> tuple[fx.Node | None, str]:
    """The residual-stream node a block starts from, found from its attention site; else a reason.

    ``tokens``: the count the block runs on now (after earlier stages); default the site's own.
    """
    tokens = site.q_len if tokens is None else tokens
    xq, xk = _projection_input(site.q), _projection_input(site.k)
    if xq is None or not isinstance(xq, fx.Node):
        return None, "the query is not a linear projection of the block input"
    if xk is not xq:
        return None, "queries and keys are projected from different inputs (cross-attention)"
    x = xq
    if is_op(xq, *_NORMS) and all(is_op(u, *_LINEAR) for u in xq.users):  # pre-norm: the stream is its input
        x = xq.args[0]
    shape = _shape(x)
    if shape is None or len(shape) != 3 or shape[1] != tokens:
        return None, f"the block input is not (batch, tokens, width) with {tokens} tokens (shape {shape})"
    return x, ""


def _grid_prefix(gm: fx.GraphModule, n: int) -> int:
    """CLS (+ distillation token) in front of a square patch grid in vision models, else 1 (a CLS)."""
    if any(is_op(node, aten.conv2d.default, aten.convolution.default) for node in gm.graph.nodes):
        for p in (1, 2, 0):
            side = math.isqrt(max(n - p, 0))
            if side >= 2 and side * side == n - p:
                return p
    return 1


def _map_ints(value: Any, sub: dict[int, int]) -> Any:
    """``value`` with every int (not bool) in ``sub`` replaced, through lists and tuples."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return sub.get(value, value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_ints(v, sub) for v in value)
    return value


def _sizes(value: Any, out: set[int]) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        out.add(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _sizes(v, out)


class _Undo:
    """What one stage changed in the graph, to put back when it cannot be completed."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.args: dict[fx.Node, tuple[tuple, dict]] = {}
        self.added: list[fx.Node] = []
        self.modules: list[str] = []

    def set_args(self, node: fx.Node, args: tuple, kwargs: dict) -> None:
        self.args.setdefault(node, (node.args, dict(node.kwargs)))
        node.args, node.kwargs = args, kwargs

    def rollback(self) -> None:
        for node, (args, kwargs) in self.args.items():
            node.args, node.kwargs = args, kwargs
        for node in reversed(self.added):  # consumers were added after their inputs
            self.gm.graph.erase_node(node)
        for name in self.modules:
            delattr(self.gm, name)
        self.gm.recompile()


@dataclass(frozen=True, kw_only=True)
class TokenReduce(Pass):
    """Reduce the tokens between encoder blocks, X' = T X (Token Transforming; merge and prune as special cases).

    Args:
        keep: fraction of the (non-prefix) tokens each stage keeps, in (0, 1).
        layers: attention sites (blocks) to reduce before, in graph order; empty: every block but
            the first.
        method: ``transform`` (many-to-many, softmax similarities), ``merge`` (ToMe-style: each
            token averaged into its most similar anchor) or ``prune`` (the anchors only).
        importance: how anchors are chosen: ``cls-attention`` (the attention the CLS query gave each
            token in the previous block; the token norm before the first block) or ``norm``.
        temperature: softmax temperature of ``transform`` over cosine similarities (> 0).
        prefix: tokens kept apart at the front; -1: CLS (+ a distillation token in front of a
            square patch grid), i.e. 1 or 2.
    """

    name: ClassVar[str] = "token-reduce"
    family: ClassVar[Family] = Family.TOKENS
    # Cosine of the outputs vs the pass's input, claimed at the default keep from the second block on:
    # 0.93 on a random-weight BERT with 16 tokens (the least redundant case), 0.999 on a random ViT;
    # 0.95-0.96 on the logits of the trained 66-token digits DeiT at 42% fewer FLOPs, 0.97 at 36%
    # (BENCHMARKS.md, "token-reduce").
    numerics: ClassVar[Numerics] = Lossy("cosine", 0.9)

    keep: float = 0.7
    layers: tuple[int, ...] = ()
    method: Literal["transform", "merge", "prune"] = "transform"
    importance: Literal["cls-attention", "norm"] = "cls-attention"
    temperature: float = 0.1
    prefix: int = -1

    def __post_init__(self) -> None:
        if not 0 < self.keep < 1:
            raise ValueError(f"keep must be a fraction in (0, 1) of the tokens each stage keeps, got {self.keep}")
        if any(i < 0 for i in self.layers):
            raise ValueError(f"layers must be non-negative attention-site indices, got {self.layers}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.prefix < -1:
            raise ValueError(f"prefix must be >= 0, or -1 for the CLS (+ distillation) token; got {self.prefix}")

    # -- run ------------------------------------------------------------------------------------

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from ptool.passes.attention.swap import scan_of

        result = PassResult()
        call = (tuple(ctx.example_inputs), dict(ctx.example_kwargs)) if ctx.example_inputs or ctx.example_kwargs else None
        sites = scan_of(gm, call).sites
        if self.layers and (not sites or max(self.layers) >= len(sites)):
            allowed = f"allowed indices: 0..{len(sites) - 1}" if sites else "leave layers empty"
            raise PassError(f"pass '{self.name}': layers={'+'.join(map(str, self.layers))} but the graph has "
                            f"{len(sites)} attention site(s) ({allowed})")
        result.notes["attention_sites"] = len(sites)
        if not sites:
            return result
        chosen = set(self.layers) if self.layers else set(range(1, len(sites)))
        before = estimate_flops(gm).total
        outputs = [_shape(a) for a in _output_leaves(gm)]
        stages: list[str] = []
        reduced: dict[int, int] = {}
        # read from the model's own token count: a reduced count may look like a grid (49 = 7 x 7)
        prefix = _grid_prefix(gm, sites[0].q_len) if self.prefix < 0 else self.prefix
        result.notes["prefix_tokens"] = prefix

        def uniform(value: fx.Node, axes: tuple[int, ...]) -> bool:
            """Whether ``value`` does not depend on the inputs and is constant along ``axes`` (a mask
            that hides nothing): then the kept tokens' rows are any rows, and a slice replaces the gather."""
            if call is None or any(a.op == "placeholder" for a in ancestors(value)):
                return False
            try:
                t = record_values(gm, [value], [call])[0][value]
            except Exception:  # noqa: BLE001 - not evaluable here: gather it
                return False
            if not isinstance(t, torch.Tensor):
                return False
            first = t
            for axis in axes:
                first = first.narrow(axis, 0, 1)
            return bool((t == first).all())
        latest: dict[fx.Node, fx.Node] = {}  # a tensor entering the blocks -> its newest gathered version
        for site in sites:
            if site.index not in chosen:
                continue
            if site.causal:
                result.skip(site.label, "causal attention: every position attends its past, so tokens cannot be merged")
                continue
            if site.q_len != site.kv_len:
                result.skip(site.label, "queries and keys differ in length (cross-attention)")
                continue
            x, why = block_input(site, reduced[max(reduced)] if reduced else site.q_len)
            if x is None:
                result.skip(site.label, why)
                continue
            prev = sites[site.index - 1] if site.index > 0 and self.importance == "cls-attention" else None
            if prev is not None and (prev.causal or prev.q_len != prev.kv_len):
                prev = None
            try:
                n, m, gathered = self._stage(gm, site, x, prev, outputs, latest, prefix, uniform)
            except _Refused as e:
                result.skip(site.label, str(e))
                continue
            for value, new in gathered.items():
                origin = next((o for o, g in latest.items() if g is value), value)
                latest[origin] = new
            stages.append(f"{n}->{m}")
            reduced[site.index] = m
            result.hit()
        if result.rewritten:
            eliminate_dead_code(gm)
            gm.recompile()
            after = estimate_flops(gm).total
            result.notes["tokens_per_stage"] = ", ".join(stages)
            result.notes["tokens_per_block"] = "/".join(map(str, _per_block(sites, reduced)))
            result.notes["flops_before"] = before
            result.notes["flops_after"] = after
            result.notes["flops_removed"] = round(1 - after / before, 4) if before else 0.0
        return result

    # -- one stage ------------------------------------------------------------------------------

    def _stage(self, gm: fx.GraphModule, site: AttentionSite, x: fx.Node, prev: AttentionSite | None,
               outputs: list, latest: dict[fx.Node, fx.Node], p: int, uniform) -> tuple[int, int, dict[fx.Node, fx.Node]]:

        b, n, _ = _shape(x)
        if n - p < 2:
            raise _Refused(f"{n} tokens with {p} kept apart leave nothing to reduce")
        region = descendants(x)
        exits = {node for node in region if node.op == "output" or node.meta.get(_UNMERGE_META)}
        inner = [node for node in gm.graph.nodes if node in region and node not in exits]
        taken: set[int] = set()
        for node in inner:
            if node.op == "call_function":
                _sizes(node.args, taken)
                _sizes(tuple(node.kwargs.values()), taken)
            if _shape(node):
                taken.update(_shape(node))
        taken -= {n, b * n}
        mp = max(1, round(self.keep * (n - p)))
        m = p + mp
        while mp > 1 and (m in taken or b * m in taken or m == b):
            mp, m = mp - 1, m - 1
        if m in taken or b * m in taken or m == b:
            raise _Refused(f"every kept count collides with another dimension of the graph ({sorted(taken)[:8]}...)")
        if mp >= n - p:
            raise _Refused(f"keep={self.keep:g} keeps all {n - p} tokens")
        # the tensors entering the blocks that hide nothing (read now, while the graph is whole)
        entering = {v for node in inner for v in node.all_input_nodes
                    if v not in region and v is not x and v.op not in ("get_attr", "placeholder")}
        flat = set()
        for v in entering:
            axes = tuple(a for a, size in enumerate(_shape(v) or ()) if a > 0 and size == n)
            if axes and uniform(v, axes):
                flat.add(v)
        # Sizes equal to n (and batch * n, where the rows are flattened) are the token count: first try n
        # alone (batch * n may be another dimension: 2 x 16 tokens = a width of 32), then both.
        failure = None
        for sub in ({n: m}, {n: m, b * n: b * m}) if b > 1 else ({n: m},):
            try:
                return n, m, self._rewrite(gm, site, x, prev, outputs, latest, p, mp, sub, region, exits, inner,
                                                 flat)
            except _Refused as e:
                failure = e
        raise failure

    def _rewrite(self, gm, site, x, prev, outputs, latest, p, mp, sub, region, exits, inner,
                 uniform) -> dict[fx.Node, fx.Node]:
        """Apply one stage with the size substitution ``sub``; put the graph back and raise _Refused on failure."""
        from ptool.passes.tokens.transform import TokenGather, TokenReducer, TokenUnmerge

        b, n, _ = _shape(x)
        m = p + mp
        old = {node: _shape(node) for node in region}

        undo = _Undo(gm)
        graph = gm.graph
        try:
            name = _free_name(gm, f"ptool_token_reduce_{site.index}")
            gm.add_submodule(name, TokenReducer(prefix=p, keep_count=mp, method=self.method,
                                                temperature=self.temperature, scale=prev.scale if prev else 1.0))
            undo.modules.append(name)
            anchor = x.next
            with graph.inserting_before(anchor):
                def emit(op, args):
                    undo.added.append(graph.call_function(op, args))
                    return undo.added[-1]

                extra: tuple = ()
                if prev is not None:
                    q, k, _, mask = prev.kernel_inputs(lambda node: latest.get(node, node), emit)
                    extra = (q, k, mask)
                reducer = graph.call_module(name, (x, *extra))
                undo.added.append(reducer)
                parts = []
                for i in range(3):
                    parts.append(graph.call_function(operator.getitem, (reducer, i)))
                    undo.added.append(parts[-1])
            reduced, assignment, kept = parts
            for node in (reducer, *parts):
                node.meta["nn_module_stack"] = x.meta.get("nn_module_stack", {})
            # every user of the block input inside the blocks reads the reduced stream
            for user in list(x.users):
                if user in inner:
                    undo.set_args(user, *_replace(user, x, reduced))
            # shapes written into the graph follow the new count; tensors entering with tokens are gathered
            gathered: dict[fx.Node, fx.Node] = {}
            for node in inner:
                args, kwargs = _map_ints(node.args, sub), _map_ints(node.kwargs, sub)
                for value in node.all_input_nodes:
                    if value in region or value is x or value in (reducer, *parts) or value in undo.added:
                        continue
                    shape = _shape(value)
                    axes = tuple(a for a, s in enumerate(shape or ()) if a > 0 and s == n)
                    if not axes:
                        continue
                    if value.op in ("get_attr", "placeholder"):
                        raise _Refused(f"'{value.name}' {shape} enters the blocks with the token count {n} in its "
                                       "shape (a weight or an input of that size: ambiguous)")
                    if shape[0] not in (b, 1):
                        raise _Refused(f"'{value.name}' {shape} enters the blocks with {n} tokens but no batch axis")
                    if value not in gathered and value in uniform:  # e.g. ViT's all-true mask: a slice will do
                        with graph.inserting_before(node):
                            cut = value
                            for axis in axes:
                                cut = graph.call_function(aten.slice.Tensor, (cut, axis, 0, m))
                                undo.added.append(cut)
                        gathered[value] = cut
                    if value not in gathered:
                        gname = _free_name(gm, f"ptool_token_gather_{site.index}")
                        gm.add_submodule(gname, TokenGather(axes))
                        undo.modules.append(gname)
                        with graph.inserting_before(node):
                            gathered[value] = graph.call_module(gname, (value, kept))
                        undo.added.append(gathered[value])
                    args = _replace_in(args, value, gathered[value])
                    kwargs = _replace_in(kwargs, value, gathered[value])
                if (args, kwargs) != (node.args, dict(node.kwargs)):
                    undo.set_args(node, args, kwargs)
            # per-token values leaving the blocks are un-merged back to n tokens
            uname = None
            for node in exits:
                for value in node.all_input_nodes:
                    if value not in region and value not in (reducer, *parts):
                        continue
                    shape = _shape(value)
                    if shape is None or n not in shape[1:]:
                        continue
                    if len(shape) != 3 or shape[1] != n or n in shape[2:]:
                        raise _Refused(f"the output '{value.name}' {shape} is per-token with the tokens not on "
                                       "axis 1 of (batch, tokens, width); it cannot be un-merged")
                    if uname is None:
                        uname = _free_name(gm, f"ptool_token_unmerge_{site.index}")
                        gm.add_submodule(uname, TokenUnmerge(p))
                        undo.modules.append(uname)
                    with graph.inserting_before(node):
                        un = graph.call_module(uname, (value, assignment))
                    un.meta[_UNMERGE_META] = True
                    undo.added.append(un)
                    undo.set_args(node, *_replace(node, value, un))
            gm.recompile()
            refresh_meta(gm)
            self._check(gm, old, sub, exits, outputs)
        except _Refused:
            undo.rollback()
            _refresh_quietly(gm)
            raise
        except Exception as e:  # a shape the count did not reach: the graph is put back as it was
            undo.rollback()
            _refresh_quietly(gm)
            raise _Refused(f"the blocks do not run on {m} tokens ({first_line(e)})") from e
        return gathered

    @staticmethod
    def _check(gm: fx.GraphModule, old: dict, sub: dict[int, int], exits: set, outputs: list) -> None:
        for node, shape in old.items():
            if node in exits or shape is None:
                continue
            want = tuple(sub.get(s, s) for s in shape)
            if _shape(node) != want:
                raise _Refused(f"'{node.name}' has shape {_shape(node)} on the reduced tokens, expected {want} (the "
                               "token count equals another dimension of the graph)")
        now = [_shape(a) for a in _output_leaves(gm)]
        if now != outputs:
            raise _Refused(f"the outputs would change shape ({outputs} -> {now})")


class _Refused(Exception):
    """A stage that cannot be applied: the message is the skip reason."""


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name = base
    while hasattr(gm, name):
        name += "_"
    return name


def _replace_in(value: Any, old: fx.Node, new: fx.Node) -> Any:
    if value is old:
        return new
    if isinstance(value, (list, tuple)):
        return type(value)(_replace_in(v, old, new) for v in value)
    if isinstance(value, dict):
        return {k: _replace_in(v, old, new) for k, v in value.items()}
    return value


def _replace(node: fx.Node, old: fx.Node, new: fx.Node) -> tuple[tuple, dict]:
    return _replace_in(node.args, old, new), _replace_in(dict(node.kwargs), old, new)


def _output_leaves(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return [a for a in out.all_input_nodes]


def _refresh_quietly(gm: fx.GraphModule) -> None:
    try:
        refresh_meta(gm)
    except Exception:  # the rolled-back graph is the one that ran before; its old metadata stays
        pass


def _per_block(sites: list[AttentionSite], reduced: dict[int, int]) -> list[int]:
    """Tokens each block runs on: a reduced block its stage's count, another its predecessor's."""
    out: list[int] = []
    for site in sites:
        out.append(reduced.get(site.index, out[-1] if out else site.q_len))
    return out
