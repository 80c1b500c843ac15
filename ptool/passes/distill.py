"""What the passes that train (repbn's fine-tune, attention conversion) share: a progress bar and
the distillation loss against the original model's outputs."""

from __future__ import annotations

import contextlib
import sys
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
