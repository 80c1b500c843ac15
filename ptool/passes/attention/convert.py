"""Conversion: make replaced attention layers behave like the softmax they replace.

The literature is blunt that almost no attention swap keeps a pretrained model working without
training; Hedgehog/LoLCATs and SEA come with a recipe, and the same recipe serves every kernel
that has parameters:

1. **Attention transfer** (:func:`transfer`). Each kernel learns, on its own layer's q, k, v
   recorded from the *original* model on the calibration data (original weights untouched), to
   mimic its softmax attention: ``CE(A, A_hat)`` between the softmax rows and the rows the kernel
   implies (Hedgehog), ``KL(A || softmax(estimate))`` for kernels that estimate scores (SEA), plus
   ``mse_weight * MSE(o_hat, o) / mean(o^2)`` on the attended values (LoLCATs' output term,
   normalised so one weight fits every layer). Adam, cosine-annealed, fixed seed.
   Kernels with a closed-form start fit it first: ``fit_batches(batches)`` on every calibration
   batch (SEA's low-rank estimator), else ``fit(q, k, mask)`` on the first (EcoFormer's hash).
   Kernels whose parameters get no gradient through their output (``output_trains_parameters =
   False``: SEA, whose top-k is a step function) train on the row term alone.
2. **End-to-end distillation** (:func:`distill`), optional: the converted model is trained to
   reproduce the original model's outputs on the calibration data (MSE or cosine), updating the
   kernels' parameters, every parameter, or the kernels plus LoRA adapters on the q/k/v/o
   projections (LoLCATs; :mod:`.adapters`), with a step budget. Optionally a layer-wise term pulls
   every kernel's output towards the original attention output at its site on the same input
   (much denser signal than the final output alone).

Both report the fidelity before and after, so the report says what conversion bought. Both
checkpoint (:func:`ptool.passes.distill.train`): rerun after Ctrl-C, they resume where they stopped
and say so in the notes (``transfer_resumed`` / ``distill_resumed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ptool import distributed
from ptool.checkpoint import policy
from ptool.passes.attention.kernel import AttentionKernel, SiteShape, softmax_weights
from ptool.passes.distill import DistillLoss, distill_loss, float_leaves, mean_distill_loss, train

SiteBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]
"""``(q, k, v, mask)`` recorded at one site for one calibration call."""


@dataclass
class _Teacher:
    weights: torch.Tensor
    out: torch.Tensor
    power: torch.Tensor


def _teacher(batch: SiteBatch, shape: SiteShape) -> _Teacher:
    q, k, v, mask = batch
    weights = softmax_weights(q.float(), k.float(), mask, shape.scale, shape.causal)
    out = weights @ v.float()
    return _Teacher(weights, out, out.pow(2).mean().clamp_min(1e-12))


def _transfer_share(world: distributed.World, kernels: dict[int, AttentionKernel], batches: dict[int, SiteBatch],
                    teachers: dict[int, _Teacher], mse_weight: float) -> torch.Tensor:
    """This process's share of one transfer step's loss: at every site, the loss on its rows of the
    batch times ``rows / batch rows`` (the whole loss in one process; the shares sum to it)."""
    total = torch.zeros(())
    for i, kernel in kernels.items():
        count = batches[i][0].shape[0]
        part, weight = world.part(count)
        if weight:
            mine = tuple(distributed.rows(t, part, count) for t in batches[i])
            total = total + weight * _site_loss(kernel, mine, _rows(teachers[i], part, count), mse_weight)
    return total


def _rows(teacher: _Teacher, part: slice, count: int) -> _Teacher:
    """The rows ``part`` of a teacher of ``count`` rows; the normalizing power stays the whole batch's."""
    return _Teacher(distributed.rows(teacher.weights, part, count), distributed.rows(teacher.out, part, count),
                    teacher.power)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _site_loss(kernel: AttentionKernel, batch: SiteBatch, teacher: _Teacher, mse_weight: float) -> torch.Tensor:
    q, k, v, mask = batch
    loss = torch.zeros(())
    if getattr(kernel, "output_trains_parameters", True):  # else the output term has no gradient: skip its cost
        out = kernel(q, k, v, mask).float()
        loss = mse_weight * (out - teacher.out).pow(2).mean() / teacher.power
    estimate = getattr(kernel, "estimate_logits", None)
    rows = None
    if estimate is not None:
        rows = torch.log_softmax(estimate(q, k, mask).float(), dim=-1)
    else:
        weights = kernel.attention_weights(q, k, mask)
        if weights is not None:
            rows = torch.log(weights.float().clamp_min(1e-12))
    if rows is not None:  # cross-entropy between softmax rows and the kernel's rows
        loss = loss - (teacher.weights * rows).sum(-1).mean()
    return loss


def output_cosine(kernels: dict[int, AttentionKernel], data: dict[int, list[SiteBatch]]) -> dict[int, float]:
    """Per site: cosine of the kernel's attended values vs softmax attention, over all batches."""
    out = {}
    with torch.no_grad():
        for i, kernel in kernels.items():
            got, want = [], []
            for batch in data[i]:
                got.append(kernel(*batch).float().flatten())
                want.append(_teacher(batch, kernel.shape).out.flatten())
            out[i] = _cosine(torch.cat(got), torch.cat(want))
    return out


def transfer(kernels: dict[int, AttentionKernel], data: dict[int, list[SiteBatch]], *, steps: int, lr: float,
             mse_weight: float = 1.0) -> dict:
    """Stage 1: train each trainable kernel to mimic its site's softmax attention (in place).

    Args:
        kernels: site index -> kernel.
        data: site index -> recorded ``(q, k, v, mask)`` per calibration call.
        steps: optimizer steps (each step visits one calibration call at every site).
        lr: Adam learning rate (cosine-annealed to 0).
        mse_weight: weight of the normalised output MSE next to the row cross-entropy.

    Returns:
        ``{"transfer_cosine_before": {...}, "transfer_cosine_after": {...}}`` (site -> cosine).
    """
    before = output_cosine(kernels, data)
    fitted = []
    for i, kernel in kernels.items():  # kernels with a closed-form or search fit (EcoFormer, SEA) fit first
        fit_all, fit = getattr(kernel, "fit_batches", None), getattr(kernel, "fit", None)
        if steps <= 0 or (fit_all is None and fit is None):
            continue
        if fit_all is not None:  # on every calibration batch
            fit_all(data[i])
        else:  # on the first batch
            q, k, _, mask = data[i][0]
            fit(q, k, mask)
        fitted.append(i)
    trainable = {i: k for i, k in kernels.items() if k.trainable}
    if not trainable or steps <= 0:
        return {"transfer_cosine": before}
    teachers = {i: [_teacher(b, trainable[i].shape) for b in data[i]] for i in trainable}

    world = distributed.world()

    def loss_at(step: int) -> torch.Tensor:
        return _transfer_share(world, trainable, {i: data[i][step % len(data[i])] for i in trainable},
                               {i: teachers[i][step % len(data[i])] for i in trainable}, mse_weight)

    trained = train([p for k in trainable.values() for p in k.parameters()], steps=steps, lr=lr, loss_at=loss_at,
                    desc="attention transfer", sharded=True,
                    identity=(mse_weight, {i: repr(k) for i, k in trainable.items()}, {i: data[i] for i in trainable}))
    return {"transfer_cosine_before": before, "transfer_cosine_after": output_cosine(kernels, data),
            "transfer_last_loss": trained.loss, **({"fitted": fitted} if fitted else {}),
            **trained.notes("transfer")}


def softmax_output(batch: SiteBatch, shape: SiteShape) -> torch.Tensor:
    """The softmax attention output of one recorded site batch: what the original model computed there."""
    return _teacher(batch, shape).out.detach()


def distill(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], calls: Sequence[tuple[tuple, dict]],
            teacher: Sequence[list[torch.Tensor]], *, steps: int, lr: float, loss: DistillLoss,
            kernels: dict[int, AttentionKernel] | None = None,
            site_outputs: dict[int, list[torch.Tensor]] | None = None, site_weight: float = 0.0,
            batch: int = 1) -> dict:
    """Stage 2: train ``params`` so ``model`` reproduces the ``teacher`` outputs on ``calls``.

    Args:
        model: the converted model (its kernels are submodules).
        params: what Adam trains.
        calls: the calibration calls; ``teacher``: the original model's outputs on them.
        steps, lr: Adam steps and learning rate (cosine-annealed).
        loss: ``mse`` or ``cosine`` on the outputs.
        kernels, site_outputs, site_weight: the layer-wise term: with ``site_weight > 0``, each
            kernel's output (captured by a forward hook) is pulled towards ``site_outputs[i][call]``
            (the original attention output at that site), ``site_weight * mean_i MSE / mean(t^2)``.
        batch: calls per step (the next ``batch`` calls, cyclically), their losses averaged. Under
            a process group (torchrun) each process runs its share of a step's calls and the
            gradients are summed (:func:`ptool.passes.distill.train`): with ``batch`` a multiple of
            the process count every process works; with fewer calls than processes some idle.

    A run that ends with its objective (output loss plus the layer-wise term) higher than it
    started, on the calibration data it trained on, diverged: its parameters are put back as they
    were, and the notes say so (``distill_reverted``).

    Returns:
        The output loss before and after (``distill_<loss>_before/after``; ``after`` as trained,
        even when reverted), the steps, resume and revert notes.
    """
    layerwise = bool(site_weight > 0 and kernels and site_outputs)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    if layerwise:
        for i, kernel in kernels.items():
            hooks.append(kernel.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out)))
        powers = {i: [t.pow(2).mean().clamp_min(1e-12) for t in ts] for i, ts in site_outputs.items()}

    def site_term(j: int) -> torch.Tensor:  # after a forward of call j
        terms = [(captured[i].float() - site_outputs[i][j]).pow(2).mean() / powers[i][j] for i in site_outputs]
        return torch.stack(terms).mean()

    def call_loss(j: int) -> torch.Tensor:
        args, kwargs = calls[j]
        captured.clear()
        value = distill_loss(loss, float_leaves(model(*args, **kwargs)), teacher[j])
        return value + site_weight * site_term(j) if layerwise else value

    world = distributed.world()

    def loss_at(step: int) -> torch.Tensor:  # this process's calls of the step, over the step's count
        part, _ = world.part(batch)
        mine = [call_loss((step * batch + i) % len(calls)) for i in range(batch)[part]]
        return sum(mine[1:], mine[0]) / batch if mine else torch.zeros(())

    def mean_site_term() -> float:
        with torch.no_grad():
            total = 0.0
            for j, (args, kwargs) in enumerate(calls):
                model(*args, **kwargs)
                total += float(site_term(j))
            return total / len(calls)

    notes = {}
    start = [p.detach().clone() for p in params]
    try:
        before = mean_distill_loss(model, loss, calls, teacher)
        if layerwise:
            notes["distill_site_mse_before"] = mean_site_term()
        trained = train(params, steps=steps, lr=lr, loss_at=loss_at, desc="attention distillation", sharded=True,
                        identity=(loss, calls, teacher, site_weight if layerwise else 0.0, batch))
        after = mean_distill_loss(model, loss, calls, teacher)
        if layerwise:
            notes["distill_site_mse_after"] = mean_site_term()
    finally:
        for h in hooks:
            h.remove()
    objective = (before + site_weight * notes["distill_site_mse_before"],
                 after + site_weight * notes["distill_site_mse_after"]) if layerwise else (before, after)
    if not objective[1] <= objective[0]:  # training made its own objective worse (or NaN): undo it
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        notes["distill_reverted"] = (f"the distillation objective rose from {objective[0]:.4g} to "
                                     f"{objective[1]:.4g} on the calibration data; the model before it is "
                                     "kept (a lower distill_lr may help)")
        if world.writes:
            policy().announce(f"attention distillation: {notes['distill_reverted']}")
    return {f"distill_{loss}_before": before, f"distill_{loss}_after": after, **notes, "distill_steps": steps,
            **trained.notes("distill")}
