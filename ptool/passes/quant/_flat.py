"""FlatQuant (METHODS 4.3): Kronecker-factored affine transforms of Linear inputs, trained block by block.

Each site (:mod:`._sites`) gets ``T = diag(1/s) P`` with ``P = P_1 (x) P_2`` (sizes ``n_1 n_2 = k``,
the nearest-to-square factorization: 384 -> 16 x 24, 1536 -> 32 x 48), each factor in FlatQuant's
SVD form ``P_i = U_i diag(sigma_i) V_i^T`` - ``U_i``, ``V_i`` orthogonal through the Cayley map
(``torch.nn.utils.parametrizations.orthogonal``), ``sigma_i = exp(.) > 0`` - so
``P_i^-1 = V_i diag(1/sigma_i) U_i^T`` is exact, and ``s > 0`` a per-channel (smoothing) scale.
``U_i`` starts at a normalized Hadamard matrix (so ``P`` starts as one: the ``rotate`` default),
``V_i`` at the identity, ``sigma_i`` at 1, and ``s`` at 1 or SmoothQuant's scales (alpha 0.5),
whichever simulates the block better. Per-head sites (v -> o_proj) learn one ``head_dim`` transform
shared by all heads. A Linear reading the site computes

    y = Q_a(x T) Q_w(W T^-T)^T,   x T = (x / s)(P_1 (x) P_2),   W T^-T = (W diag(s))(P_1^-T (x) P_2^-T),

with ``(x) `` applied as ``P_1^T X P_2`` on ``x`` viewed as ``(n_1, n_2)`` (O(k (n_1 + n_2)) per token).
``Q_w`` is per-output-channel symmetric ``weight_bits`` quantization, ``Q_a`` per-token dynamic
symmetric ``act_bits`` quantization (the quantizers of :mod:`.simulate`, with straight-through
rounding and differentiable scales, :func:`._learn._fake_quantize`).

**Block by block** (FlatQuant's calibration): sites are grouped by transformer block (the module
path up to its layer index: ``model.layers.3``, ``encoder.layer.0``; a Linear outside any numbered
block, e.g. ``lm_head`` or a pooler, is a block of its own). A block is the contiguous run of graph
nodes from its first to its last op; its inputs (the values it reads from before it: the residual
stream, the attention mask, RoPE's cos/sin) and its outputs (the values read after it) are recorded
once on the calibration calls, in float. All transforms of a block are then trained jointly with
Adam (cosine-annealed) to minimize the relative squared error of the block's outputs with every
site's Linears simulated-quantized against the float outputs, one calibration call per step, the
block's ops run by a small interpreter over the graph's own nodes. As in FlatQuant, every block
trains on the float model's inputs (the transforms are exact, so the float values at block
boundaries are those of the original model). The block keeps the start if training does not lower
the loss on the first :data:`CHECK_CALLS` calibration calls.

Not implemented from FlatQuant: learnable weight/activation clipping (LWC/LAC: the quantizers here
are the fixed ones every ``rotate`` method is evaluated with), the online q/k transform after RoPE
and the KV-cache transforms, and GPTQ afterwards (``quantize:method=gptq`` can follow).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from ptool.ir.graph import add_tensor, mark, module_path, owner_of
from ptool.ir.record import record_values
from ptool.passes.fold_affine._layers import Layer
from ptool.passes.quant import _sites
from ptool.passes.quant._learn import _fake_quantize, _orthogonal_identity, kronecker_factors
from ptool.passes.quant.hadamard import orthogonal
from ptool.passes.quant.smooth import smoothing_scales

aten = torch.ops.aten

MAX_CALLS = 64  # calibration calls a block trains on at most
CHECK_CALLS = 4  # calibration calls the start and the trained transforms are compared on


# ------------------------------------------------------------------------------------ the transform
class KronAffine(nn.Module):
    """``T = diag(1/s) (P_1 (x) P_2)`` of one ``k``-channel block, ``P_i = U_i diag(sigma_i) V_i^T``."""

    def __init__(self, k: int, seed: int = 0) -> None:
        super().__init__()
        self.k = k
        self.sizes = kronecker_factors(k)
        self.u = nn.ModuleList()
        for n in self.sizes:
            u = _orthogonal_identity(n)
            u.weight = orthogonal(n, seed).float()  # P starts as the Kronecker product of Hadamards
            self.u.append(u)
        self.v = nn.ModuleList(_orthogonal_identity(n) for n in self.sizes)
        self.log_sigma = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in self.sizes)
        self.log_s = nn.Parameter(torch.zeros(k))

    def _factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``[P_i]`` and ``[P_i^-T]`` (differentiable, float32)."""
        p, p_inv_t = [], []
        for u, v, ls in zip(self.u, self.v, self.log_sigma):
            uw, vw = u.weight, v.weight
            p.append((uw * ls.exp()) @ vw.t())
            p_inv_t.append((uw * (-ls).exp()) @ vw.t())
        return p, p_inv_t

    def _kron(self, z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``z @ (a (x) b)`` over the last dim."""
        zz = z.reshape(*z.shape[:-1], *self.sizes)
        return (a.t() @ zz @ b).reshape(z.shape)

    def _per_block(self, z: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(z.reshape(*z.shape[:-1], -1, self.k)).reshape(z.shape)

    def x(self, x: torch.Tensor) -> torch.Tensor:
        """``x T`` for ``x`` whose last dim is ``blocks * k`` (``T`` repeated per block)."""
        (p1, p2), _ = self._factors()
        s = self.log_s.exp()
        return self._per_block(x, lambda z: self._kron(z / s, p1, p2))

    def w(self, w: torch.Tensor) -> torch.Tensor:
        """``W T^-T`` for ``W`` of shape ``(out, blocks * k)``."""
        _, (q1, q2) = self._factors()
        s = self.log_s.exp()
        return self._per_block(w, lambda z: self._kron(z * s, q1, q2))

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(s, P, P^-1, (P_1, P_2))`` in float64, ``U_i`` and ``V_i`` projected back onto the orthogonal matrices."""
        ps, invs = [], []
        for u, v, ls in zip(self.u, self.v, self.log_sigma):
            uu, vv = (_project(m.weight) for m in (u, v))
            sigma = ls.detach().double().exp()
            ps.append((uu * sigma) @ vv.t())
            invs.append((vv / sigma) @ uu.t())
        return self.log_s.detach().double().exp(), torch.kron(*ps), torch.kron(*invs), tuple(ps)


def _project(m: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(m.detach().double())
    return u @ vh


# ------------------------------------------------------------------------------------ blocks
def block_prefix(layer: Layer) -> str:
    """The module path up to and including the first numeric part (``model.layers.3``), else the whole path."""
    path = module_path(layer.node)
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return path


@dataclass
class Block:
    """A transformer block: its sites, its ops in graph order, the values it reads and the ones read after it."""

    prefix: str
    sites: list[_sites.Site] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)


def find_blocks(gm: fx.GraphModule, sites: Sequence[_sites.Site]) -> list[Block]:
    """Group ``sites`` by :func:`block_prefix` and find each block's nodes, inputs and outputs."""
    blocks: dict[str, Block] = {}
    for site in sites:
        blocks.setdefault(block_prefix(site.layers[0]), Block(block_prefix(site.layers[0]))).sites.append(site)
    order = list(gm.graph.nodes)
    ops = ("call_function", "call_module")
    for block in blocks.values():
        inside = [i for i, n in enumerate(order) if n.op in ops and _within(module_path(n), block.prefix)]
        inside += [order.index(layer.node) for s in block.sites for layer in s.layers]
        block.nodes = [n for n in order[min(inside): max(inside) + 1] if n.op in ops]
        members = set(block.nodes)
        block.inputs = list(dict.fromkeys(a for n in block.nodes for a in n.all_input_nodes
                                          if a not in members and a.op != "get_attr"))
        block.outputs = [n for n in block.nodes if any(u not in members for u in n.users)]
    return list(blocks.values())


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _run(gm: fx.GraphModule, block: Block, env: dict, overrides: dict[fx.Node, Callable]) -> list:
    """Evaluate the block's nodes on ``env`` (its inputs' values); ``overrides[node](args, kwargs)``
    replaces a node's op. Returns the outputs' values."""
    env = dict(env)

    def load(a: fx.Node):
        if a in env:
            return env[a]
        if a.op == "get_attr":
            return _fetch(gm, a.target)
        raise KeyError(f"{a.name} has no value in block {block.prefix}")

    for node in block.nodes:
        args = fx.node.map_arg(node.args, load)
        kwargs = fx.node.map_arg(node.kwargs, load)
        if node in overrides:
            env[node] = overrides[node](args, kwargs)
        elif node.op == "call_module":
            env[node] = gm.get_submodule(node.target)(*args, **kwargs)
        else:
            env[node] = node.target(*args, **kwargs)
    return [env[o] for o in block.outputs]


def _quantized_linear(layer: Layer, transform: KronAffine, weight_bits: int, act_bits: int,
                      shared: dict) -> Callable:
    """The override of one Linear: ``Q_a(x T) Q_w(W T^-T)^T + b``. ``shared`` (one dict per site) keeps
    the last ``Q_a(x T)``, so the site's other readers of the same ``x`` reuse it."""

    def fn(args: tuple, kwargs: dict) -> torch.Tensor:
        if layer.kind == "linear":
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
        else:  # addmm(bias, x, w) with w (in, out)
            b, x, w = args[0], args[1], args[2].t()
        if shared.get("x") is not x:
            shared["x"], shared["xq"] = x, _fake_quantize(transform.x(x.float()), act_bits)
        y = shared["xq"] @ _fake_quantize(transform.w(w.float()), weight_bits).t()
        return y if b is None else y + b

    return fn


# ------------------------------------------------------------------------------------ calibration
@dataclass
class Plan:
    """A site's trained transform: ``T = diag(1/s) P`` per ``k``-channel block, ``P = P_1 (x) P_2``, in float64."""

    s: torch.Tensor
    p: torch.Tensor
    p_inv: torch.Tensor
    factors: tuple[torch.Tensor, torch.Tensor]


def insert_kronecker(gm: fx.GraphModule, site: _sites.Site, factors: tuple[torch.Tensor, torch.Tensor],
                     dtype: torch.dtype, pass_name: str) -> fx.Node:
    """Insert ``x -> x (P_1 (x) P_2)`` before the site's Linears as ``flatten(P_1^T @ (unflatten(x) @ P_2))``:
    two small matmuls, O(k (n_1 + n_2)) per token instead of a dense O(k^2) matrix."""
    p1, p2 = factors
    key, graph = site.key, gm.graph
    owner = owner_of(site.layers[0].weight.target)
    val = key.meta.get("val")
    sizes = [p1.shape[0], p2.shape[0]]
    with graph.inserting_after(key):
        split = graph.call_function(aten.unflatten.int, (key, -1, sizes))
    with graph.inserting_after(split):
        right = graph.call_function(aten.matmul.default, (split, split))
    right.args = (split, add_tensor(gm, owner, "flat_p2", p2.to(dtype), parameter=False, before=right))
    with graph.inserting_after(right):
        left = graph.call_function(aten.matmul.default, (right, right))
    left.args = (add_tensor(gm, owner, "flat_p1t", p1.t().contiguous().to(dtype), parameter=False, before=left),
                 right)
    with graph.inserting_after(left):
        merged = graph.call_function(aten.flatten.using_ints, (left, -2, -1))
    for node in (split, right, left, merged):
        if isinstance(val, torch.Tensor):
            node.meta["val"] = val if node is merged else val.unflatten(-1, sizes)
        mark(node, pass_name)
    for entry in site.entries:
        entry.replace_input_with(key, merged)
    site.key = merged
    return merged


def calibrate(gm: fx.GraphModule, sites: Sequence[_sites.Site], calls: Sequence[tuple[tuple, dict]], *,
              steps: int, lr: float, weight_bits: int, act_bits: int, seed: int = 0,
              ) -> tuple[dict[str, Plan], dict[str, dict[str, float]], list[dict[str, str]]]:
    """Train every site's transform block by block; return the plans by site label, the block losses
    (``{"start", "trained"}`` by block) and the training notes (resumed / stopped runs)."""
    from ptool.passes.distill import train

    calls = list(calls)[:MAX_CALLS]
    blocks = find_blocks(gm, sites)
    wanted = list(dict.fromkeys(n for b in blocks for n in (*b.inputs, *b.outputs)))
    runs = record_values(gm, wanted, calls)
    plans: dict[str, Plan] = {}
    losses: dict[str, dict[str, float]] = {}
    notes: list[dict[str, str]] = []
    for block in blocks:
        envs = [{n: r[n] for n in block.inputs} for r in runs]
        targets = [[r[n] for n in block.outputs] for r in runs]
        transforms = {site.label: KronAffine(_size(gm, site), seed) for site in block.sites}
        overrides = {}
        for site in block.sites:
            shared: dict = {}
            for layer in site.layers:
                overrides[layer.node] = _quantized_linear(layer, transforms[site.label], weight_bits, act_bits, shared)

        def loss_of(i: int) -> torch.Tensor:
            out = _run(gm, block, envs[i], overrides)
            total = torch.zeros(())
            for o, t in zip(out, targets[i]):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and isinstance(o, torch.Tensor):
                    total = total + (o.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-30)
            return total

        def mean_loss() -> float:
            check = range(min(CHECK_CALLS, len(calls)))
            with torch.no_grad():
                return sum(float(loss_of(i)) for i in check) / len(check)

        torch.manual_seed(seed)
        with torch.no_grad():
            start = mean_loss()
            _smooth_start(gm, block, transforms, envs[0])  # SmoothQuant's scales, if they simulate better
            if not mean_loss() < start:
                for t in transforms.values():
                    t.log_s.zero_()
            start = min(start, mean_loss())
            begin = {label: [p.detach().clone() for p in t.parameters()] for label, t in transforms.items()}
        params = [p for t in transforms.values() for p in t.parameters()]
        if not any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in targets[0]):
            steps_here = 0  # no float output to compare: the block keeps its start
        else:
            steps_here = steps
        order = torch.randperm(len(calls), generator=torch.Generator().manual_seed(seed))
        trained = train(params, steps=steps_here, lr=lr, loss_at=lambda step: loss_of(int(order[step % len(calls)])),
                        desc=f"flatquant {block.prefix}",
                        identity=(block.prefix, [s.label for s in block.sites], weight_bits, act_bits, seed))
        notes.append(trained.notes(f"flatquant {block.prefix}"))
        end = mean_loss()
        if not end < start:  # training did not help: back to the start
            with torch.no_grad():
                for label, t in transforms.items():
                    for p, p0 in zip(t.parameters(), begin[label]):
                        p.copy_(p0)
            end = start
        losses[block.prefix] = {"start": start, "trained": end}
        for label, t in transforms.items():
            plans[label] = Plan(*t.dense())
    return plans, losses, notes


def _size(gm: fx.GraphModule, site: _sites.Site) -> int:
    producer = site.producer
    return producer.head_dim if isinstance(producer, _sites.HeadOutput) else site.width(gm)


def _smooth_start(gm: fx.GraphModule, block: Block, transforms: dict[str, KronAffine], env: dict) -> None:
    """Set each transform's ``s`` to SmoothQuant's scales (alpha 0.5) of its site's input and weights."""
    seen: dict[fx.Node, torch.Tensor] = {}

    def recorder(layer: Layer) -> Callable:
        def fn(args: tuple, kwargs: dict):
            x = args[layer.x_index]
            seen[layer.node] = x.detach().float().reshape(-1, x.shape[-1]).abs().amax(0)
            return layer.node.target(*args, **kwargs)

        return fn

    _run(gm, block, env, {layer.node: recorder(layer) for s in block.sites for layer in s.layers})
    for site in block.sites:
        t = transforms[site.label]
        act_max = seen[site.layers[0].node].reshape(-1, t.k).amax(0)
        w_max = torch.stack([_weight_out_in(gm, layer).abs().amax(0).reshape(-1, t.k).amax(0)
                             for layer in site.layers]).amax(0)
        t.log_s.copy_(smoothing_scales(act_max, w_max.float(), 0.5).log().float())


def _weight_out_in(gm: fx.GraphModule, layer: Layer) -> torch.Tensor:
    w = _fetch(gm, layer.weight.target).detach().float()
    return w.t() if layer.kind == "addmm" else w
