"""Outputs users can trust: byte-identical reruns, and a write killed mid-way leaves no file.

Both are checked in real child processes: determinism across processes with different hash
seeds (so nothing depends on set/dict iteration order or object ids), and kills with SIGKILL
(no cleanup runs at all) and SIGINT (Ctrl-C) while the model file is being written.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests._signals import default_sigint

ROOT = Path(__file__).resolve().parents[2]

# One script, parameterised by argv: export a transformed fixture to argv[1]; with argv[2] set,
# the checker (the last step before the file is moved into place) announces itself and hangs.
_EXPORT_SCRIPT = textwrap.dedent("""
    import pathlib, sys, time
    sys.path.insert(0, {root!r})
    target, hang_flag = pathlib.Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None
    if hang_flag:
        import onnx.checker
        def hanging_check(*args, **kwargs):
            pathlib.Path(hang_flag).write_text("writing")
            time.sleep(120)
        onnx.checker.check_model = hanging_check
    import ptool
    from ptool.backends import export_onnx
    from tests.models import zoo
    fixture = zoo.bert()
    calibration = [fixture.inputs(i) for i in (1, 2)]
    m2 = ptool.transform(fixture.model, ["dce", "cse", "constant-fold", "linear-attention:feature_map=performer",
                                         "quantize"],
                         fixture.example_inputs, example_kwargs=fixture.example_kwargs, calibration=calibration)
    export_onnx(m2.graph_module, target, m2.example_inputs, m2.example_kwargs, external_data_threshold_bytes=0)
""").format(root=str(ROOT))


def _start(script: Path, *argv: str, hash_seed: str = "0") -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def export_script(tmp_path: Path) -> Path:
    script = tmp_path / "export_fixture.py"
    script.write_text(_EXPORT_SCRIPT)
    return script


@pytest.mark.slow
def test_same_model_and_passes_give_byte_identical_onnx_across_processes(tmp_path, export_script):
    runs = [(tmp_path / f"run{i}", str(seed)) for i, seed in enumerate((1, 2))]
    procs = []
    for folder, seed in runs:
        folder.mkdir()
        procs.append(_start(export_script, str(folder / "model.onnx"), hash_seed=seed))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    (a, _), (b, _) = runs
    assert sorted(p.name for p in a.iterdir()) == ["model.onnx", "model.onnx.data"]
    for name in ("model.onnx", "model.onnx.data"):
        assert _digest(a / name) == _digest(b / name), f"{name} differs between two identical runs"


def _wait_for(flag: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the export finished or failed before the kill point: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the export never reached the write step")
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_export_killed_while_writing_leaves_no_output_file(tmp_path, export_script, sig):
    out = tmp_path / "out"
    out.mkdir()
    target, flag = out / "model.onnx", tmp_path / "writing"
    proc = _start(export_script, str(target), str(flag))
    _wait_for(flag, proc)
    staged = [p for p in out.iterdir() if p.name.startswith(".model.onnx.")]
    assert staged and any((p / "model.onnx.data").exists() for p in staged)  # the kill landed mid-write
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not target.exists() and not (out / "model.onnx.data").exists()
    if sig == signal.SIGINT:  # Ctrl-C runs the cleanup: not even the staging folder is left
        assert list(out.iterdir()) == []


def test_public_export_takes_external_data_either_way(tmp_path):
    import onnx
    import torch

    import ptool

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 16)
    m2 = ptool.transform(model, ["dce"], (x,))
    split = ptool.export_onnx(m2, tmp_path / "split" / "m.onnx", external_data=True)
    whole = ptool.export_onnx(m2, tmp_path / "whole" / "m.onnx", external_data=False)
    assert sorted(p.name for p in split.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert sorted(p.name for p in whole.parent.iterdir()) == ["m.onnx"]
    locations = {e.value for t in onnx.load(str(split), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"m.onnx.data"}  # relative, beside the model
    for path in (split, whole):
        run = ptool.compile(ptool.transform(str(path)), backend="onnxruntime")
        torch.testing.assert_close(run(x), model(x), rtol=1e-5, atol=1e-6)
