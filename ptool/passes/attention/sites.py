"""Attention sites: one canonical description of every softmax attention in an exported graph.

Real models spell attention many ways after ``torch.export``:

* a ``scaled_dot_product_attention`` node - Hugging Face's ``sdpa`` implementation and
  ``nn.MultiheadAttention`` both export to it;
* a written-out softmax ``product(q, k) -> scale -> (+ terms) -> softmax -> product(., v)``
  (``attn_implementation="eager"``, Swin, MaxViT, ...): ``matmul``, ``bmm`` or ``einsum``
  products on 3-, 4- or 5-D tensors, the scale on q, k or the scores, any number of added
  biases and masks, views between the scores and the softmax. :mod:`.canonical` and
  :mod:`.score_path` read every such spelling as one form.

Both become an :class:`AttentionSite`: the q/k/v nodes as the graph has them with the
:class:`~.canonical.Layout` mapping each to the canonical ``(B, H, N, D)`` (5-D sites are flattened
to ``(B * W, H, N, D)``; for grouped-query models k and v after ``repeat_kv``), the score terms
(masks and biases, each mapped to ``(B, H, N, M)``), the scale, the causal flag, the head counts
and the nodes the site owns. A written-out site is only replaceable when its interior (scores,
probabilities) is used by nothing else - a model that returns its attention weights keeps them,
and the site is reported with that reason.

**Never silent.** Every softmax whose output feeds a product (``matmul``/``bmm``/``einsum``, also
through a few layout ops, a linear layer or a scale) is either a site or a :class:`SoftmaxSkip`
with the reason it is not one (talking heads, channel attention, factorized attention, a
tensor-valued temperature, ...). The attention passes report the skips, and so does
``ptool inspect``.

**Masks and biases.** A term is a *mask* when it only hides keys (boolean, or additive entries that
are 0 or ``<= MASKED``) and a *bias* otherwise (a relative-position bias, Swin's ``-100`` shift
mask); the roles are read from the terms' values on the example inputs (or, for terms that do not
depend on the inputs, computed from the weights). A biased site is only given to kernels that
apply the bias (:attr:`~.kernel.AttentionKernel.takes_bias`).

**Causality** is read from the graph where it is explicit (``is_causal=True``) and otherwise
measured on the example inputs: transformers folds the causal part into the mask, so a site is
causal when no query may see a later key *and* some key is hidden from earlier queries but seen by
later ones (that second half tells a causal mask from right padding).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ptool.ir.analysis import users_outside
from ptool.ir.graph import is_op, module_path
from ptool.ir.noise import node_args
from ptool.passes.attention import canonical, score_path
from ptool.passes.attention.canonical import Layout, ScoreTerm
from ptool.passes.attention.kernel import MASKED, SiteShape, allowed

aten = torch.ops.aten

_SDPA = (aten.scaled_dot_product_attention.default,)
_REPEAT_KV = frozenset({aten.reshape.default, aten.view.default, aten.expand.default, aten.unsqueeze.default,
                        aten._unsafe_view.default, aten.transpose.int})
_MIN = float(torch.finfo(torch.float32).min)

Emit = Callable[[Any, tuple], Any]
"""Builds one op: ``emit(op, args)`` - runs it on tensors, or writes a ``call_function`` into a graph."""


def run_op(op: Any, args: tuple) -> Any:
    """The eager :data:`Emit`: ``op(*args)``."""
    return op(*args)


@dataclass
class AttentionSite:
    """One softmax attention in the graph.

    Attributes:
        index: position among the graph's attention sites (graph order; what ``layers=`` selects).
        form: ``"sdpa"`` or ``"eager"`` (a written-out softmax).
        output: the node producing the attended values, in the graph's own layout.
        q, k, v: the query / key / value operands as the graph has them (``k`` may be ``k^T``, as
            ``q @ k^T`` consumed it); ``q_layout`` / ``k_layout`` / ``v_layout`` map them to
            ``(B, H, N, D)`` / ``(B, H, M, D)`` / ``(B, H, M, Dv)``, and ``out_layout`` maps the
            kernel's ``(B, H, N, Dv)`` back to ``output``'s layout.
        terms: what is added to (or masked out of) the scores besides ``q k^T * scale``.
        scale: the softmax scale (1 when the model scaled q or k instead).
        causal: see the module docstring.
        heads / kv_heads / head_dim / value_dim / q_len / kv_len: the site's canonical geometry.
        module: the dotted path of the module the attention came from.
        nodes: the nodes the site owns, consumer first (erased when it is replaced).
        problem: why the site cannot be replaced (``None`` if it can).
        spelling: ``sdpa``, ``matmul``, ``bmm``, ``einsum`` (``a+b`` when the two products differ).
        rank: the rank of q as the graph has it (5 for MaxViT's windows).
    """

    index: int
    form: str
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    causal: bool
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    q_len: int
    kv_len: int
    module: str
    terms: list[ScoreTerm] = field(default_factory=list)
    q_layout: Layout = field(default_factory=Layout)
    k_layout: Layout = field(default_factory=Layout)
    v_layout: Layout = field(default_factory=Layout)
    out_layout: Layout = field(default_factory=Layout)
    nodes: list[fx.Node] = field(default_factory=list)
    problem: str | None = None
    grid: tuple[int, int] | None = None
    prefix: int = 0
    spelling: str = "matmul"
    rank: int = 4

    @property
    def label(self) -> str:
        return f"attention {self.index} ({self.module})"

    @property
    def mask(self) -> fx.Node | None:
        """The mask node when the kernel gets it unchanged (one plain term), else ``None``."""
        return self.terms[0].node if len(self.terms) == 1 and self.terms[0].plain else None

    @property
    def masked(self) -> bool:
        return any(t.role == "mask" for t in self.terms)

    @property
    def biases(self) -> list[ScoreTerm]:
        """The terms that change the visible scores (see the module docstring)."""
        return [t for t in self.terms if t.role == "bias"]

    def bias_names(self) -> list[str]:
        """Where each bias is read from, relative to the site's module (``relative_position_bias_table``)."""
        return [t.name.removeprefix(f"{self.module}.") for t in self.biases]

    def shape(self) -> SiteShape:
        """The :class:`SiteShape` a kernel for this site is built with."""
        return SiteShape(layer=self.index, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                         value_dim=self.value_dim, q_len=self.q_len, kv_len=self.kv_len, scale=self.scale,
                         causal=self.causal, grid=self.grid, prefix=self.prefix)

    def inputs(self) -> list[fx.Node]:
        """The graph values the kernel is computed from (q, k, v, then the terms)."""
        return [self.q, self.k, self.v, *(t.node for t in self.terms)]

    def kernel_inputs(self, value: Callable[[fx.Node], Any], emit: Emit = run_op) -> tuple[Any, Any, Any, Any]:
        """``(q, k, v, mask)`` as the kernel takes them, from ``value(node)`` of :meth:`inputs`.

        ``emit`` builds the layout ops: :func:`run_op` on recorded tensors, a graph's
        ``call_function`` when rewiring. The mask is ``None``, the one plain term as it is, or
        every term in ``(B, H, N, M)`` summed into one additive mask (booleans as 0 / float32 min).
        """
        q = self.q_layout.apply(value(self.q), emit)
        k = self.k_layout.apply(value(self.k), emit)
        v = self.v_layout.apply(value(self.v), emit)
        return q, k, v, combine_terms(self.terms, value, emit)

    def summary(self) -> dict:
        """The row ``ptool inspect`` prints for this site."""
        biases = self.bias_names()
        return {"index": self.index, "module": self.module, "form": self.form, "spelling": self.spelling,
                "rank": self.rank, "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "q_len": self.q_len, "kv_len": self.kv_len, "causal": self.causal, "masked": self.masked,
                "scale": round(self.scale, 6), **({"bias": biases} if biases else {}),
                **({"grid": f"{self.prefix}+{self.grid[0]}x{self.grid[1]}"} if self.grid else {}),
                **({"problem": self.problem} if self.problem else {})}


@dataclass(frozen=True)
class SoftmaxSkip:
    """A softmax that feeds a product but is not a site: where it is and why it is not converted."""

    node: fx.Node
    module: str
    reason: str

    @property
    def label(self) -> str:
        return f"softmax {self.node.name} ({self.module})"

    def summary(self) -> dict:
        """The row ``ptool inspect`` prints for this softmax."""
        return {"softmax": self.node.name, "module": self.module, "reason": self.reason}


@dataclass
class AttentionScan:
    """What :func:`scan` finds: the sites, and the softmaxes that feed a product but are not sites."""

    sites: list[AttentionSite]
    skipped: list[SoftmaxSkip]


def combine_terms(terms: list[ScoreTerm], value: Callable[[fx.Node], Any], emit: Emit = run_op) -> Any:
    """The kernel's mask from a site's score terms (see :meth:`AttentionSite.kernel_inputs`)."""
    if not terms:
        return None
    if len(terms) == 1 and terms[0].plain:
        return value(terms[0].node)
    if len(terms) == 1 and terms[0].kind == "drop" and not terms[0].layout:
        return emit(aten.logical_not.default, (value(terms[0].node),))
    total = None
    for t in terms:
        x = t.layout.apply(value(t.node), emit)
        if t.kind == "keep":
            x = emit(aten.where.Scalar, (x, 0.0, _MIN))
        elif t.kind == "drop":
            x = emit(aten.where.Scalar, (x, _MIN, 0.0))
        elif t.factor != 1.0:
            x = emit(aten.mul.Tensor, (x, t.factor))
        total = x if total is None else emit(aten.add.Tensor, (total, x))
    return total


# ------------------------------------------------------------------------------------ helpers
def _shape(node: object) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _kv_heads(k: fx.Node, heads: int) -> int:
    """Heads before ``repeat_kv`` (unsqueeze -> expand (B, Hkv, rep, M, D) -> reshape), else ``heads``."""
    node = k
    for _ in range(5):
        if not isinstance(node, fx.Node) or node.target not in _REPEAT_KV:
            break
        shape = _shape(node)
        if node.target is aten.expand.default and shape and len(shape) == 5 and shape[1] * shape[2] == heads:
            return shape[1]
        node = node.args[0]
    return heads


def _grid(gm: fx.GraphModule, n: int, causal: bool) -> tuple[tuple[int, int] | None, int]:
    """A square token grid (plus prefix tokens) for vision models: graphs with a 2-D convolution."""
    if causal or not any(is_op(x, aten.conv2d, aten.convolution) for x in gm.graph.nodes):
        return None, 0
    for prefix in (0, 1):
        side = math.isqrt(n - prefix)
        if side >= 2 and side * side == n - prefix:
            return (side, side), prefix
    return None, 0


# ------------------------------------------------------------------------------------ the forms
def _sdpa_site(node: fx.Node) -> dict | str:
    args, _ = node_args(node)
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    values = dict(zip(names, args))
    values.update(node.kwargs)
    q, k, v = values["query"], values["key"], values["value"]
    if values.get("enable_gqa"):
        return "enable_gqa=True (keys/values not repeated in the graph) is not supported yet"
    if values.get("dropout_p") not in (None, 0, 0.0):
        return f"attention dropout p={values['dropout_p']} is active (export the model in eval mode)"
    frame = canonical.sdpa_frame(q, k, v)
    if isinstance(frame, str):
        return frame
    q_layout, k_layout, v_layout, out_layout, scores, d = frame
    mask = values.get("attn_mask")
    terms = []
    if isinstance(mask, fx.Node):
        kind = "keep" if canonical.dtype_of(mask) == torch.bool else "add"
        terms.append(ScoreTerm(mask, kind, canonical.mask_layout(mask, _shape(q)[:-2], scores)))
    scale = values.get("scale")
    return {"form": "sdpa", "spelling": "sdpa", "q": q, "k": k, "v": v, "terms": terms,
            "q_layout": q_layout, "k_layout": k_layout, "v_layout": v_layout, "out_layout": out_layout,
            "scores": scores, "head_dim": d, "value_dim": _shape(v)[-1], "rank": len(_shape(q)),
            "scale": float(scale) if scale is not None else 1 / math.sqrt(d),
            "flag_causal": bool(values.get("is_causal")), "nodes": [node]}


def _eager_site(found: score_path.EagerAttention) -> dict:
    return {"form": "eager", "spelling": found.spelling, "q": found.q, "k": found.k, "v": found.v,
            "terms": found.terms, "q_layout": found.q_layout, "k_layout": found.k_layout,
            "v_layout": found.v_layout, "out_layout": found.out_layout, "scores": found.scores,
            "head_dim": found.head_dim, "value_dim": found.value_dim, "rank": found.rank,
            "scale": found.scale, "flag_causal": False, "nodes": found.nodes}


# ------------------------------------------------------------------------------------ term values
MaskValues = Callable[[list[fx.Node]], dict[fx.Node, torch.Tensor]]
"""Evaluates term nodes on the example inputs (for their roles and causality); see :func:`scan`."""


def _constant_values(nodes: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """The values of the ``nodes`` that depend on no graph input (weights, buffers, constants only)."""
    cache: dict[fx.Node, Any] = {}
    missing = object()

    def value(node: fx.Node, depth: int = 0) -> Any:
        if node in cache:
            return cache[node]
        out = missing
        if depth < 64:
            if node.op == "get_attr":
                try:
                    out = operator.attrgetter(str(node.target))(node.graph.owning_module)
                except AttributeError:
                    out = missing
            elif node.op == "call_function":
                inputs = {n: value(n, depth + 1) for n in node.all_input_nodes}
                if all(v is not missing for v in inputs.values()):
                    try:
                        args = fx.node.map_arg(node.args, lambda n: inputs[n])
                        kwargs = fx.node.map_arg(node.kwargs, lambda n: inputs[n])
                        with torch.no_grad():
                            out = node.target(*args, **kwargs)
                    except Exception:  # an op that cannot run on the stored weights: value unknown
                        out = missing
        cache[node] = out
        return out

    found = {n: value(n) for n in nodes}
    return {n: v.detach() for n, v in found.items() if isinstance(v, torch.Tensor)}


def _depends_on_parameter(node: fx.Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            try:
                if isinstance(operator.attrgetter(str(n.target))(n.graph.owning_module), torch.nn.Parameter):
                    return True
            except AttributeError:
                pass
        stack.extend(n.all_input_nodes)
    return False


def _role(term: ScoreTerm, values: dict[fx.Node, torch.Tensor]) -> str:
    """``mask`` or ``bias`` (see the module docstring)."""
    if term.kind != "add":
        return "mask"
    value = values.get(term.node)
    if value is None:  # depends on the inputs and was not measured: a learned term is a bias
        return "bias" if _depends_on_parameter(term.node) else "mask"
    if value.dtype == torch.bool:  # added to float scores, a boolean adds 1
        return "bias" if bool(value.any()) else "mask"
    return "mask" if bool(((value == 0) | (value <= MASKED)).all()) else "bias"


# ------------------------------------------------------------------------------------ finding
def measured_causal(mask: torch.Tensor) -> bool:
    """True if ``mask`` (bool or additive, ``(..., N, M)``) is a causal mask (possibly with padding)."""
    ok = allowed(mask)
    n, m = ok.shape[-2:]
    if n < 2 or n != m:
        return False
    ok = ok.reshape(-1, n, m)
    future = torch.ones(n, m, dtype=torch.bool).triu(1)
    if (ok & future).any():
        return False
    seen_later = ok.any(dim=-2, keepdim=True)  # key j is seen by some query
    hidden_early = ~ok & future  # ... and hidden from an earlier one
    return bool((seen_later & hidden_early).any())


def scan(gm: fx.GraphModule, mask_values: MaskValues | None = None) -> AttentionScan:
    """Every softmax attention in ``gm`` (in graph order, with its geometry), and every softmax that
    feeds a product without being one, with the reason.

    Args:
        gm: an exported graph with shape metadata (``node.meta["val"]``).
        mask_values: evaluates term nodes on the example inputs, to tell masks from biases and causal
            masks apart; without it terms that depend on the inputs are read as masks (biases if
            learned) and only ``is_causal=True`` sites are causal.

    Sites that are attention but cannot be replaced carry a ``problem`` (shown as a skip).
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found: list[tuple[fx.Node, dict]] = []
    skipped = []
    for node in gm.graph.nodes:
        if is_op(node, *_SDPA):
            what = _sdpa_site(node)
            found.append((node, what if isinstance(what, dict) else {"form": "sdpa", "problem": what}))
        elif is_op(node, *canonical.SOFTMAX):
            what = score_path.eager_attention(node)
            if isinstance(what, str):
                skipped.append(SoftmaxSkip(node, module_path(node), what))
            elif what is not None:
                found.append((what.output, _eager_site(what)))
    found.sort(key=lambda item: order[item[0]])
    terms = [t for _, w in found for t in w.get("terms", ())]
    nodes = list(dict.fromkeys(t.node for t in terms))
    values = mask_values(nodes) if (mask_values and nodes) else {}
    values = {**_constant_values([n for n in nodes if n not in values]), **values} if nodes else values
    for t in terms:
        t.role = _role(t, values)
    sites = []
    for index, (node, w) in enumerate(found):
        sites.append(_site(gm, index, node, w, values))
    return AttentionScan(sites, skipped)


def _site(gm: fx.GraphModule, index: int, node: fx.Node, w: dict, values: dict) -> AttentionSite:
    terms = w.get("terms", [])
    if "scores" in w:
        b, heads, n, m = w["scores"]
        d, dv = w["head_dim"], w["value_dim"]
    else:  # an SDPA node we cannot read: report it with what its shape says
        qs = _shape(node) or (1, 1, 1, 1)
        heads, n, m, d, dv = (qs[1] if len(qs) > 3 else 1), qs[-2], qs[-2], qs[-1], qs[-1]
    causal = bool(w.get("flag_causal"))
    if not causal and terms and all(t.node in values for t in terms):
        causal = measured_causal(combine_terms(terms, values.__getitem__))
    problem = w.get("problem")
    if problem is None and w["form"] == "eager":
        outside = {x: u for x, u in users_outside(w["nodes"]).items() if x is not node}
        if outside:
            inner, users = next(iter(outside.items()))
            problem = (f"its {inner.name} ({inner.target}) is also used by "
                       f"{', '.join(u.name for u in users)} (e.g. attention weights returned)")
    k = w.get("k")
    grid, prefix = _grid(gm, n, causal)
    return AttentionSite(
        index=index, form=w["form"], output=node, q=w.get("q"), k=k, v=w.get("v"), terms=terms,
        scale=w.get("scale", 1 / math.sqrt(d)), causal=causal, heads=heads,
        kv_heads=_kv_heads(k, heads) if isinstance(k, fx.Node) else heads, head_dim=d, value_dim=dv,
        q_len=n, kv_len=m, module=module_path(node), q_layout=w.get("q_layout", Layout()),
        k_layout=w.get("k_layout", Layout()), v_layout=w.get("v_layout", Layout()),
        out_layout=w.get("out_layout", Layout()), nodes=w.get("nodes", [node]), problem=problem, grid=grid,
        prefix=prefix, spelling=w.get("spelling", w["form"]), rank=w.get("rank", 4),
    )


def find_sites(gm: fx.GraphModule, mask_values: MaskValues | None = None) -> list[AttentionSite]:
    """The attention sites of ``gm`` (:func:`scan` without the skipped softmaxes)."""
    return scan(gm, mask_values).sites
