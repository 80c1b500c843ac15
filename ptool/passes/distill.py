"""What the passes that train (repbn's fine-tune, attention conversion) share: a progress bar and
the distillation loss against the original model's outputs."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from ptool.verify import flatten_outputs

DistillLoss = Literal["mse", "cosine"]


def progress(total: int, desc: str):
    """A tqdm bar on an interactive stderr, else a silent stand-in (tqdm is imported lazily)."""
    disable = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    try:
        from tqdm import tqdm
    except ImportError:  # without tqdm, no bar
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="step", disable=disable, leave=False)


def float_leaves(outputs: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (any pytree), in order."""
    return [t for t in flatten_outputs(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def distill_loss(kind: DistillLoss, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over outputs of MSE, or of ``1 - cosine`` along the last axis, student vs teacher."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        if kind == "mse":
            losses.append(torch.nn.functional.mse_loss(s.float(), t.float()))
        else:
            losses.append(1 - torch.nn.functional.cosine_similarity(s.float(), t.float(), dim=-1, eps=1e-12).mean())
    return torch.stack(losses).mean()


def teacher_outputs(model: torch.nn.Module, calls: Sequence[tuple[tuple, dict]]) -> list[list[torch.Tensor]]:
    """The floating-point outputs of ``model`` on every ``(args, kwargs)`` call: the distillation target."""
    with torch.no_grad():
        return [[t.detach() for t in float_leaves(model(*args, **kwargs))] for args, kwargs in calls]


def mean_distill_loss(model: torch.nn.Module, kind: DistillLoss, calls: Sequence[tuple[tuple, dict]],
                      teacher: Sequence[list[torch.Tensor]]) -> float:
    """:func:`distill_loss` of ``model`` against ``teacher``, averaged over ``calls`` (no grad)."""
    with torch.no_grad():
        return sum(float(distill_loss(kind, float_leaves(model(*a, **k)), t))
                   for (a, k), t in zip(calls, teacher)) / len(calls)


def train(params: Sequence[torch.nn.Parameter], *, steps: int, lr: float, loss_at: Callable[[int], torch.Tensor],
          desc: str, postfix: Callable[[], dict[str, str]] | None = None) -> float:
    """Minimize ``loss_at(step)`` over ``params`` for ``steps`` Adam steps; return the last loss.

    The step size is cosine-annealed to 0, so the last steps settle instead of jumping. Gradients
    are cleared at the end; a progress bar shows the loss (and ``postfix()``) on a terminal.
    """
    optimizer = torch.optim.Adam(params, lr=lr)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    last = math.nan
    with torch.enable_grad(), progress(steps, desc) as bar:
        for step in range(steps):
            loss = loss_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            annealing.step()
            last = float(loss.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last:.4g}", **(postfix() if postfix else {}))
    for p in params:
        p.grad = None
    return last
