"""``ptool tune``: the table and winner, the saved record reused by a second run, errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptool.cli import main
from tests._signals import default_sigint

ROOT = Path(__file__).resolve().parents[2]

MODELS = '''
import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16)).eval()
    return model, (torch.randn(4, 64),)
'''


@pytest.fixture()
def models(tmp_path, monkeypatch):
    (tmp_path / "tune_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("tune_models", None)
    return tmp_path


def test_tune_prints_table_and_winner_saves_record_and_reuses_it(models, capsys):
    argv = ["tune", "tune_models:mlp", "--backends", "onnxruntime", "-p", "quantize", "--max-error", "1e-7",
            "--repeat", "5", "-o", "out/"]
    t0 = time.perf_counter()
    assert main(argv) == 0
    first_s = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "winner: passes [dce, cse, constant-fold, fold-bn] on onnxruntime" in out
    quant = next(line for line in out.splitlines() if line.lstrip("*P ").startswith("quantize"))
    assert "excluded" in quant and "> max_error 1e-07" in quant
    assert "record: out/tuning_record.json, plot: out/latency_vs_fidelity.png" in out  # one slash after "out/"
    record = json.loads((models / "out" / "tuning_record.json").read_text())
    assert record["status"] == "complete" and record["winner"]["backend"] == "onnxruntime"
    mask = os.umask(0)
    os.umask(mask)
    assert (models / "out" / "tuning_record.json").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    assert (models / "out" / "latency_vs_fidelity.png").read_bytes()[:4] == b"\x89PNG"

    t0 = time.perf_counter()
    assert main(argv) == 0
    second_s = time.perf_counter() - t0
    out2 = capsys.readouterr().out
    assert "reused the saved record" in out2
    assert second_s < 0.1 * first_s, (first_s, second_s)


@pytest.mark.parametrize("argv, message", [
    (["--max-error", "-1"], "--max-error must be a number >= 0"),
    (["--budget", "0"], "--budget must be > 0 seconds"),
    (["--backends", "tmv"], "unknown backend 'tmv'"),
    (["-p", "quantise"], "unknown pass 'quantise'"),
    (["--device", "tpu"], "unknown device 'tpu' (allowed: cpu, cuda, cuda:N)"),
])
def test_bad_input_is_one_line_exit_2(models, capsys, argv, message):
    code = main(["tune", "tune_models:mlp", "-o", "out", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("ptool: error:") and message in err and "\n" not in err


@pytest.mark.slow  # a subprocess, torch.compile, and a second run to finish the search: ~40 s on 2 idle cores
def test_ctrl_c_saves_what_was_measured_and_exits_130(models):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The interrupt lands 1 s after the search starts, while candidates are being measured: the
    # whole search can take under 6 s once torch.compile's cache is warm, so waiting longer could
    # let it finish first.
    proc = subprocess.Popen([sys.executable, "-m", "ptool.cli", "tune", "tune_models:mlp",
                             "--backends", "torch,onnxruntime", "-p", "none", "-o", "out"], cwd=models, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    record = models / "out" / "tuning_record.json"
    try:
        line = proc.stdout.readline()  # "model: ..." is printed just before the search starts
        assert line.startswith("model:"), line
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    data = json.loads(record.read_text())
    assert data["status"] == "interrupted"
    finished = {r["label"]: r for r in data["rows"] if r["status"] in ("ok", "excluded", "failed")}
    assert len(finished) < len(data["rows"])  # stopped part way
    assert {r["status"] for r in data["rows"]} - {"ok", "excluded", "failed"} <= {"interrupted", "not measured"}

    # Rerunning finishes the search, measuring only what the interrupted run did not.
    assert main(["tune", "tune_models:mlp", "--backends", "torch,onnxruntime", "-p", "none", "-o", "out"]) == 0
    done = json.loads(record.read_text())
    assert done["status"] == "complete"
    assert all(r["status"] in ("ok", "failed") for r in done["rows"])
    rerun = {r["label"]: r for r in done["rows"]}
    for label, row in finished.items():  # kept as measured, not timed again
        assert rerun[label]["median_ms"] == row["median_ms"]
    if finished:
        assert f"{len(finished)} rows reused from an unfinished record" in " ".join(done["notes"])
