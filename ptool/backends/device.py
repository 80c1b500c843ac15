"""Where a compiled model runs: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, parsed once at the edge.

    dev = parse_device("cuda:1")     # Device(kind="cuda", index=1)
    check_available(dev)             # UsageError (one line) if this machine cannot run it
    module.to(dev.torch)

The backends get a :class:`Device`, never the string. torch is imported inside the functions
that need it, so importing this module (and ``ptool``) stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ptool.errors import UsageError, did_you_mean

if TYPE_CHECKING:
    import torch

__all__ = ["CPU", "SPELLINGS", "Device", "check_available", "parse_device"]

SPELLINGS = ("cpu", "cuda", "cuda:N")
"""The device strings ptool accepts (``N``: a CUDA device index, 0-based)."""


@dataclass(frozen=True)
class Device:
    """A parsed device.

    Attributes:
        kind: ``"cpu"`` or ``"cuda"``.
        index: the CUDA device index (always 0 for the CPU).
    """

    kind: Literal["cpu", "cuda"]
    index: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "cuda"):
            raise UsageError(f"unknown device kind '{self.kind}' (allowed: cpu, cuda)")
        if self.index < 0 or (self.kind == "cpu" and self.index != 0):
            raise UsageError(f"device index {self.index} is not allowed for '{self.kind}'")

    def __str__(self) -> str:
        """The canonical spelling: ``cpu``, ``cuda`` (index 0) or ``cuda:N``."""
        return self.kind if self.kind == "cpu" or self.index == 0 else f"{self.kind}:{self.index}"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch(self) -> torch.device:
        """The ``torch.device`` (imports torch)."""
        import torch

        return torch.device("cpu") if self.kind == "cpu" else torch.device("cuda", self.index)


_GPU_WORDS = ("gpu", "nvidia", "cuda")
"""Spellings that mean an NVIDIA GPU (difflib alone would suggest 'cpu' for 'gpu')."""

CPU = Device("cpu")
"""The default device."""


def parse_device(device: str | Device | Any) -> Device:
    """``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` (or a ``torch.device`` / :class:`Device`) -> :class:`Device`.

    Raises:
        UsageError: any other spelling (``"gpu"``, ``"cuda:x"``, ``"tpu"``), naming the allowed ones.
    """
    if isinstance(device, Device):
        return device
    text = str(device).strip() if device is not None else "None"  # torch.device prints as "cuda:0"
    kind, sep, index = text.partition(":")
    if kind == "cpu" and not sep:
        return CPU
    if kind == "cuda" and not sep:
        return Device("cuda")
    if kind == "cuda" and index.isdigit() and index.isascii():
        return Device("cuda", int(index))
    hint = " (did you mean 'cuda'?)" if kind.lower() in _GPU_WORDS else did_you_mean(text, ("cpu", "cuda"))
    raise UsageError(f"unknown device '{text}' (allowed: {', '.join(SPELLINGS)}){hint}")


def check_available(device: Device) -> None:
    """Raise a one-line UsageError if ``device`` cannot be used in this process; the CPU always can.

    Raises:
        UsageError: CUDA asked for but torch has no CUDA (a CPU build, no driver, no GPU), or the
            index is past the GPUs torch sees.
    """
    if not device.is_cuda:
        return
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__} has no CUDA" if torch.version.cuda is None else (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver")
        raise UsageError(f"device '{device}' is not available: {build} (torch.cuda.is_available() is False); "
                         "allowed here: cpu")
    count = torch.cuda.device_count()
    if device.index >= count:
        allowed = ", ".join(["cpu", "cuda", *(f"cuda:{i}" for i in range(count))])
        raise UsageError(f"device '{device}' is not available: this machine has {count} CUDA "
                         f"GPU{'s' if count != 1 else ''}; allowed here: {allowed}")
