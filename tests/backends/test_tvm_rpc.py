"""TVM MetaSchedule over an RPC tracker, run in a process of its own.

The cases live in ``_tvm_rpc_cases.py``. An RPC session leaves process-wide TVM state behind
that makes a later local MetaSchedule build in the same process fail (``AttributeError:
'NoneType' object has no attribute 'format'``), so under pytest-xdist they would break whichever
TVM tuning test the worker runs next. A fresh interpreter keeps them apart.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow]


def test_tvm_rpc_cases_pass_in_their_own_process():
    cases = pathlib.Path(__file__).with_name("_tvm_rpc_cases.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", str(cases), "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist"], capture_output=True, text=True, timeout=1200,
                          cwd=pathlib.Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "error" not in proc.stdout.splitlines()[-1]
