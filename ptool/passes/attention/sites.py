"""Attention sites: one canonical description of every softmax attention in an exported graph.

Real models spell attention two ways after ``torch.export`` (METHODS.md §7.0):

* a ``scaled_dot_product_attention`` node - Hugging Face's ``sdpa`` implementation and
  ``nn.MultiheadAttention`` both export to it;
* the eager chain ``matmul(q, k^T) -> scale -> (+ mask) -> softmax -> (cast / dropout) -> matmul(., v)``
  (``attn_implementation="eager"``), with the scale on the scores, on q or on k, as a multiply or
  a divide.

Both become an :class:`AttentionSite`: the q/k/v nodes as the attention consumed them
(``(B, H, N, D)``; for grouped-query models k and v after ``repeat_kv``), the mask node, the
scale, the causal flag, the head counts and the nodes the site owns. The eager chain is only a
site when its interior (scores, probabilities) is used by nothing else - a model that returns its
attention weights keeps them, and the site is reported with that reason.

**Causality** is read from the graph where it is explicit (``is_causal=True``) and otherwise
measured on the example inputs: transformers folds the causal part into the mask, so a site is
causal when no query may see a later key *and* some key is hidden from earlier queries but seen by
later ones (that second half tells a causal mask from right padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ptool.ir.analysis import users_outside
from ptool.ir.graph import is_op, module_path
from ptool.ir.noise import CAST_OPS, IDENTITY_OPS, LAYOUT_OPS, is_noise, node_args, scale_step
from ptool.passes.attention.kernel import SiteShape, allowed

aten = torch.ops.aten

_SDPA = (aten.scaled_dot_product_attention.default,)
_MATMUL = (aten.matmul.default,)
_SOFTMAX = (aten.softmax.int, aten._softmax.default)
_ADD = (aten.add.Tensor,)
_AFTER_SOFTMAX = CAST_OPS | IDENTITY_OPS  # what may sit between softmax and the value matmul
_SCORE_NOISE = CAST_OPS | IDENTITY_OPS
_REPEAT_KV = frozenset({aten.reshape.default, aten.view.default, aten.expand.default, aten.unsqueeze.default,
                        aten._unsafe_view.default, aten.transpose.int})


@dataclass
class AttentionSite:
    """One softmax attention in the graph.

    Attributes:
        index: position among the graph's attention sites (graph order; what ``layers=`` selects).
        form: ``"sdpa"`` or ``"eager"``.
        output: the node producing the attended values ``(B, H, N, Dv)``.
        q, v: the query / value nodes ``(B, H, N, D)`` / ``(B, H, M, Dv)``.
        k: the key node ``(B, H, M, D)``, or ``None`` when the graph only has ``k^T``
            (``k_transposed``); the rewrite then transposes it back.
        k_transposed: ``k^T`` ``(B, H, D, M)`` as the eager chain consumed it.
        mask: the mask node (bool or additive) or ``None``.
        scale: the softmax scale.
        causal: see the module docstring.
        heads / kv_heads / head_dim / value_dim / q_len / kv_len: the site's geometry.
        module: the dotted path of the module the attention came from.
        nodes: the nodes the site owns (erased when it is replaced).
        problem: why the site cannot be replaced (``None`` if it can).
    """

    index: int
    form: str
    output: fx.Node
    q: fx.Node
    k: fx.Node | None
    v: fx.Node
    mask: fx.Node | None
    scale: float
    causal: bool
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    q_len: int
    kv_len: int
    module: str
    k_transposed: fx.Node | None = None
    nodes: list[fx.Node] = field(default_factory=list)
    problem: str | None = None
    grid: tuple[int, int] | None = None
    prefix: int = 0

    @property
    def label(self) -> str:
        return f"attention {self.index} ({self.module})"

    @property
    def masked(self) -> bool:
        return self.mask is not None

    def shape(self) -> SiteShape:
        """The :class:`SiteShape` a kernel for this site is built with."""
        return SiteShape(layer=self.index, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                         value_dim=self.value_dim, q_len=self.q_len, kv_len=self.kv_len, scale=self.scale,
                         causal=self.causal, grid=self.grid, prefix=self.prefix)

    def summary(self) -> dict:
        """The row ``ptool inspect`` prints for this site."""
        return {"index": self.index, "module": self.module, "form": self.form, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "q_len": self.q_len,
                "kv_len": self.kv_len, "causal": self.causal, "masked": self.masked,
                "scale": round(self.scale, 6), **({"grid": f"{self.prefix}+{self.grid[0]}x{self.grid[1]}"}
                                                   if self.grid else {}), **({"problem": self.problem} if self.problem else {})}


# ------------------------------------------------------------------------------------ helpers
def _shape(node: object) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _through(node: object, ops: frozenset) -> tuple[object, list[fx.Node]]:
    """Walk from ``node`` to its producer past ``ops`` (identity-like); return it and the skipped nodes."""
    skipped = []
    while isinstance(node, fx.Node) and is_noise(node, ops):
        skipped.append(node)
        node = node.args[0]
    return node, skipped


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
    shape = _shape(q)
    scale = values.get("scale")
    return {"form": "sdpa", "q": q, "k": k, "v": v, "mask": values.get("attn_mask"),
            "scale": float(scale) if scale is not None else 1 / math.sqrt(shape[-1]),
            "flag_causal": bool(values.get("is_causal")), "nodes": [node]}


def _eager_site(root: fx.Node) -> dict | str:
    """``root`` = matmul(probs, v); walk back to the scores matmul."""
    probs_in, after = _through(root.args[0], _AFTER_SOFTMAX)
    if not is_op(probs_in, *_SOFTMAX):
        return "not softmax(...) @ v"
    softmax = probs_in
    dim = softmax.args[1] if len(softmax.args) > 1 else -1
    if dim not in (-1, len(_shape(softmax) or ()) - 1):
        return f"softmax over dim {dim}, not the key axis"
    scores, casts = _through(softmax.args[0], _SCORE_NOISE)
    nodes = [root, *after, softmax, *casts]
    mask = None
    if is_op(scores, *_ADD):
        a, b = scores.args[:2]
        for s, m in ((a, b), (b, a)):
            inner, _ = _through(s, _SCORE_NOISE)
            if isinstance(inner, fx.Node) and (is_op(inner, *_MATMUL) or scale_step(inner)):
                nodes.append(scores)
                mask, scores = m, s
                break
        else:
            return "the softmax input is a sum without a q@k^T operand"
    factor = 1.0
    while True:
        scores, casts = _through(scores, _SCORE_NOISE)
        nodes.extend(casts)
        step = scale_step(scores) if isinstance(scores, fx.Node) else None
        if step is None:
            break
        nodes.append(scores)
        factor *= step[0]
        scores = step[1]
    if not is_op(scores, *_MATMUL):
        return "softmax input is not a scaled q@k^T"
    nodes.append(scores)
    q, kt = scores.args[:2]
    for operand in (q, kt):
        if getattr(_through(operand, _SCORE_NOISE | LAYOUT_OPS)[0], "op", None) in ("get_attr", None):
            return "q@k^T has a weight or constant operand (a linear layer, not attention)"
    if (_shape(q) or ())[:-1] != (_shape(scores) or ())[:-1] or len(_shape(q) or ()) != 4:
        return "q@k^T is not a 4-D (batch, heads, tokens, dim) product"
    return {"form": "eager", "q": q, "k": None, "k_transposed": kt, "v": root.args[1], "mask": mask,
            "scale": factor, "flag_causal": False, "nodes": nodes}


def _candidates(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, dict | str]]:
    for node in gm.graph.nodes:
        if is_op(node, *_SDPA):
            yield node, _sdpa_site(node)
        elif is_op(node, *_MATMUL) and isinstance(node.args[0], fx.Node):
            inner, _ = _through(node.args[0], _AFTER_SOFTMAX)
            if is_op(inner, *_SOFTMAX):
                yield node, _eager_site(node)


# ------------------------------------------------------------------------------------ finding
MaskValues = Callable[[list[fx.Node]], dict[fx.Node, torch.Tensor]]
"""Evaluates mask nodes on the example inputs (for causality); see :func:`find_sites`."""


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


def find_sites(gm: fx.GraphModule, mask_values: MaskValues | None = None) -> list[AttentionSite]:
    """Every softmax attention in ``gm``, in graph order, with its geometry.

    Args:
        gm: an exported graph with shape metadata (``node.meta["val"]``).
        mask_values: evaluates mask nodes on the example inputs, to tell causal masks apart;
            without it only ``is_causal=True`` sites are causal.

    Sites that are attention but cannot be replaced carry a ``problem`` (shown as a skip).
    """
    found = []
    for node, what in _candidates(gm):
        if isinstance(what, str):
            if node.target in _SDPA:  # an SDPA node is attention even if we cannot take it
                found.append((node, {"form": "sdpa", "problem": what}))
            continue
        found.append((node, what))
    masks = [w["mask"] for _, w in found if isinstance(w.get("mask"), fx.Node) and not w.get("flag_causal")]
    values = mask_values(masks) if (mask_values and masks) else {}
    sites = []
    for index, (node, w) in enumerate(found):
        q = w.get("q")
        qs = _shape(q) if q is not None else _shape(node)
        vs = _shape(w.get("v")) if w.get("v") is not None else qs
        ks = _shape(w["k"]) if w.get("k") is not None else None
        kv_len = ks[-2] if ks else (_shape(w["k_transposed"])[-1] if w.get("k_transposed") is not None else qs[-2])
        causal = bool(w.get("flag_causal")) or (w.get("mask") in values and measured_causal(values[w["mask"]]))
        problem = w.get("problem")
        if problem is None and w["form"] == "eager":
            outside = {n: u for n, u in users_outside(w["nodes"]).items() if n is not node}
            if outside:
                inner, users = next(iter(outside.items()))
                problem = (f"its {inner.name} ({inner.target}) is also used by "
                           f"{', '.join(u.name for u in users)} (e.g. attention weights returned)")
        k_node = w.get("k") if w.get("k") is not None else w.get("k_transposed")
        grid, prefix = _grid(gm, qs[-2], causal)
        sites.append(AttentionSite(
            index=index, form=w["form"], output=node, q=q, k=w.get("k"), v=w.get("v"), mask=w.get("mask"),
            scale=w.get("scale", 1 / math.sqrt(qs[-1])), causal=causal, heads=qs[1],
            kv_heads=_kv_heads(k_node, qs[1]) if isinstance(k_node, fx.Node) else qs[1], head_dim=qs[-1],
            value_dim=vs[-1], q_len=qs[-2], kv_len=kv_len, module=module_path(node),
            k_transposed=w.get("k_transposed"), nodes=w.get("nodes", [node]), problem=problem,
            grid=grid, prefix=prefix,
        ))
    return sites
