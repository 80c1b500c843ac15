"""Checkpoints for long steps, so that a run stopped with Ctrl-C resumes when it is rerun.

A long step (a training loop; later a tuning search) names its run by a *key*: a hash of
everything that decides its result - what the step is, its settings, the starting values of what
it trains and a fingerprint of its data. The same command on the same model and data computes
the same key and finds the checkpoint; anything different computes another key and starts fresh,
so a checkpoint is never applied to a run it does not belong to. The step saves its state now and
then and always on Ctrl-C (then raises :class:`Interrupted`), resumes from a checkpoint under its
key at start, and removes the checkpoint when it finishes. A stage made of many such steps (the
sites of a learned rotation) also keeps the results of its finished ones (:class:`Finished`) until
the whole stage completes, so a rerun skips them.

Where checkpoints live is a :class:`Policy`: by default the folder in ``PTOOL_CHECKPOINT_DIR``
(``~/.cache/ptool/checkpoints`` when unset; ``off`` disables checkpointing) and a save every
``PTOOL_CHECKPOINT_SECONDS`` (30). The environment is read when a step starts, not at import;
:func:`configured` overrides it for a block (the CLI's ``--no-checkpoint``, tests).

Files are ``<what>-<key>.pt`` (a stage's finished units: ``<what>-<key>/<unit key>.pt``), saved
with ``torch.save`` and loaded with ``weights_only=True``, written to a temporary name in the same
folder and moved into place with ``os.replace``, so a file under its final name is always
complete. A checkpoint of a run that never finishes stays until the same run completes; nothing
prunes other stale files (delete the folder to reclaim the space).

Calibration (observers, smooth-quant, log-quant statistics) does not checkpoint: it is a few
forward passes, and its state is spread over per-site observers.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptool import distributed

__all__ = ["Checkpoint", "Finished", "Interrupted", "Policy", "configured", "finished_units", "interrupts_deferred",
           "open_checkpoint", "policy", "run_key"]

DIR_ENV = "PTOOL_CHECKPOINT_DIR"
SECONDS_ENV = "PTOOL_CHECKPOINT_SECONDS"
DEFAULT_SECONDS = 30.0


def _to_stderr(text: str) -> None:
    print(f"ptool: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Policy:
    """Whether, where and how often long steps checkpoint.

    Attributes:
        directory: the folder holding checkpoints; ``None`` disables checkpointing.
        every_seconds: a running step saves when this much time has passed since its last save
            (0: after every step); it always saves on Ctrl-C.
        announce: where a step says it resumed (one line); stderr by default.
    """

    directory: Path | None
    every_seconds: float = DEFAULT_SECONDS
    announce: Callable[[str], None] = field(default=_to_stderr, compare=False)

    @classmethod
    def from_env(cls) -> Policy:
        """``PTOOL_CHECKPOINT_DIR`` (``off`` / empty: disabled) and ``PTOOL_CHECKPOINT_SECONDS``.

        Raises:
            ValueError: ``PTOOL_CHECKPOINT_SECONDS`` is not a number >= 0.
        """
        raw = os.environ.get(DIR_ENV)
        if raw is None:
            directory: Path | None = Path.home() / ".cache" / "ptool" / "checkpoints"
        elif raw.strip().lower() in ("", "off", "0", "none", "false"):
            directory = None
        else:
            directory = Path(raw).expanduser()
        seconds_raw = os.environ.get(SECONDS_ENV, "")
        try:
            seconds = float(seconds_raw) if seconds_raw.strip() else DEFAULT_SECONDS
        except ValueError:
            seconds = -1.0
        if not seconds >= 0:
            raise ValueError(f"{SECONDS_ENV} must be a number of seconds >= 0, got {seconds_raw!r}")
        return cls(directory, seconds)


_override: contextvars.ContextVar[Policy | None] = contextvars.ContextVar("ptool_checkpoint_policy", default=None)


def policy() -> Policy:
    """The policy in force: the one :func:`configured` set for this block, else the environment's."""
    return _override.get() or Policy.from_env()


@contextlib.contextmanager
def configured(p: Policy) -> Iterator[Policy]:
    """Use ``p`` for the long steps run inside the block (e.g. ``Policy(None)`` turns checkpoints off)."""
    token = _override.set(p)
    try:
        yield p
    finally:
        _override.reset(token)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a long step after its state was saved; rerunning the same call resumes it.

    Attributes:
        path: the checkpoint file.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(f"interrupted; state saved to {path}: rerun the same call to resume")
        self.path = path


# -- the key ---------------------------------------------------------------------------------------


def _feed(h: Any, obj: Any) -> None:
    """Hash ``obj`` into ``h``: tensors by dtype, shape and bytes; containers element-wise; the rest
    by ``repr`` (numbers exactly, strings, dataclasses and modules by their configuration)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{tuple(t.shape)}{t.dtype}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}[{len(obj)}]:".encode())
        for x in obj:
            _feed(h, x)
    elif isinstance(obj, dict):
        h.update(f"dict[{len(obj)}]:".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    else:
        h.update(f"{type(obj).__qualname__}={obj!r};".encode())


def run_key(*identity: Any) -> str:
    """A short hex digest of ``identity`` (tensors, numbers, strings, containers of them, objects by
    ``repr``): equal for equal values, different for anything else."""
    h = hashlib.blake2b(digest_size=12)
    for part in identity:
        _feed(h, part)
    return h.hexdigest()


# -- the file --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One run's checkpoint file: :meth:`load`, :meth:`save`, :meth:`remove`.

    Attributes:
        path: ``<directory>/<what>-<key>.pt``.
        key: the run's key, stored in the file and checked on load.
    """

    path: Path
    key: str

    def load(self) -> dict | None:
        """The saved state, or None when there is none or it cannot be read (then it is removed)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or foreign file: start over rather than fail the run
            policy().announce(f"ignoring unreadable checkpoint {self.path} ({type(e).__name__}: {e})")
            self.remove()
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            return None
        return state

    def save(self, state: dict) -> None:
        """Write ``state`` (plus the key) atomically: a temporary file beside, then ``os.replace``.

        No fsync: the point is surviving Ctrl-C, not power loss, and syncing a large optimizer
        state every save would cost more than it protects.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({**state, "key": self.key}, f)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remove(self) -> None:
        """Delete the file (no error if it is gone)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def open_checkpoint(what: str, *identity: Any) -> Checkpoint | None:
    """The checkpoint of the run named by ``what`` and ``identity`` (see :func:`run_key`), or None
    when the policy turns checkpointing off. Nothing is read or written yet."""
    directory = policy().directory
    if directory is None:
        return None
    slug = re.sub(r"[^a-z0-9]+", "-", what.lower()).strip("-") or "step"
    key = run_key(what, *identity)
    return Checkpoint(directory / f"{slug}-{key}.pt", key)


class Finished:
    """Results of a long stage's finished units (the sites of a learned rotation; later the
    candidates of a tuning run), kept on disk until the stage completes, so a rerun after Ctrl-C
    skips what was done: a folder per stage, a file per unit (written once, never rewritten). A
    unit is found by the hash of its own inputs, so a result is only ever reused for the same
    inputs; the stage's identity only decides which folder holds them.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.reused = 0

    def _unit(self, unit: tuple) -> Checkpoint | None:
        if self.directory is None:
            return None
        key = run_key(*unit)
        return Checkpoint(self.directory / f"{key}.pt", key)

    def get(self, *unit: Any) -> Any | None:
        """The stored result of the unit named by ``unit`` (see :func:`run_key`), or None."""
        ckpt = self._unit(unit)
        state = ckpt.load() if ckpt is not None else None
        if state is None or "result" not in state:
            return None
        self.reused += 1
        return state["result"]

    def put(self, result: Any, *unit: Any) -> None:
        """Store ``result`` (tensors, numbers, containers of them) for the unit named by ``unit``
        (under torchrun rank 0 stores it; every process reads it)."""
        ckpt = self._unit(unit)
        if ckpt is None or not distributed.world().writes:
            return
        try:
            ckpt.save({"result": result})
        except OSError as e:  # a full or read-only disk must not cost the run itself
            policy().announce(f"cannot write checkpoint {ckpt.path} ({e}); not checkpointing this stage")
            self.directory = None

    def complete(self) -> None:
        """The stage finished: delete its folder (rank 0's job under torchrun)."""
        if self.directory is not None and distributed.world().writes:
            shutil.rmtree(self.directory, ignore_errors=True)


def finished_units(what: str, *identity: Any) -> Finished:
    """The :class:`Finished` store of the stage named by ``what`` and ``identity`` (a folder beside
    the checkpoints; nothing is stored when checkpointing is off). Call :meth:`Finished.complete`
    when the stage ends normally."""
    ckpt = open_checkpoint(what, *identity)
    return Finished(ckpt.path.with_suffix("") if ckpt is not None else None)


# -- Ctrl-C ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so the state it updates (an optimizer step and the step
    count) is never saved half-written; a Ctrl-C that came meanwhile raises ``KeyboardInterrupt``
    at the end. Only in the main thread with Python's own SIGINT handler; elsewhere a no-op."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
