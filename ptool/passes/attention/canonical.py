"""Canonical attention: every spelling of softmax attention as q, k, v ``(B, H, N, D)`` plus score terms.

Real models write ``softmax(q k^T * scale + terms) v`` in many ways after ``torch.export``:
``matmul``, ``bmm`` or ``einsum`` for either product; 3-, 4- or 5-D operands
(MaxViT's ``(B, windows, H, N, D)``); the scale on q, on k or on the scores; any number of added
terms - a relative-position bias *and* a shifted-window mask in Swin, with the scores viewed to
``(B/nW, nW, H, N, N)`` for the mask and back. This module reads all of them as one thing, by
canonicalizing instead of enumerating variants:

* **Products** (:func:`product`): ``matmul``/``bmm``/``mm`` and two-operand ``einsum`` become the
  same labelled contraction (axis labels per operand and output), so one rule reads every spelling.
* **Geometry**: in the scores product, the output axes only q has are the query axis, those only k
  has the key axis, the shared ones batch axes, the summed one the head dim. The batch axes (in the
  scores' order) flatten to ``(B, H)`` - the last one is the heads - so a 5-D site becomes
  ``(B * W, H, N, D)``; each operand gets a :class:`Layout` (permute, reshape) to that canonical form
  and the output one back.
* **Score terms** (:class:`ScoreTerm`): what the scores get besides ``q k^T * scale`` - added
  biases and masks, ``masked_fill`` / ``where`` masks - each with the layout that maps it to
  ``(B, H, N, M)``. A term added inside a view of the scores (Swin's 5-D mask) is mapped back by
  :func:`term_layout`: expand to the view, permute its axes by decreasing stride, reshape - the
  exact inverse of the views.

:mod:`.score_path` walks the graph from a softmax and builds a site from these pieces (or names
the reason it cannot); :mod:`.sites` turns it into an :class:`~.sites.AttentionSite`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx

from ptool.ir.graph import is_op
from ptool.ir.noise import CAST_OPS, IDENTITY_OPS, LAYOUT_OPS, is_noise

aten = torch.ops.aten

SOFTMAX = (aten.softmax.int, aten._softmax.default,
           *((aten._safe_softmax.default,) if hasattr(aten, "_safe_softmax") else ()))
PRODUCTS = (aten.matmul.default, aten.bmm.default, aten.mm.default, aten.einsum.default)
VALUE_NOISE = CAST_OPS | IDENTITY_OPS
"""Ops that keep a value as it is (casts, copies, eval dropout)."""
VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
                   aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
                   aten.unflatten.int})
"""Layout ops that only regroup axes (read as ``view`` to the node's shape)."""
WEIGHT_PRODUCT = "q@k^T has a weight or constant operand (a linear layer, not attention)"
_GATHERS = (aten.index.Tensor, aten.index_select.default, aten.gather.default)


def shape_of(node: object) -> tuple[int, ...] | None:
    """The static shape of a node's tensor value (``None`` without metadata)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def dtype_of(node: object) -> torch.dtype | None:
    """The dtype of a node's tensor value (``None`` without metadata)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


# ------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class Layout:
    """A fixed sequence of ATen ops taking a tensor from one layout to another.

    Each step is ``(op, extra_args)`` applied as ``op(x, *extra_args)``; :meth:`apply` runs them on
    tensors or, with a graph's ``call_function`` as ``emit``, writes them into a graph.
    """

    steps: tuple[tuple[Any, tuple], ...] = ()

    def apply(self, x: Any, emit: Any = None) -> Any:
        """``x`` moved through the steps; ``emit(op, args)`` builds each step (default: run it)."""
        for op, extra in self.steps:
            x = emit(op, (x, *extra)) if emit is not None else op(x, *extra)
        return x

    def __bool__(self) -> bool:
        return bool(self.steps)


def _to_canonical(labels: tuple[str, ...], order: list[str], sizes: dict[str, int],
                  shape: tuple[int, ...]) -> Layout:
    """Permute an operand labelled ``labels`` into ``order``, then reshape it to ``shape``."""
    steps = []
    perm = [labels.index(label) for label in order]
    if perm != list(range(len(perm))):
        steps.append((aten.permute.default, (perm,)))
    if [sizes[label] for label in order] != list(shape):
        steps.append((aten.reshape.default, (list(shape),)))
    return Layout(tuple(steps))


def _from_canonical(order: list[str], labels: tuple[str, ...], sizes: dict[str, int],
                    shape: tuple[int, ...]) -> Layout:
    """The inverse of :func:`_to_canonical`: reshape ``shape`` to ``order``'s sizes, permute to ``labels``."""
    steps = []
    if [sizes[label] for label in order] != list(shape):
        steps.append((aten.reshape.default, ([sizes[label] for label in order],)))
    perm = [order.index(label) for label in labels]
    if perm != list(range(len(perm))):
        steps.append((aten.permute.default, (perm,)))
    return Layout(tuple(steps))


# ------------------------------------------------------------------------------------ products
@dataclass(frozen=True)
class Product:
    """A two-operand contraction with labelled axes: ``out[out] = sum a[labels[0]] * b[labels[1]]``."""

    node: fx.Node
    operands: tuple[fx.Node, fx.Node]
    labels: tuple[tuple[str, ...], tuple[str, ...]]
    out: tuple[str, ...]
    sizes: dict[str, int]
    spelling: str


def _einsum_labels(equation: str, ranks: list[int]) -> tuple[list[tuple[str, ...]], tuple[str, ...]] | str:
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    ellipsis = None
    labels = []
    for term, rank in zip(terms, ranks):
        if "..." in term:
            head, tail = term.split("...")
            n = rank - len(head) - len(tail)
            if n < 0 or (ellipsis is not None and n != ellipsis):
                return f"einsum '{equation}' broadcasts an ellipsis across operands"
            ellipsis = n
            labels.append((*head, *(f"...{i}" for i in range(n)), *tail))
        else:
            if len(term) != rank:
                return f"einsum '{equation}' does not match its operands' ranks {ranks}"
            labels.append(tuple(term))
    dots = tuple(f"...{i}" for i in range(ellipsis or 0))
    if arrow:
        head, _, tail = rhs.partition("...")
        out = (*head, *dots, *tail) if "..." in rhs else tuple(rhs)
    else:  # implicit output: the ellipsis, then the labels used once, sorted
        flat = [label for term in labels for label in term if not label.startswith("...")]
        out = (*dots, *sorted(label for label in set(flat) if flat.count(label) == 1))
    if any(len(set(term)) != len(term) for term in (*labels, out)):
        return f"einsum '{equation}' takes a diagonal (a label repeated in one operand)"
    return labels, out


def product(node: fx.Node) -> Product | str:
    """``node`` (matmul / bmm / mm / two-operand einsum) as a labelled :class:`Product`, or why not."""
    if is_op(node, aten.einsum.default):
        equation, operands = node.args[0], node.args[1]
        if len(operands) != 2 or not all(isinstance(o, fx.Node) for o in operands):
            return f"einsum '{equation}' does not have two tensor operands"
        shapes = [shape_of(o) for o in operands]
        if None in shapes:
            return "einsum operands without shape metadata"
        parsed = _einsum_labels(equation, [len(s) for s in shapes])
        if isinstance(parsed, str):
            return parsed
        labels, out = parsed
        spelling = "einsum"
    else:
        a, b = node.args[:2]
        shapes = [shape_of(a), shape_of(b)]
        if not all(isinstance(o, fx.Node) for o in (a, b)) or None in shapes:
            return "a product without shape metadata"
        sa, sb = shapes
        if len(sa) < 2 or len(sb) < 2:
            return f"{node.target} of a vector ({sa} @ {sb})"
        if len(sa) != len(sb) or sa[:-2] != sb[:-2]:
            return f"{node.target} broadcasts its batch dims ({sa} @ {sb})"
        batch = tuple(f"#{i}" for i in range(len(sa) - 2))
        labels, out, operands = [(*batch, "i", "c"), (*batch, "c", "j")], (*batch, "i", "j"), (a, b)
        spelling = "bmm" if is_op(node, aten.bmm.default) else "matmul"
    sizes: dict[str, int] = {}
    for term, shape in zip(labels, shapes):
        for label, size in zip(term, shape):
            if sizes.setdefault(label, size) != size:
                return f"{spelling} broadcasts axis '{label}' ({sizes[label]} vs {size})"
    return Product(node, tuple(operands), tuple(labels), tuple(out), sizes, spelling)


def operands(node: fx.Node) -> list[object]:
    """The tensor operands of a product node (einsum's list, or the first two arguments)."""
    return list(node.args[1]) if node.target is aten.einsum.default else list(node.args[:2])


def is_constant(node: object) -> bool:
    """True for a weight, buffer or Python constant, also behind layout ops."""
    inner = node
    while isinstance(inner, fx.Node) and is_noise(inner, LAYOUT_OPS | VALUE_NOISE):
        inner = inner.args[0]
    return getattr(inner, "op", None) in ("get_attr", None)


# ------------------------------------------------------------------------------------ geometry
@dataclass
class Geometry:
    """The canonical ``(B, H, N, M)`` frame of one site: what each operand maps to."""

    q: fx.Node
    k: fx.Node
    q_layout: Layout
    k_layout: Layout
    scores: tuple[int, int, int, int]  # (B, H, N, M)
    head_dim: int
    to_product: Layout  # canonical scores -> the scores product's output


def _frame(batch: list[int], operand: fx.Node) -> tuple[int, int]:
    """``(B, H)`` of batch sizes: the last is the heads; one batch axis (``bmm``) is split if its
    operand was reshaped from ``(B, H, ...)``, else it is ``B`` with one head."""
    if len(batch) >= 2:
        return math.prod(batch[:-1]), batch[-1]
    if len(batch) == 1:
        node = operand
        while isinstance(node, fx.Node) and is_noise(node, VALUE_NOISE):
            node = node.args[0]
        if is_op(node, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
            src = shape_of(node.args[0])
            if src and len(src) == 4 and src[0] * src[1] == batch[0]:
                return src[0], src[1]
        return batch[0], 1
    return 1, 1


def score_geometry(p: Product, qi: int) -> Geometry | str:
    """The canonical frame of a scores product whose operand ``qi`` is q (the other k), or why not."""
    ql, kl = p.labels[qi], p.labels[1 - qi]
    batch = [x for x in p.out if x in ql and x in kl]
    rows = [x for x in p.out if x in ql and x not in kl]
    keys = [x for x in p.out if x in kl and x not in ql]
    summed = [x for x in ql if x in kl and x not in p.out]
    if len(rows) != 1 or len(keys) != 1 or len(summed) != 1 or len(batch) + 2 != len(p.out) \
            or set(ql) | set(kl) != set(p.out) | set(summed):
        return f"{p.spelling} is not a product q k^T (one query axis, one key axis, one summed axis, shared batch axes)"
    if any(is_constant(operand) for operand in p.operands):
        return WEIGHT_PRODUCT
    b, h = _frame([p.sizes[x] for x in batch], p.operands[qi])
    n, m, d = p.sizes[rows[0]], p.sizes[keys[0]], p.sizes[summed[0]]
    return Geometry(
        q=p.operands[qi], k=p.operands[1 - qi],
        q_layout=_to_canonical(ql, [*batch, rows[0], summed[0]], p.sizes, (b, h, n, d)),
        k_layout=_to_canonical(kl, [*batch, keys[0], summed[0]], p.sizes, (b, h, m, d)),
        scores=(b, h, n, m), head_dim=d,
        to_product=_from_canonical([*batch, rows[0], keys[0]], p.out, p.sizes, (b, h, n, m)),
    )


@dataclass
class ValueGeometry:
    v_layout: Layout
    out_layout: Layout
    value_dim: int
    expected: torch.Tensor  # the canonical probabilities (meta) as the value product reads them


def value_geometry(p: Product, pi: int, scores: tuple[int, int, int, int]) -> ValueGeometry | str:
    """The value product ``probs (x) v`` with the probabilities as operand ``pi``, in the frame ``scores``."""
    pl, vl = p.labels[pi], p.labels[1 - pi]
    batch = [x for x in pl if x in vl and x in p.out]
    rows = [x for x in pl if x in p.out and x not in vl]
    keys = [x for x in pl if x in vl and x not in p.out]
    vals = [x for x in vl if x in p.out and x not in pl]
    if len(rows) != 1 or len(keys) != 1 or len(vals) != 1 or len(batch) + 2 != len(pl) \
            or len(batch) + 2 != len(vl) or len(p.out) != len(batch) + 2:
        return f"the value {p.spelling} is not probabilities @ v (a query axis, the key axis summed, a value axis)"
    b, h, n, m = scores
    bsizes = [p.sizes[x] for x in batch]
    if math.prod(bsizes) != b * h or p.sizes[rows[0]] != n or p.sizes[keys[0]] != m:
        return (f"the value {p.spelling} reads the probabilities as {tuple(p.sizes[x] for x in pl)}, "
                f"not the scores' {scores}")
    dv = p.sizes[vals[0]]
    canon = [*batch, rows[0], keys[0]]
    expected = torch.empty(scores, device="meta").view(*bsizes, n, m).permute([canon.index(x) for x in pl])
    return ValueGeometry(
        v_layout=_to_canonical(vl, [*batch, keys[0], vals[0]], p.sizes, (b, h, m, dv)),
        out_layout=_from_canonical([*batch, rows[0], vals[0]], p.out, p.sizes, (b, h, n, dv)),
        value_dim=dv, expected=expected)


# ------------------------------------------------------------------------------------ score terms
TermKind = Literal["add", "keep", "drop"]
TermRole = Literal["mask", "bias"]


@dataclass
class ScoreTerm:
    """One term of the softmax input besides ``q k^T * scale``.

    Attributes:
        node: the graph value (an added tensor, or a boolean condition).
        kind: ``add`` (added to the scores, times ``factor``), ``keep`` (boolean, True = may attend)
            or ``drop`` (boolean, True = masked: ``masked_fill``'s condition).
        layout: maps ``node`` to a tensor broadcastable to the canonical ``(B, H, N, M)``.
        factor: the scale applied to an ``add`` term after it was added (and -1 for a subtraction).
        role: ``mask`` (only hides keys: 0 or <= MASKED) or ``bias`` (changes the visible scores);
            set by the site finder from the term's values.
    """

    node: fx.Node
    kind: TermKind
    layout: Layout = field(default_factory=Layout)
    factor: float = 1.0
    role: TermRole = "mask"

    @property
    def name(self) -> str:
        """Where the term is read from: the weight, buffer or input behind its gathers and views."""
        return term_source(self.node)

    @property
    def plain(self) -> bool:
        """True if the kernel can take ``node`` as it is (no layout change, no factor, not inverted)."""
        return self.kind in ("add", "keep") and not self.layout and self.factor == 1.0


def term_source(node: fx.Node) -> str:
    """The ``get_attr`` target or input a term comes from through layout, cast and gather ops, else its name."""
    at: object = node
    for _ in range(16):
        if not isinstance(at, fx.Node):
            break
        if at.op == "get_attr":
            return str(at.target)
        if at.op == "placeholder":
            return at.name
        if not (is_noise(at, LAYOUT_OPS | VALUE_NOISE) or is_op(at, *_GATHERS)):
            break
        at = at.args[0]
    return node.name


def term_layout(meta: torch.Tensor, canonical: tuple[int, ...]) -> Layout:
    """The layout taking a term added at ``meta`` (a view of the canonical scores) to ``canonical``:
    expand to the view's shape, permute its axes by decreasing stride, reshape (inverting the views)."""
    if tuple(meta.shape) == tuple(canonical) and meta.is_contiguous():
        return Layout()
    order = sorted(range(meta.dim()), key=lambda d: (meta.shape[d] == 1, -meta.stride(d)))
    steps: list[tuple[Any, tuple]] = [(aten.expand.default, (list(meta.shape),))]
    if order != list(range(meta.dim())):
        steps.append((aten.permute.default, (order,)))
    steps.append((aten.reshape.default, (list(canonical),)))
    return Layout(tuple(steps))


# ------------------------------------------------------------------------------------ sdpa
def sdpa_frame(q: fx.Node, k: fx.Node, v: fx.Node) -> tuple[Layout, Layout, Layout, Layout,
                                                              tuple[int, int, int, int], int] | str:
    """Canonical layouts of an SDPA node's ``q (.., N, D)``, ``k (.., M, D)``, ``v (.., M, Dv)``."""
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    if not qs or not ks or not vs or len(qs) < 2:
        return "scaled_dot_product_attention without shape metadata"
    if not (len(qs) == len(ks) == len(vs) and qs[:-2] == ks[:-2] == vs[:-2]):
        return f"scaled_dot_product_attention broadcasts q {qs}, k {ks}, v {vs}"
    b, h = _frame(list(qs[:-2]), q)
    n, m, d, dv = qs[-2], ks[-2], qs[-1], vs[-1]

    def to(shape, rows):
        return Layout() if tuple(shape) == (b, h, rows, shape[-1]) else \
            Layout(((aten.reshape.default, ([b, h, rows, shape[-1]],)),))

    out = Layout() if len(qs) == 4 and qs[:2] == (b, h) else Layout(((aten.reshape.default, ([*qs[:-1], dv],)),))
    return to(qs, n), to(ks, m), to(vs, m), out, (b, h, n, m), d


def mask_layout(mask: fx.Node, batch: tuple[int, ...], scores: tuple[int, int, int, int]) -> Layout:
    """An SDPA mask broadcast against ``(*batch, N, M)`` as a tensor broadcastable to canonical ``scores``."""
    full = (*batch, *scores[2:])
    if full == scores:
        return Layout()
    return Layout(((aten.expand.default, (list(full),)), (aten.reshape.default, (list(scores),))))
