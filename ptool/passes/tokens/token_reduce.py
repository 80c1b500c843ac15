"""``token-reduce``: training-free token reduction inside or between the blocks of a transformer encoder.

At each stage the residual stream ``X`` (``(B, N, d)``) becomes ``X' = T X`` with ``M < N`` tokens (Token
Transforming; ToMe's merging, EViT's pruning and fusing are its special cases, see
:mod:`ptool.passes.tokens.transform` for the maths). The prefix tokens (CLS, a distillation token) are
kept apart. Everything after the stage then runs on ``M`` tokens: the graph's static shapes
(``view(x, [8, 17, -1, 12])``) are rewritten to the new count, and tensors that enter the reduced
blocks from outside with a token axis (the attention mask) are gathered at the kept tokens (sliced
where they do not depend on the inputs and hide nothing: ViT's all-true mask). Graph
outputs that are per-token (a ``last_hidden_state``) are un-merged back to ``N`` tokens before they
leave (``X ~= W X'``), so the model keeps its output structure; a CLS-pooled output needs no
un-merging.

**Where.** ``where=mlp`` (the default, ToMe's and EViT's placement): inside each block, on the stream
after the attention's residual sum and before the MLP, so the block's own MLP already runs on ``M``
tokens and the block's own attention (computed anyway) gives the CLS-attention importance and the keys.
``where=block``: before the block, from the previous block's attention (the token norm before the first).

**Proportional attention** (ToMe, on by default): each token carries its size ``s`` (how many original
tokens it stands for; a ``(B, M)`` tensor of fixed length per stage, so the shapes stay static), merged
tokens are size-weighted means, and every later attention adds ``log s`` to its logits - a merged
key gets the attention its ``s`` members would have had together.

**Approximate, training-free.** The model's function changes; the declared bound is the cosine of
the outputs against the pass's input (0.9, claimed at the default options on any ``layers`` but the
first block's). Measured on the digits models (``BENCHMARKS.md``, section ``token-reduce``): at 40%
fewer FLOPs the defaults keep the digits DeiT's and the digits ViT's top-1 within a point.

**Finding blocks.** A block is found from its attention site (:mod:`ptool.passes.attention.sites`):
the block input is what its query projection reads - the input of the pre-norm (ViT, DeiT) or the
post-norm output the residual also reads (BERT); the stream after the attention is the residual sum of
the attention output and that input (post-norm: the norm of that sum). ``layers=`` selects the sites
(blocks) with a stage; by default every block (``where=mlp``) or every block but the first (``block``).

**Limits** (each a skip with its reason): causal attention (decoders need every position);
cross-attention; a block input that is not ``(batch, tokens, width)``; a graph where the token
count equals another dimension (the batch, the width: its shapes would be ambiguous) - the kept
count is moved by a token or two when it would collide with another dimension; a per-token output
with the tokens on another axis than 1; proportional attention is added to SDPA sites and to
written-out softmaxes over ``(B, H, N, M)`` scores (others run without it).
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


def after_attention(site: AttentionSite, x: fx.Node) -> tuple[fx.Node | None, str]:
    """The residual stream after the block's attention, ``x + attention(x)`` (post-norm: that sum's norm):
    where ``where=mlp`` reduces; else a reason."""
    frontier, seen = [site.output], {site.output}
    for _ in range(16):  # through the output projection, layout ops, a dropout
        ahead = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if is_op(user, aten.add.Tensor) and x in user.args[:2]:
                    users = list(user.users)
                    mid = users[0] if len(users) == 1 and is_op(users[0], *_NORMS) else user
                    if _shape(mid) != _shape(x):
                        return None, f"the stream after the attention has shape {_shape(mid)}, not {_shape(x)}"
                    return mid, ""
                ahead.append(user)
        frontier = ahead
    return None, "no residual sum of the attention output and the block input (where=mlp needs one)"


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
        keep: fraction of the (non-prefix) tokens each stage keeps, in (0, 1) (``schedule=geometric``);
            with ``schedule=constant`` every stage removes the count the first stage removes.
        layers: attention sites (blocks) whose stage to apply, in graph order; empty: every block
            (``where=mlp``) or every block but the first (``where=block``).
        where: ``mlp`` - inside the block, after the attention and before the MLP (ToMe, EViT: the
            block's own MLP already runs on fewer tokens, and the block's own attention gives the
            importance and keys); ``block`` - before the block (the previous block's attention).
        method: ``transform`` (many-to-many, softmax similarities), ``merge`` (each token averaged into
            its most similar anchor), ``prune`` (the anchors only), ``fuse`` (EViT: the anchors, and every
            other token fused into one token, attention-weighted) or ``bipartite`` (ToMe's bipartite
            matching: alternate tokens, the best-matched pairs merged; needs no importance).
        importance: how anchors are chosen: ``cls-attention`` (the attention the CLS query gave each
            token; the token norm where there is no attention before the stage) or ``norm``.
        similarity: what the cosine similarities of ``transform``, ``merge`` and ``bipartite`` compare:
            ``keys`` (the attention's keys, mean over heads, as ToMe; the tokens where there is no
            attention) or ``hidden`` (the tokens).
        proportional: ToMe's proportional attention: carry each token's size (how many original
            tokens it stands for), average merged tokens by size and add ``log(size)`` to the attention
            logits of the later blocks. Nothing to do for ``prune`` (every kept token stands for itself).
        schedule: ``geometric`` (each stage keeps ``keep`` of its input) or ``constant`` (ToMe's fixed
            ``r`` per stage).
        temperature: softmax temperature of ``transform`` over cosine similarities (> 0). The default 0.005
            is a sharp softmax: ``merge`` where one anchor is clearly the most similar, a split between
            near-tied anchors - continuous in the inputs, so ONNX Runtime and TVM keep to 1e-4 of torch where
            ``merge``'s hard choice flips on float rounding (by 0.03 on the digits DeiT's logits).
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

    keep: float = 0.8
    layers: tuple[int, ...] = ()
    where: Literal["mlp", "block"] = "mlp"
    method: Literal["transform", "merge", "prune", "fuse", "bipartite"] = "transform"
    importance: Literal["cls-attention", "norm"] = "cls-attention"
    similarity: Literal["hidden", "keys"] = "hidden"
    proportional: bool = True
    schedule: Literal["geometric", "constant"] = "geometric"
    temperature: float = 0.005
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
        chosen = set(self.layers) if self.layers else set(range(0 if self.where == "mlp" else 1, len(sites)))
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
        first_removed = None  # schedule=constant: what the first stage removed
        done: list[_Stage] = []
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
            if x is not None and self.where == "mlp":
                x, why = after_attention(site, x)
            if x is None:
                result.skip(site.label, why)
                continue
            if self.where == "mlp":
                prev = site
            else:
                prev = sites[site.index - 1] if site.index > 0 else None
            if prev is not None and (prev.causal or prev.q_len != prev.kv_len):
                prev = None
            n = _shape(x)[1]
            want = self._count(n - prefix, first_removed)
            try:
                stage = self._stage(gm, site, x, prev, outputs, latest, prefix, uniform, want,
                                    done[-1].size if done and self._sized else None)
            except _Refused as e:
                result.skip(site.label, str(e))
                continue
            for value, new in stage.gathered.items():
                origin = next((o for o, g in latest.items() if g is value), value)
                latest[origin] = new
            first_removed = n - stage.m if first_removed is None else first_removed
            done.append(stage)
            stages.append(f"{n}->{stage.m}")
            reduced[site.index] = stage.m
            result.hit()
        if result.rewritten and self._sized:
            biased = _proportional_attention(gm, sites, done)
            result.notes["proportional_sites"] = biased
        if result.rewritten:
            eliminate_dead_code(gm)
            gm.recompile()
            after = estimate_flops(gm).total
            result.notes["tokens_per_stage"] = ", ".join(stages)
            result.notes["tokens_per_block"] = "/".join(_per_block(sites, reduced, inside=self.where == "mlp"))
            result.notes["flops_before"] = before
            result.notes["flops_after"] = after
            result.notes["flops_removed"] = round(1 - after / before, 4) if before else 0.0
        return result

    @property
    def _sized(self) -> bool:
        """Whether tokens carry sizes (proportional attention, size-weighted means)."""
        return self.proportional and self.method != "prune"

    # -- one stage ------------------------------------------------------------------------------

    def _count(self, np_: int, first_removed: int | None) -> int:
        """Tokens (after the prefix) a stage with ``np_`` of them keeps, before moving it off other dimensions."""
        if self.schedule == "constant" and first_removed is not None:
            mp = np_ - first_removed
        else:
            mp = round(self.keep * np_)
        return max(mp, self._least(np_))

    def _least(self, np_: int) -> int:
        """The fewest tokens a stage can keep: bipartite matching merges at most half, fuse keeps an anchor and the fused token."""
        return {"bipartite": np_ // 2, "fuse": 2}.get(self.method, 1)

    def _stage(self, gm: fx.GraphModule, site: AttentionSite, x: fx.Node, prev: AttentionSite | None,
               outputs: list, latest: dict[fx.Node, fx.Node], p: int, uniform, mp: int,
               size: fx.Node | None) -> _Stage:

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
        m = p + mp
        least = self._least(n - p)
        while mp > least and (m in taken or b * m in taken or m == b):
            mp, m = mp - 1, m - 1
        if m in taken or b * m in taken or m == b:
            raise _Refused(f"every kept count collides with another dimension of the graph ({sorted(taken)[:8]}...)")
        if mp >= n - p:
            raise _Refused(f"keep={self.keep:g} ({self.schedule}, method {self.method}) keeps all {n - p} tokens")
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
                return self._rewrite(gm, site, x, prev, outputs, latest, p, mp, sub, region, exits, inner, flat, size)
            except _Refused as e:
                failure = e
        raise failure

    def _rewrite(self, gm, site, x, prev, outputs, latest, p, mp, sub, region, exits, inner,
                 uniform, size) -> _Stage:
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
                                                temperature=self.temperature, scale=prev.scale if prev else 1.0,
                                                similarity=self.similarity, weighted=self._sized))
            undo.modules.append(name)
            anchor = x.next
            with graph.inserting_before(anchor):
                def emit(op, args):
                    undo.added.append(graph.call_function(op, args))
                    return undo.added[-1]

                extra: dict = {"size": size}
                if prev is not None:
                    # the attention ran on n tokens: its layout's shapes follow the count
                    now = {prev.q_len: n, b * prev.q_len: b * n} if prev.q_len != n else {}

                    def emit_now(op, args):
                        return emit(op, _map_ints(args, now))

                    q, k, _, mask = prev.kernel_inputs(lambda node: latest.get(node, node), emit_now)
                    wanted = self.importance == "cls-attention" or self.method == "bipartite"
                    extra.update(q=q if wanted else None, k=k, mask=mask)
                reducer = graph.call_module(name, (x,), extra)
                undo.added.append(reducer)
                parts = []
                for i in range(4):
                    parts.append(graph.call_function(operator.getitem, (reducer, i)))
                    undo.added.append(parts[-1])
            reduced, assignment, kept, new_size = parts
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
        return _Stage(m=m, reduced=reduced, size=new_size, gathered=gathered)

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


@dataclass
class _Stage:
    """One applied stage: the kept count, the reduced stream, the tokens' sizes, the tensors gathered for it."""

    m: int
    reduced: fx.Node
    size: fx.Node
    gathered: dict[fx.Node, fx.Node]


_SOFTMAX = (aten._softmax.default, aten.softmax.int)


def _proportional_attention(gm: fx.GraphModule, sites: list[AttentionSite], stages: list[_Stage]) -> int:
    """ToMe's proportional attention: ``log(size)`` of the newest stage before each attention added to its
    logits (a key standing for s tokens gets the attention s copies of it would); returns how many sites."""
    biased = 0
    for site in sites:
        before = ancestors(site.q)
        stage = next((s for s in reversed(stages) if s.reduced in before), None)
        if stage is not None and _add_log_size(gm, site, stage.size):
            biased += 1
    gm.recompile()
    refresh_meta(gm)
    return biased


def _add_log_size(gm: fx.GraphModule, site: AttentionSite, size: fx.Node) -> bool:
    """``log(size)`` (``(B, M)``, as ``(B, 1, 1, M)``) added to ``site``'s logits: to an SDPA's mask (or as
    its mask), before a written-out softmax over ``(B, H, N, M)`` scores. False where neither fits."""
    graph = gm.graph
    b, m = _shape(size)

    def keys_fit(node: Any) -> bool:  # scores or keys (B, H, M, ...) on this stage's tokens
        shape = _shape(node)
        return shape is not None and len(shape) == 4 and shape[0] == b and m in shape[2:]

    def bias_before(node: fx.Node) -> fx.Node:
        with graph.inserting_before(node):
            logs = graph.call_function(aten.log.default, (graph.call_function(aten.clamp_min.default, (size, 1e-30)),))
            return graph.call_function(aten.unsqueeze.default, (graph.call_function(aten.unsqueeze.default,
                                                                                    (logs, 1)), 1))

    if site.form == "sdpa" and site.rank == 4:
        node = site.nodes[0]
        if not keys_fit(node.args[1]) or _shape(node.args[1])[2] != m:
            return False
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        bias = bias_before(node)
        with graph.inserting_before(node):
            if mask is None:
                new = bias
            elif mask.meta.get("val") is not None and mask.meta["val"].dtype == torch.bool:
                new = graph.call_function(aten.where.ScalarOther, (mask, bias, float(torch.finfo(torch.float32).min)))
            else:
                new = graph.call_function(aten.add.Tensor, (mask, bias))
        if len(node.args) > 3:
            node.args = (*node.args[:3], new, *node.args[4:])
        else:
            node.kwargs = {**node.kwargs, "attn_mask": new}
        return True
    soft = next((n for n in site.nodes if is_op(n, *_SOFTMAX)), None)
    scores = soft.args[0] if soft is not None else None
    if scores is None or not keys_fit(scores) or _shape(scores)[3] != m:
        return False
    bias = bias_before(soft)
    with graph.inserting_before(soft):
        added = graph.call_function(aten.add.Tensor, (scores, bias))
    soft.args = (added, *soft.args[1:])
    return True


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


def _per_block(sites: list[AttentionSite], reduced: dict[int, int], *, inside: bool) -> list[str]:
    """Tokens each block runs on: ``before`` -> a stage's count; ``inside`` a block: ``attention>MLP``
    where they differ (``17>9``)."""
    out: list[str] = []
    count = sites[0].q_len if sites else 0
    for site in sites:
        after = reduced.get(site.index, count)
        out.append(str(after) if not inside else f"{count}>{after}" if after != count else str(count))
        count = after
    return out
