"""Atomic output: write into a staging folder beside the target, move the files into place when done.

A staging folder is named ``.<target name>.<pid>.<random>.tmp`` in the target's own folder (so the
final ``os.replace`` is a rename on one file system). It is removed when the block ends, whatever
happened; a folder that a killed process (SIGKILL, power loss) left behind for the same target is
removed by the next write to that target, once its process is gone. Files are moved weights
first and the target's own name last, so the target never points at a missing weights file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A fresh, empty folder beside ``target`` (created with its parents), removed on exit.

    Raises:
        OSError: the folder cannot be created (callers turn this into their own error).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def move_into_place(folder: Path, target: Path) -> None:
    """Move every file of ``folder`` beside ``target``: the others (weights) first, ``target``'s
    own name last."""
    for f in sorted(folder.iterdir(), key=lambda p: p.name == target.name):
        os.replace(f, target.parent / f.name)


def _remove_stale(target: Path) -> None:
    """Remove staging folders for ``target`` whose process no longer runs."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.\w+\.tmp$")
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _running(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
