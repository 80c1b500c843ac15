"""Learn one site's input transform ``T = R0 K diag(1/s)`` (OSTQuant-style, layer-local objective).

``R0`` is the starting orthogonal matrix (the Hadamard), ``K`` a learned orthogonal matrix that
starts at the identity (``torch.nn.utils.parametrizations.orthogonal``, Cayley map, so it stays
orthogonal under Adam), and ``s = exp(log_s) > 0`` a learned channel scaling that starts at 1 or at
SmoothQuant's scales (alpha 0.5) of ``x R0`` and ``W R0`` (FlatQuant's "sq_style" start), whichever
simulates better.
For sizes above :data:`DENSE_MAX`, ``K = K_a (x) K_b`` is a Kronecker product of two orthogonal
factors with ``a * b = k`` as close to square as possible (FlatQuant's decomposition), which keeps
a step at O(tokens * k * (a + b)) instead of O(k^3). With ``T`` acting on ``blocks`` equal
consecutive blocks of the input (per-head sites) the Linears compute

    y = Q_a(x T) Q_w(W T^-T)^T,   x T = (x R0 K) / s,   W T^-T = (W R0 K) * s,

and the loss is the relative squared error of ``y`` against the float ``x W^T``, summed over the
site's Linears. ``Q_w`` is per-channel symmetric ``weight_bits`` quantization, ``Q_a`` per-token
dynamic symmetric ``act_bits`` quantization, both with straight-through rounding and
differentiable scales. The transform
returned is the better of the start (``R0``) and the trained one, in float64 with the factors of
``K`` projected back onto the orthogonal matrices, so ``T^-1 = diag(s) K^T R0^T`` is exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal as orthogonal_parametrization

from ptool import distributed
from ptool.checkpoint import Finished
from ptool.passes.distill import train
from ptool.passes.quant.quantizers import IntRange
from ptool.passes.quant.smooth import smoothing_scales

DENSE_MAX = 512  # a learned K up to this size is one dense orthogonal matrix
MAX_TOKENS = 2048  # calibration tokens a site trains on (a seeded subset beyond this)


def kronecker_factors(k: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b = k``, ``a <= b`` and ``b - a`` smallest (768 -> 24 x 32, 1536 -> 32 x 48)."""
    a = math.isqrt(k)
    while k % a:
        a -= 1
    return a, k // a


def _fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric fake quantization with one scale per row of the last dim (``amax / qmax``, as
    :func:`~ptool.passes.quant.quantizers.fake_quantize_weight` and per-token
    :func:`~ptool.passes.quant.quantizers.fake_quantize_dynamic` compute it), differentiable: the
    rounding passes the gradient straight through, the scale keeps its own. (A straight-through
    estimate of the whole quantizer would give every exact transform a zero gradient.)"""
    qmax = IntRange(bits).qmax
    scale = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny) / qmax
    z = x / scale
    return (z + (torch.round(z) - z).detach()).clamp(-qmax, qmax) * scale


def _orthogonal_identity(n: int) -> nn.Module:
    module = orthogonal_parametrization(nn.Linear(n, n, bias=False), orthogonal_map="cayley")
    module.weight = torch.eye(n)
    return module


class _Transform(nn.Module):
    """The learned part ``K diag(1/s)`` of one ``k x k`` block."""

    def __init__(self, k: int, rotate: bool = True) -> None:
        super().__init__()
        self.sizes = (1, k) if k <= DENSE_MAX else kronecker_factors(k)
        self.factors = nn.ModuleList(_orthogonal_identity(n) for n in self.sizes if n > 1 and rotate)
        self.log_s = nn.Parameter(torch.zeros(k))

    def rotate(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ K`` over the last dim (``K = K_a (x) K_b``: ``K_a^T Z K_b`` on ``Z = z`` as (a, b))."""
        if not self.factors:
            return z
        if len(self.factors) == 1:
            return z @ self.factors[0].weight
        a, b = self.sizes
        zz = z.reshape(*z.shape[:-1], a, b)
        return (self.factors[0].weight.t() @ zz @ self.factors[1].weight).reshape(z.shape)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, s)`` in float64, each factor of ``K`` projected onto the orthogonal matrices."""
        mats = []
        for f in self.factors:
            u, _, vh = torch.linalg.svd(f.weight.detach().double())
            mats.append(u @ vh)
        if not mats:
            return torch.eye(self.log_s.shape[0], dtype=torch.float64), self.log_s.detach().double().exp()
        k = mats[0] if len(mats) == 1 else torch.kron(mats[0], mats[1])
        return k, self.log_s.detach().double().exp()


def _blocks(z: torch.Tensor, blocks: int) -> torch.Tensor:
    return z.reshape(*z.shape[:-1], blocks, z.shape[-1] // blocks)


def _loss(module: _Transform, xr: torch.Tensor, wrs: list[torch.Tensor], targets: list[torch.Tensor],
          weight_bits: int, act_bits: int, norms: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``xr = x R0`` and ``wrs = W R0`` per reader, as ``(.., blocks, k)``; each reader's squared
    error over ``norms`` (default: its targets' squared sum). A sum over tokens (activations are
    quantized per token): with the whole batch's ``norms``, the losses of a split of the tokens add
    up to the loss of all of them."""
    s = module.log_s.exp()
    xt = (module.rotate(xr) / s).flatten(-2)
    xq = _fake_quantize(xt, act_bits)
    total = xt.new_zeros(())
    for j, (wr, y) in enumerate(zip(wrs, targets)):
        wq = _fake_quantize((module.rotate(wr) * s).flatten(-2), weight_bits)
        norm = norms[j] if norms is not None else y.pow(2).sum().clamp_min(1e-30)
        total = total + (xq @ wq.t() - y).pow(2).sum() / norm
    return total


def learn_transform(x: torch.Tensor, weights: list[torch.Tensor], init: torch.Tensor, *, blocks: int, steps: int,
                    lr: float, weight_bits: int, act_bits: int, seed: int = 0, rotate: bool = True,
                    finished: Finished | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """Train ``T`` for one site; return ``(T, T^-1)`` (each ``k x k`` float64) and the loss at the
    start and of the transform returned.

    The training checkpoints (:func:`~ptool.passes.distill.train`): after Ctrl-C the same call
    resumes mid-site. With ``finished``, a site trained before (same inputs and settings) returns
    its stored result, and a newly trained one is stored, so a rerun skips the sites done.

    Args:
        x: the site's input on calibration data, ``(tokens, blocks * k)``.
        weights: the readers' weights, each ``(out, blocks * k)``.
        init: ``R0``, the starting ``k x k`` orthogonal matrix.
        blocks: how many times ``T`` repeats along the input (heads of a per-head site).
        rotate: learn ``K`` (else ``K = I``: only the scaling ``s`` is learned).
        finished: the results of the pass's finished sites (see :func:`ptool.checkpoint.finished_units`).
    """
    unit = ("learned rotation", x, weights, init, blocks, steps, lr, weight_bits, act_bits, seed, rotate)
    stored = finished.get(*unit) if finished is not None else None
    if stored is not None:
        t, t_inv, losses = stored
        return t, t_inv, (float(losses[0]), float(losses[1]))
    t, t_inv, losses = _learn(x, weights, init, blocks=blocks, steps=steps, lr=lr, weight_bits=weight_bits,
                              act_bits=act_bits, seed=seed, rotate=rotate)
    if finished is not None:
        finished.put((t, t_inv, losses), *unit)
    return t, t_inv, losses


def _learn(x: torch.Tensor, weights: list[torch.Tensor], init: torch.Tensor, *, blocks: int, steps: int,
           lr: float, weight_bits: int, act_bits: int, seed: int, rotate: bool,
           ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if x.shape[0] > MAX_TOKENS:  # a fixed seeded subset: the objective every step and the final check share
        x = x[torch.randperm(x.shape[0], generator=gen)[:MAX_TOKENS]]
    r0 = init.double()
    xr = (_blocks(x.double(), blocks) @ r0).float()
    wrs = [(_blocks(w.double(), blocks) @ r0).float() for w in weights]
    targets = [x.float() @ w.float().t() for w in weights]
    module = _Transform(init.shape[0], rotate)

    def objective() -> torch.Tensor:
        return _loss(module, xr, wrs, targets, weight_bits, act_bits)

    with torch.no_grad():
        start = float(objective())
        # FlatQuant's "sq_style" start for s (SmoothQuant's scales, alpha 0.5, on x R0 and W R0) if it is better
        act_max = xr.abs().flatten(0, -3).amax(0)
        w_max = torch.stack([w.abs().flatten(0, -3).amax(0) for w in wrs]).amax(0)
        module.log_s.copy_(smoothing_scales(act_max.amax(0), w_max.amax(0), 0.5).log().float())
        if not float(objective()) < start:
            module.log_s.zero_()
    part, _ = distributed.world().part(xr.shape[0])  # under torchrun: this process's tokens
    norms = [y.pow(2).sum().clamp_min(1e-30) for y in targets]

    def share() -> torch.Tensor:
        return _loss(module, xr[part], wrs, [y[part] for y in targets], weight_bits, act_bits, norms)

    # plain Adam (no annealing); checkpointed, so an interrupted site resumes mid-training
    train(list(module.parameters()), steps=steps, lr=lr, loss_at=lambda step: share(), desc="learned rotation",
          anneal=False, identity=(xr, wrs, targets, blocks, weight_bits, act_bits, rotate), sharded=True)
    with torch.no_grad():
        end = float(objective())
    if not end < start:
        return r0, r0.t(), (start, start)
    k, s = module.dense()
    rk = r0 @ k
    return rk / s[None, :], (rk * s[None, :]).t(), (start, end)
