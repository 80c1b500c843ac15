"""Staging folders: removed after the block, and a dead process's leftovers removed by the next write."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ptool.staging import move_into_place, staging_folder


def test_files_move_weights_first_and_the_folder_goes(tmp_path):
    target = tmp_path / "out" / "m.onnx"
    with staging_folder(target) as folder:
        assert folder.parent == target.parent and folder.name.startswith(f".m.onnx.{os.getpid()}.")
        (folder / "m.onnx").write_text("model")
        (folder / "m.onnx.data").write_text("weights")
        move_into_place(folder, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "m.onnx"
    with pytest.raises(RuntimeError), staging_folder(target) as folder:
        (folder / "m.onnx").write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_dead_process_are_removed_and_a_live_ones_kept(tmp_path):
    target = tmp_path / "m.onnx"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = tmp_path / f".m.onnx.{dead_pid}.abc123.tmp"
    live = tmp_path / f".m.onnx.{os.getppid()}.def456.tmp"  # our parent still runs
    other = tmp_path / f".other.onnx.{dead_pid}.abc123.tmp"  # another target's: not ours to judge
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "m.onnx.data").write_text("partial")
    with staging_folder(target):
        pass
    assert not stale.exists() and live.exists() and other.exists()
