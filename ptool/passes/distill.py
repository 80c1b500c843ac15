"""What the passes that train (repbn's fine-tune, attention conversion, the learned rotation) share:
a progress bar, the distillation loss against the original model's outputs, and one Adam loop that
checkpoints, so an interrupted run resumes where it stopped (:mod:`ptool.checkpoint`)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ptool import distributed
from ptool.progress import steps as progress
from ptool.verify import flatten_outputs

DistillLoss = Literal["mse", "cosine"]


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
    """:func:`distill_loss` of ``model`` against ``teacher``, averaged over ``calls`` (no grad).
    Under a process group each process evaluates its share of the calls."""
    world = distributed.world()
    part, _ = world.part(len(calls))
    with torch.no_grad():
        mine = sum(float(distill_loss(kind, float_leaves(model(*a, **k)), t))
                   for (a, k), t in zip(calls[part], teacher[part]))
    return world.total([mine])[0] / len(calls)


@dataclass(frozen=True)
class Trained:
    """What :func:`train` did.

    Attributes:
        loss: the loss of the last step (NaN without steps).
        steps: the steps of the run.
        resumed_from: the step a checkpoint of an interrupted run resumed at (None: started at 0).
        stopped_at: the step whose loss or gradient was not finite, where the run stopped with the
            parameters of the steps before (None: it ran all ``steps``).
        processes: how many processes trained data-parallel (1: this one alone).
    """

    loss: float
    steps: int
    resumed_from: int | None = None
    stopped_at: int | None = None
    processes: int = 1

    def notes(self, prefix: str) -> dict[str, str]:
        """What a pass's notes should say of the run: ``<prefix>_resumed`` if it resumed from a
        checkpoint, ``<prefix>_stopped`` if it stopped at a non-finite step, ``<prefix>_processes``
        if it ran data-parallel; else ``{}``."""
        notes = {}
        if self.processes > 1:
            notes[f"{prefix}_processes"] = self.processes
        if self.resumed_from is not None:
            notes[f"{prefix}_resumed"] = f"resumed from step {self.resumed_from} of {self.steps}"
        if self.stopped_at is not None:
            notes[f"{prefix}_stopped"] = (f"stopped at step {self.stopped_at} of {self.steps}: its loss or gradient "
                                          "was not finite; the parameters are those before it (lower the learning "
                                          "rate)")
        return notes


def _finite(loss: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> bool:
    """The loss and every gradient are finite (an Adam step on a NaN gradient poisons the parameters)."""
    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)


def train(params: Sequence[torch.nn.Parameter], *, steps: int, lr: float, loss_at: Callable[[int], torch.Tensor],
          desc: str, postfix: Callable[[], dict[str, str]] | None = None, identity: Any = None,
          anneal: bool = True, sharded: bool = False) -> Trained:
    """Minimize ``loss_at(step)`` over ``params`` for ``steps`` Adam steps.

    The step size is cosine-annealed to 0 (unless ``anneal=False``), so the last steps settle
    instead of jumping. Gradients are cleared at the end; a progress bar shows the loss (and
    ``postfix()``) on a terminal.

    A step whose loss or gradient is not finite (the run diverged) is not taken: the run stops
    there, keeping the parameters of the steps before, says so on stderr and in
    :attr:`Trained.stopped_at`.

    Under a process group (:func:`ptool.distributed.world`: torchrun) every process runs this loop.
    With ``sharded=True`` the run is data-parallel: ``loss_at(step)`` returns this process's share
    of the step's loss (the sum of its items' losses over the step's item count,
    :meth:`~ptool.distributed.World.part`), the gradients and losses are summed over the processes
    before each step, and rank 0's starting ``params`` are broadcast first; every process ends
    with the parameters one process would get. Without it every process computes the whole loss
    (same result, no speed-up). Either way only rank 0 shows progress, says what happened and
    writes the checkpoint; every process resumes from it.

    The run checkpoints (:mod:`ptool.checkpoint`): its key hashes ``desc``, ``steps``, ``lr``, the
    starting ``params``, ``identity`` and the first loss, so a rerun of the same call finds the
    checkpoint and nothing else does. It saves the parameters, Adam's and the schedule's state,
    the step and torch's RNG state every few seconds and on Ctrl-C (then raises
    :class:`~ptool.checkpoint.Interrupted`); a rerun resumes there and ends with the parameters an
    uninterrupted run ends with; the file is removed when the run completes.

    Args:
        params: what Adam trains (in place).
        steps: optimizer steps.
        lr: the Adam learning rate (the start of the cosine schedule).
        loss_at: the loss of step ``step`` (with autograd; it may consume torch's RNG).
        desc: the progress-bar label; also names the checkpoint.
        postfix: extra progress-bar fields after each step.
        identity: what else decides the result (the data, the loss's options): hashed into the
            checkpoint key, so a changed input never resumes another run.
        anneal: cosine-anneal the learning rate (else constant).
        sharded: ``loss_at`` returns this process's share of the loss (above).

    Returns:
        :class:`Trained`: the last loss, the step a checkpoint resumed at, the step it stopped at.

    Raises:
        ptool.checkpoint.Interrupted: Ctrl-C, after the state was saved.
    """
    from ptool import checkpoint

    if steps <= 0:
        return Trained(math.nan, steps)
    params = list(params)
    world = distributed.world()
    together = sharded and world.parallel  # gradients summed over the processes
    if together:
        world.broadcast(params)
    optimizer = torch.optim.Adam(params, lr=lr)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if anneal else None
    with torch.enable_grad():
        first = loss_at(0)  # step 0's loss, and a fingerprint of everything the loss depends on
    rules = checkpoint.policy()
    if not world.writes:
        rules = dataclasses.replace(rules, announce=lambda text: None)
    fingerprint = world.total([float(first.detach())])[0] if together else float(first.detach())
    ckpt = checkpoint.open_checkpoint(desc, steps, lr, anneal, params, identity, fingerprint)
    start, last, resumed, stopped = 0, math.nan, None, None
    state = ckpt.load() if ckpt is not None else None
    if state is not None and _restore(state, params, optimizer, annealing, steps):
        start = resumed = int(state["step"])
        last = float(state["loss"])
        first = None
        rules.announce(f"{desc}: resumed from step {start} of {steps} ({ckpt.path})")
    elif state is not None:  # the right key but not a state this run can take: start over
        ckpt.remove()
    done = saved = start
    rng = torch.get_rng_state()  # after the last completed step: where a resumed run continues

    def save() -> bool:
        nonlocal saved
        if not world.writes:  # rank 0 writes the one checkpoint every process resumes from
            saved = done
            return True
        try:
            ckpt.save({"step": done, "steps": steps, "loss": last, "rng": rng,
                       "params": [p.detach() for p in params], "optimizer": optimizer.state_dict(),
                       "annealing": annealing.state_dict() if annealing is not None else None})
        except OSError as e:  # a full or read-only disk must not cost the run itself
            rules.announce(f"{desc}: cannot write checkpoint {ckpt.path} ({e}); not checkpointing this run")
            return False
        saved = done
        return True

    saved_at = time.monotonic()
    try:
        shown = progress(steps, desc, initial=start) if world.writes else contextlib.nullcontext(None)
        with torch.enable_grad(), shown as bar:
            for step in range(start, steps):
                loss = first if step == 0 else loss_at(step)
                first = None
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad or not together:  # a process with an empty share has no graph
                    loss.backward()
                if together:
                    loss = world.reduce(params, loss)
                if not _finite(loss, params):
                    stopped = step
                    rules.announce(f"{desc}: stopped at step {step} of {steps}, its loss or gradient is not finite "
                                   f"(loss {float(loss.detach()):.4g}); keeping the parameters of the steps before; "
                                   "a lower learning rate may help")
                    break
                with checkpoint.interrupts_deferred():  # a Ctrl-C here lands once the step is whole
                    optimizer.step()
                    if annealing is not None:
                        annealing.step()
                    done, last, rng = step + 1, float(loss.detach()), torch.get_rng_state()
                    if ckpt is not None and done < steps and time.monotonic() - saved_at >= rules.every_seconds:
                        if not save():
                            ckpt = None
                        saved_at = time.monotonic()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last:.4g}", **(postfix() if postfix else {}),
                                    **({"processes": world.size} if together else {}))
    except KeyboardInterrupt as e:
        if ckpt is None or (done > saved and not save()) or not ckpt.path.is_file():
            raise  # nothing to resume from (checkpoints off, unwritable, or no step finished)
        raise checkpoint.Interrupted(ckpt.path) from e
    finally:
        for p in params:
            p.grad = None
    if ckpt is not None and world.writes:
        ckpt.remove()
    return Trained(last, steps, resumed, stopped, world.size if together else 1)


def _restore(state: dict, params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
             annealing: torch.optim.lr_scheduler.LRScheduler | None, steps: int) -> bool:
    """Load a checkpoint's state into ``params``, ``optimizer``, ``annealing`` and torch's RNG;
    False (nothing changed) if it does not fit."""
    saved = state.get("params")
    step = state.get("step")
    if (not isinstance(saved, list) or len(saved) != len(params) or not isinstance(step, int)
            or not 0 < step < steps or state.get("steps") != steps
            or any(s.shape != p.shape or s.dtype != p.dtype for s, p in zip(saved, params))
            or (state.get("annealing") is None) != (annealing is None)):
        return False
    optimizer.load_state_dict(state["optimizer"])
    if annealing is not None:
        annealing.load_state_dict(state["annealing"])
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    torch.set_rng_state(state["rng"])
    return True
