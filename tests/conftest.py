"""Shared pytest set-up.

- Puts the repository root on ``sys.path`` so tests import fixtures as ``tests.models.zoo``
  whichever way pytest was launched (``pytest`` or ``python -m pytest``).
- Points ``PTOOL_CHECKPOINT_DIR`` (where long steps checkpoint, ``ptool.checkpoint``) at a temporary
  folder for the session, so tests never write to or resume from ``~/.cache``.
- Under pytest-xdist (``make test`` runs ``-n 2`` on two cores), each worker's torch uses one
  thread: two workers with two OpenMP threads each oversubscribe the cores, and torch's OpenMP
  then runs many times slower.
- Skips ``gpu`` tests without CUDA, with the reason. ``tvm`` tests are never skipped: ``make test``
  installs apache-tvm, so a missing TVM is a set-up failure that must show as red.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_gpu = None  # import torch.cuda only if some test asks
    for item in items:
        if item.get_closest_marker("gpu"):
            if has_gpu is None:
                import torch

                has_gpu = torch.cuda.is_available()
            if not has_gpu:
                item.add_marker(pytest.mark.skip(reason="no CUDA GPU on this machine"))


@pytest.fixture(autouse=True, scope="session")
def _checkpoints_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTOOL_CHECKPOINT_DIR", str(tmp_path_factory.mktemp("checkpoints")))
        yield
