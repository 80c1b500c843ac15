"""The device fingerprint: what decides whether a tuning result measured here holds elsewhere.

CPU model and the instruction-set flags the kernels care about (AVX2, AVX-512, VNNI, AMX), the
core count, the GPU (name, compute capability) when torch sees one, and the versions of the
libraries that generate or run the code. Its short hash keys every tuning record: a record made
on another CPU, or with another torch / ONNX Runtime / TVM, is never reused.

Reading it is cheap: ``/proc/cpuinfo`` (Linux; other systems get ``platform.processor()`` and no
flags) and ``importlib.metadata`` versions; TVM is not imported just to learn its version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["ISA_FLAGS", "DeviceFingerprint", "device_fingerprint"]

#: The CPU flags that change which kernels are fastest (``/proc/cpuinfo`` spelling).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8")

#: Distributions whose versions go into the fingerprint (missing ones are left out).
_LIBRARIES = ("torch", "onnxruntime", "apache-tvm", "onnx", "onnxscript", "transformers", "ptool")


@dataclass(frozen=True)
class DeviceFingerprint:
    """What the tuning results depend on.

    Attributes:
        device: ``"cpu"`` (or ``"cuda"``).
        cpu_model: the CPU's marketing name (``AMD EPYC 9654``).
        isa: the :data:`ISA_FLAGS` this CPU has, in that order.
        cores: logical cores the process may use.
        gpu: GPU name and compute capability (``"NVIDIA A100 (8.0)"``), or None.
        machine: ``platform.machine()`` (``x86_64``, ``arm64``).
        versions: library -> version, for the libraries installed.
    """

    device: str
    cpu_model: str
    isa: tuple[str, ...]
    cores: int
    gpu: str | None
    machine: str
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A stable 12-hex-digit hash of every field (equal fingerprints, equal keys)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=6).hexdigest()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["isa"] = list(self.isa)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DeviceFingerprint:
        return cls(d["device"], d["cpu_model"], tuple(d["isa"]), int(d["cores"]), d.get("gpu"), d["machine"],
                   dict(d.get("versions", {})))

    def __str__(self) -> str:
        isa = "+".join(self.isa) or "no AVX flags"
        gpu = f", GPU {self.gpu}" if self.gpu else ""
        return f"{self.cpu_model} ({self.machine}, {self.cores} cores, {isa}){gpu} [{self.key}]"


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, tuple[str, ...]]:
    """CPU model name and ISA flags from ``/proc/cpuinfo`` (None, () where it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, ()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, tuple(f for f in ISA_FLAGS if f in flags)


def _versions() -> dict[str, str]:
    versions = {}
    for dist in _LIBRARIES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if "ptool" not in versions:  # running from a checkout that is not pip-installed
        from ptool import __version__

        versions["ptool"] = __version__
    return versions


def _gpu() -> str | None:
    """``"name (major.minor)"`` of CUDA device 0 when torch has CUDA, else None (torch is not imported
    just for this: without it loaded there is no GPU path in this process anyway)."""
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return f"{torch.cuda.get_device_name(0)} ({major}.{minor})"
    except Exception:  # a broken driver is "no GPU" for tuning purposes
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_fingerprint(device: str = "cpu") -> DeviceFingerprint:
    """The fingerprint of this machine for ``device``."""
    model, isa = _cpuinfo()
    return DeviceFingerprint(
        device=device,
        cpu_model=model or platform.processor() or "unknown",
        isa=isa,
        cores=_cores(),
        gpu=_gpu(),
        machine=platform.machine() or "unknown",
        versions=_versions(),
    )
