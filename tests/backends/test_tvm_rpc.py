"""MetaSchedule measuring through a TVM RPC tracker and two RPC servers on 127.0.0.1 (real processes):
the same number of trials as a local tune lands in the same database, which the next build reuses;
and a local tune afterwards in the same process works."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from ptool.backends import compile_module
from ptool.errors import BackendError

pytestmark = [pytest.mark.tvm, pytest.mark.slow]

TRIALS = 4  # two per kernel, as tests/backends/test_tvm_tuning.py: search, build, run, database in about a minute
KEY = "ptool-test"


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_servers(tracker: str, count: int, timeout: float = 180.0) -> None:
    """Until the tracker answers with ``count`` free servers (each process imports TVM first: ~20 s
    on 2 busy cores)."""
    from tvm import rpc

    host, _, port = tracker.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if rpc.connect_tracker(host, int(port)).summary()["queue_info"].get(KEY, {}).get("free", 0) >= count:
                return
        except Exception:  # the tracker is still starting
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{count} RPC servers did not register with {tracker} in {timeout} s")


@pytest.fixture(scope="module")
def tracker():
    """A tracker and two servers (each its own process, one thread each); stopped after the module."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                               str(port), "--port-end", str(port + 1)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait_for_servers(address, 0)
        for server_port in (_free_port(), _free_port()):
            procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                           "--port", str(server_port), "--port-end", str(server_port + 1),
                                           "--tracker", address, "--key", KEY], env=env, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for_servers(address, 2)
        yield address
    finally:  # each process and the worker it spawned (tvm.exec.popen_worker) are one process group
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # the group's popen_worker, if it outlived its parent


def _records(folder) -> int:
    return len((folder / "database_tuning_record.json").read_text().splitlines())


@pytest.fixture(scope="module")
def tuned_remotely(tracker, tmp_path_factory):
    """(model, input, the build tuned through the tracker, its tuning folder), made in the setup phase."""
    model, x = _mlp(), torch.randn(32, 64)
    rpc_dir = tmp_path_factory.mktemp("rpc")
    remote = compile_module(model, "tvm", (x,), tune_trials=TRIALS, tuning_dir=str(rpc_dir),
                            rpc_tracker=tracker, rpc_key=KEY)
    return model, x, remote, rpc_dir


def test_tune_through_the_tracker_then_locally_records_the_same_trials_and_the_database_is_reused(
        tracker, tuned_remotely, tmp_path):
    from ptool.backends.tvm_tuning import METASCHEDULE_LOGGER

    model, x, remote, rpc_dir = tuned_remotely
    # The RPC tune left MetaSchedule's logger non-propagating; pytest attaches its unnamed capture handler
    # to such loggers at each test phase, and a user's logging may add one: MetaSchedule's logging set-up
    # used to fail on it ('NoneType' object has no attribute 'format'), so no later tune worked here.
    logger, handler = logging.getLogger(METASCHEDULE_LOGGER), logging.NullHandler()
    local_dir = tmp_path / "local"
    logger.addHandler(handler)
    try:
        local = compile_module(model, "tvm", (x,), tune_trials=TRIALS, tuning_dir=str(local_dir))
        assert handler in logger.handlers  # set aside while tuning, put back
    finally:
        logger.removeHandler(handler)
    assert local.info["tuning_reused"] is False and "rpc_tracker" not in local.info
    assert remote.info["tuning_reused"] is False
    assert remote.info["rpc_tracker"] == tracker and remote.info["rpc_servers"] == 2
    assert _records(rpc_dir) == _records(local_dir) >= TRIALS  # every trial measured, as many as locally
    for k in remote.info["kernels"]:
        assert k["ptool_us"] > 0 and k["metaschedule_us"] > 0  # both schedules timed on the servers
    with torch.no_grad():
        assert (remote(x) - model(x)).abs().max().item() < 1e-5
    t0 = time.perf_counter()
    again = compile_module(model, "tvm", (x,), tune_trials=TRIALS, tuning_dir=str(rpc_dir),
                           rpc_tracker=tracker, rpc_key=KEY)
    assert again.info["tuning_reused"] is True and again.info["tuning_seconds"] == 0.0
    assert _records(rpc_dir) == _records(local_dir)  # nothing measured again
    assert time.perf_counter() - t0 < 60
    assert torch.equal(again(x), remote(x))


def test_an_unknown_key_or_a_dead_tracker_is_a_one_line_error(tracker, tmp_path):
    model, x = _mlp(), torch.randn(32, 64)
    with pytest.raises(BackendError, match=f"no RPC server is registered with key 'nokey' at tracker {tracker} "
                                           f"\\(keys there: {KEY}\\)"):
        compile_module(model, "tvm", (x,), tune_trials=TRIALS, tuning_dir=str(tmp_path / "a"),
                       rpc_tracker=tracker, rpc_key="nokey")
    dead = f"127.0.0.1:{_free_port()}"
    with pytest.raises(BackendError, match=f"TVM RPC tracker {dead} does not answer"):
        compile_module(model, "tvm", (x,), tune_trials=TRIALS, tuning_dir=str(tmp_path / "b"),
                       rpc_tracker=dead, rpc_key=KEY)
    with pytest.raises(Exception, match="'rpc_tracker' and 'rpc_key' go together"):
        compile_module(model, "tvm", (x,), tune_trials=TRIALS, rpc_tracker=tracker)
