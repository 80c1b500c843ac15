"""The device fingerprint: what decides whether a tuning result measured here holds elsewhere.

CPU model and the instruction-set flags the kernels care about (AVX2, AVX-512, VNNI, BF16/FP16,
AMX), the core count, the GPU (name, compute capability, memory, CUDA and driver versions) when
torch sees one, and the versions of the libraries that generate or run the code. Its short hash
keys every tuning record: a record made on another CPU or GPU, or with another torch / ONNX
Runtime / TVM / driver, is never reused.

It also says which reduced-precision formats run fast here (:meth:`DeviceFingerprint.supports`),
so the autotuner leaves out bf16 / fp16 / int8 candidates the hardware would only emulate, with
the reason.

Reading it is cheap: ``/proc/cpuinfo`` (Linux; other systems get ``platform.processor()`` and no
flags) and ``importlib.metadata`` versions; TVM is not imported just to learn its version, and
torch only for a CUDA device (on the CPU the GPU is recorded when torch is already loaded).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["FEATURES", "ISA_FLAGS", "DeviceFingerprint", "device_fingerprint"]

#: The CPU flags that change which kernels are fastest (``/proc/cpuinfo`` spelling).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_fp16", "amx_int8")

Feature = Literal["bf16", "fp16", "int8"]

#: Reduced-precision formats :meth:`DeviceFingerprint.supports` answers for.
FEATURES: tuple[str, ...] = ("bf16", "fp16", "int8")

#: CPU flags any one of which makes a format run natively (else it is emulated in fp32).
_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16"),
              "int8": ("avx512_vnni", "avx_vnni", "amx_int8")}

#: The lowest CUDA compute capability with tensor cores for the format: fp16 from Volta (7.0),
#: int8 from Turing (7.5), bf16 from Ampere (8.0).
_GPU_CAPABILITY = {"bf16": (8, 0), "fp16": (7, 0), "int8": (7, 5)}

#: Distributions whose versions go into the fingerprint (missing ones are left out).
_LIBRARIES = ("torch", "onnxruntime", "apache-tvm", "onnx", "onnxscript", "transformers", "ptool")


@dataclass(frozen=True)
class DeviceFingerprint:
    """What the tuning results depend on.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        cpu_model: the CPU's marketing name (``AMD EPYC 9654``).
        isa: the :data:`ISA_FLAGS` this CPU has, in that order.
        cores: logical cores the process may use.
        gpu: GPU name and compute capability (``"NVIDIA A100 (8.0)"``), or None.
        machine: ``platform.machine()`` (``x86_64``, ``arm64``).
        versions: library -> version, for the libraries installed.
        gpu_name: the GPU's name (``NVIDIA H100 80GB HBM3``), or None (no GPU, or a record made
            before these fields existed).
        gpu_capability: its CUDA compute capability, ``(major, minor)``.
        gpu_memory_gib: its total memory in GiB (one decimal).
        cuda_version: the CUDA version torch was built with (``torch.version.cuda``).
        gpu_driver: the NVIDIA driver's version (``550.54.15``), where it can be read.
    """

    device: str
    cpu_model: str
    isa: tuple[str, ...]
    cores: int
    gpu: str | None
    machine: str
    versions: dict[str, str] = field(default_factory=dict)
    gpu_name: str | None = None
    gpu_capability: tuple[int, int] | None = None
    gpu_memory_gib: float | None = None
    cuda_version: str | None = None
    gpu_driver: str | None = None

    @property
    def key(self) -> str:
        """A stable 12-hex-digit hash of every field (equal fingerprints, equal keys)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=6).hexdigest()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["isa"] = list(self.isa)
        d["gpu_capability"] = list(self.gpu_capability) if self.gpu_capability is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DeviceFingerprint:
        """The inverse of :meth:`to_dict`; records older than the GPU fields load with them None."""
        cap = d.get("gpu_capability")
        memory = d.get("gpu_memory_gib")
        return cls(d["device"], d["cpu_model"], tuple(d["isa"]), int(d["cores"]), d.get("gpu"), d["machine"],
                   dict(d.get("versions", {})), gpu_name=d.get("gpu_name"),
                   gpu_capability=(int(cap[0]), int(cap[1])) if cap is not None else None,
                   gpu_memory_gib=float(memory) if memory is not None else None,
                   cuda_version=d.get("cuda_version"), gpu_driver=d.get("gpu_driver"))

    @property
    def on_gpu(self) -> bool:
        """Whether the tuned models run on the GPU (``device`` is ``cuda``/``cuda:N``)."""
        return self.device.split(":")[0] == "cuda"

    def supports(self, feature: Feature) -> tuple[bool, str]:
        """Whether ``feature`` (``bf16``, ``fp16``, ``int8``) runs natively on the tuned device, and why.

        CPU: bf16 needs ``avx512_bf16`` or ``amx_bf16``; fp16 ``avx512_fp16`` or ``amx_fp16``;
        int8 ``avx512_vnni``, ``avx_vnni`` or ``amx_int8`` (without them the kernels widen to
        fp32 and are slower than fp32 itself). GPU: tensor cores for the format, i.e. compute
        capability >= 8.0 (bf16), 7.0 (fp16), 7.5 (int8).

        Returns:
            ``(supported, reason)``; the reason reads after the feature's name, as the autotuner
            prints it: ``f"bf16 left out: {reason}"`` -> ``bf16 left out: this CPU has neither
            avx512_bf16 nor amx_bf16``.

        Raises:
            UsageError: an unknown feature (naming the known ones).
        """
        if feature not in FEATURES:
            from ptool.errors import UsageError, did_you_mean

            raise UsageError(f"unknown feature '{feature}' (allowed: {', '.join(FEATURES)})"
                             f"{did_you_mean(str(feature), FEATURES)}")
        if self.on_gpu:
            return self._gpu_supports(feature)
        flags = _CPU_FLAGS[feature]
        have = [f for f in flags if f in self.isa]
        if have:
            return True, f"this CPU has {' and '.join(have)}"
        if len(flags) == 2:
            return False, f"this CPU has neither {flags[0]} nor {flags[1]}"
        return False, f"this CPU has none of {', '.join(flags)}"

    def _gpu_supports(self, feature: str) -> tuple[bool, str]:
        need = _GPU_CAPABILITY[feature]
        if self.gpu_capability is None:
            return False, "no GPU compute capability recorded for this device"
        have = tuple(self.gpu_capability)
        name = self.gpu_name or "this GPU"
        cap, want = f"{have[0]}.{have[1]}", f"{need[0]}.{need[1]}"
        if have >= need:
            return True, f"{name} has compute capability {cap} (>= {want})"
        return False, f"{name} has compute capability {cap}; {feature} tensor cores need >= {want}"

    @property
    def fast_dtypes(self) -> tuple[str, ...]:
        """The :data:`FEATURES` that :meth:`supports` says run natively here (``fp32`` always does)."""
        return tuple(f for f in FEATURES if self.supports(f)[0])

    def __str__(self) -> str:
        isa = "+".join(self.isa) or "no AVX flags"
        gpu = f", GPU {self.gpu}" if self.gpu else ""
        if self.gpu_memory_gib is not None:
            gpu += f" {self.gpu_memory_gib:g} GiB"
        if self.cuda_version or self.gpu_driver:
            gpu += f" (CUDA {self.cuda_version or '?'}, driver {self.gpu_driver or '?'})"
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


def _gpu(index: int = 0, load_torch: bool = False) -> dict[str, Any]:
    """The GPU fields of CUDA device ``index`` when torch has CUDA, else {} (torch is imported
    only with ``load_torch``: on the CPU, without torch loaded there is no GPU path in this
    process anyway)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None and load_torch:
        import torch
    try:
        if torch is None or not torch.cuda.is_available() or index >= torch.cuda.device_count():
            return {}
        props = torch.cuda.get_device_properties(index)
        major, minor = props.major, props.minor
        return {"gpu": f"{props.name} ({major}.{minor})", "gpu_name": props.name,
                "gpu_capability": (int(major), int(minor)),
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cuda_version": torch.version.cuda, "gpu_driver": _driver_version()}
    except Exception:  # a broken driver is "no GPU" for tuning purposes
        return {}


def _driver_version(path: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The NVIDIA kernel driver's version (``550.54.15``) from ``/proc`` (Linux), else from NVML
    when ``pynvml`` is installed, else None."""
    try:
        for word in path.read_text(errors="replace").split("Kernel Module", 1)[1].split():
            if word[:1].isdigit():
                return word
    except (OSError, IndexError):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no pynvml, or no NVML library: unknown
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_fingerprint(device: str = "cpu") -> DeviceFingerprint:
    """The fingerprint of this machine for ``device`` (``cpu``, ``cuda``, ``cuda:N``).

    For a CUDA device it records that GPU (importing torch); for the CPU, GPU 0 if torch is
    already loaded and sees one.

    Raises:
        UsageError: a device spelling ptool does not know, or a CUDA device this machine lacks
            (a fingerprint of a GPU that is not there would key records nothing can reproduce).
    """
    from ptool.backends.device import check_available, parse_device

    dev = parse_device(device)
    check_available(dev)
    model, isa = _cpuinfo()
    gpu = _gpu(dev.index, load_torch=dev.is_cuda)
    return DeviceFingerprint(
        device=str(dev),
        cpu_model=model or platform.processor() or "unknown",
        isa=isa,
        cores=_cores(),
        gpu=gpu.pop("gpu", None),
        machine=platform.machine() or "unknown",
        versions=_versions(),
        **gpu,
    )
