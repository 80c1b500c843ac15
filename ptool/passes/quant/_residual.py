"""The global rotation of the residual stream (QuaRot / SpinQuant / OSTQuant ``R_res``) for RMSNorm models.

With ``Q`` orthogonal, every value of the residual stream becomes ``x Q``:

- token embeddings: ``E' = E Q`` (each row is a token's stream value);
- **writers** (Linears whose output is added into the stream: o_proj, down_proj):
  ``W' = Q^T W``, ``b' = b Q``;
- **RMSNorm**: ``rms(x Q) = rms(x)`` because ``||x Q|| = ||x||``, so the normalization commutes
  with ``Q`` - but its ``gamma`` does not, so ``gamma`` is first folded into the norm's readers
  (``W diag(gamma)``) and the norm keeps no affine;
- **readers** (Linears reading a norm output: q/k/v, gate/up, lm_head): ``W' = W diag(gamma) Q``.

Exact in real arithmetic (all products in float64, cast once). Found by walking forward from the
embeddings through residual adds and same-dtype casts; the rotation is refused, with the reason,
when the stream reaches anything else - a LayerNorm (it subtracts the mean over channels, which
``Q`` does not preserve: ViT/GPT-2, and BERT's post-LN), a model output, an add of a value that is
not a Linear's output, or a norm output read by something other than a Linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ptool.ir.graph import attr_tensor, erase_if_unused, is_op, mark, op_name, replace_tensor
from ptool.passes.fold_affine._layers import (
    Layer,
    as_layer,
    fold_inputs,
    fold_inputs_matrix,
    fold_outputs_matrix,
    through_identity,
    through_last_dim,
    why_not_editable,
)
from ptool.passes.quant._sites import DONE_KEY, _up_single, users

aten = torch.ops.aten


@dataclass
class _Norm:
    """An RMSNorm on the stream: ``out = gamma * (x * rsqrt(mean(x^2) + eps))`` read by ``readers``."""

    node: fx.Node  # the aten.rms_norm node, or the decomposed multiply x * rsqrt(...)
    gamma: fx.Node | None  # stored gamma (None: no affine)
    gamma_mul: fx.Node | None  # the decomposed `gamma * normed` (None for aten.rms_norm or no gamma)
    readers: list[Layer] = field(default_factory=list)


@dataclass
class ResidualPlan:
    """Everything the rotation edits."""

    embeddings: list[fx.Node]
    writers: list[Layer]
    norms: list[_Norm]
    width: int

    @property
    def readers(self) -> list[Layer]:
        return [r for n in self.norms for r in n.readers]


def _single(node: fx.Node, target) -> fx.Node | None:
    found = users(node)
    return found[0] if len(found) == 1 and is_op(found[0], target) else None


def _decomposed_rms(x: fx.Node, pow_node: fx.Node) -> fx.Node | None:
    """The ``x * rsqrt(mean(x^2, -1, keepdim) + eps)`` multiply that ``pow_node = x^2`` starts, if it is one."""
    if not (is_op(pow_node, aten.pow) and pow_node.args[0] is x and pow_node.args[1] == 2):
        return None
    mean = _single(pow_node, aten.mean)
    if mean is None or list(mean.args[1:2]) not in ([[-1]], [[len(x.meta["val"].shape) - 1]]):
        return None
    if not (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)):
        return None
    add = _single(mean, aten.add)
    rsqrt = _single(add, aten.rsqrt) if add is not None and not isinstance(add.args[1], fx.Node) else None
    mul = _single(rsqrt, aten.mul) if rsqrt is not None else None
    return mul if mul is not None and x in mul.args and rsqrt in mul.args else None


def _norm_readers(gm: fx.GraphModule, norm: _Norm, out: fx.Node) -> str | None:
    """Fill ``norm.readers`` with the Linears reading ``out`` (through views); a reason if anything else does."""
    frontier = [out]
    for v in frontier:
        for user in users(v):
            layer = as_layer(user)
            if layer is not None and layer.kind in ("linear", "addmm") and layer.x is v \
                    and sum(a is v for a in user.args) == 1:
                why = why_not_editable(gm, layer, untie=True)
                if why:
                    return why
                norm.readers.append(layer)
            elif user.op != "output" and through_last_dim(user) is v:
                frontier.append(user)
            else:
                return f"the norm output {v.name} feeds {user.name} ({op_name(user)}), not a Linear"
    return None if norm.readers else f"nothing reads the norm {norm.node.name}"


def _match_norm(gm: fx.GraphModule, x: fx.Node, user: fx.Node, width: int) -> tuple[_Norm, set] | str | None:
    """``user`` of the stream value ``x`` as the start of an RMSNorm; its nodes; or a reason / None."""
    if is_op(user, aten.rms_norm) and user.args[0] is x:
        gamma = user.args[2] if len(user.args) > 2 else None
        if gamma is not None and attr_tensor(gm, gamma) is None:
            return f"RMSNorm {user.name}'s weight is computed"
        norm = _Norm(user, gamma, None)
        return norm, {user}
    mul = _decomposed_rms(x, user)
    if mul is None:
        return None
    out, gamma, gamma_mul = mul, None, None
    while len(users(out)) == 1 and through_identity(users(out)[0]) is out:
        out = users(out)[0]
    if len(users(out)) == 1 and is_op(gm_mul := users(out)[0], aten.mul):
        stored = [a for a in gm_mul.args if attr_tensor(gm, a) is not None]
        if len(stored) == 1 and attr_tensor(gm, stored[0]).shape == (width,) and out in gm_mul.args:
            gamma, gamma_mul = stored[0], gm_mul
    return _Norm(mul, gamma, gamma_mul), {user, mul}


def plan_residual(gm: fx.GraphModule) -> ResidualPlan | str:
    """What a global rotation of the residual stream must edit, or why it cannot be done."""
    embeddings = [n for n in gm.graph.nodes if is_op(n, aten.embedding) and attr_tensor(gm, n.args[0]) is not None]
    if not embeddings:
        layer_norm = any(is_op(n, aten.layer_norm) for n in gm.graph.nodes)
        return "no token embedding starts a residual stream" + (
            " (and LayerNorm, which subtracts the channel mean, is not rotation-invariant)" if layer_norm else "")
    if any(DONE_KEY in e.meta for e in embeddings):
        return "the residual stream is already rotated (an earlier rotate run)"
    widths = {attr_tensor(gm, e.args[0]).shape[1] for e in embeddings}
    if len(widths) != 1:
        return f"embeddings of different widths {sorted(widths)}"
    width = widths.pop()
    stream, queue = set(embeddings), list(embeddings)
    writers: list[Layer] = []
    norms: list[_Norm] = []
    while queue:
        n = queue.pop(0)
        handled: set = set()
        for user in users(n):
            found = _match_norm(gm, n, user, width)
            if isinstance(found, str):
                return found
            if found is not None:
                norm, nodes = found
                why = _norm_readers(gm, norm, norm.gamma_mul or _after_casts(norm.node))
                if why:
                    return why
                norms.append(norm)
                handled |= nodes
        for user in users(n):
            if user in handled or user in stream:
                continue
            if through_identity(user) is n:
                stream.add(user)
                queue.append(user)
            elif is_op(user, aten.add) and len(user.args) == 2 and all(isinstance(a, fx.Node) for a in user.args):
                other = user.args[1] if user.args[0] is n else user.args[0]
                if _source(other) not in stream:  # (a cast of another embedding is stream too)
                    writer = _writer(gm, other)
                    if isinstance(writer, str):
                        return f"the residual add {user.name}: {writer}"
                    writers.append(writer)
                stream.add(user)
                queue.append(user)
            elif user.op == "output":
                return f"the residual stream value {n.name} is a model output (rotating it would change the output)"
            elif is_op(user, aten.layer_norm):
                return (f"LayerNorm {user.name} subtracts the mean over channels, which a rotation does not "
                        "preserve (only RMSNorm commutes with an orthogonal Q; convert LayerNorm first)")
            else:
                return f"{user.name} ({op_name(user)}) reads the residual stream; only RMSNorms, adds and casts may"
    if not norms:
        return "no RMSNorm reads the residual stream"
    return ResidualPlan(embeddings, writers, norms, width)


def _source(node: fx.Node) -> fx.Node:
    while (prev := through_identity(node)) is not None:
        node = prev
    return node


def _after_casts(node: fx.Node) -> fx.Node:
    while len(users(node)) == 1 and through_identity(users(node)[0]) is node:
        node = users(node)[0]
    return node


def _writer(gm: fx.GraphModule, value: fx.Node) -> Layer | str:
    if len(users(value)) != 1:
        return f"{value.name} is added to the stream and also used elsewhere"
    top, why = _up_single(value)
    layer = as_layer(top)
    if why or layer is None or layer.kind not in ("linear", "addmm"):
        return why or f"{top.name} ({op_name(top)}) adds into the stream and is not a Linear"
    return why_not_editable(gm, layer, untie=True) or layer


def apply_residual(gm: fx.GraphModule, plan: ResidualPlan, q: torch.Tensor, pass_name: str) -> None:
    """Fold every norm's gamma into its readers, then rotate embeddings, writers and readers by ``q`` (float64)."""
    for norm in plan.norms:
        if norm.gamma is not None:
            gamma = attr_tensor(gm, norm.gamma).detach().double()
            for layer in norm.readers:
                fold_inputs(gm, layer, gamma, None, pass_name)
            if norm.gamma_mul is not None:
                keep = next(a for a in norm.gamma_mul.args if a is not norm.gamma)
                norm.gamma_mul.replace_all_uses_with(keep)
                gm.graph.erase_node(norm.gamma_mul)
                erase_if_unused(gm, [norm.gamma])
            else:
                args = list(norm.node.args)
                args[2] = None
                norm.node.args = tuple(args)
                erase_if_unused(gm, [norm.gamma])
    for emb in plan.embeddings:
        table = attr_tensor(gm, emb.args[0])
        replace_tensor(gm, emb.args[0], (table.detach().double() @ q).to(table.dtype), user=emb, name="weight")
        emb.meta[DONE_KEY] = (pass_name,)
        mark(emb, pass_name)
    for layer in plan.writers:
        fold_outputs_matrix(gm, layer, q, pass_name)
    for layer in plan.readers:
        fold_inputs_matrix(gm, layer, q.t(), pass_name)
        layer.node.meta[DONE_KEY] = (*layer.node.meta.get(DONE_KEY, ()), pass_name)
