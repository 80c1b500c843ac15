"""``ptool tune --ray`` / ``autotune(cluster=...)`` on a real local Ray cluster (head + worker processes).

Each slow test starts its own cluster (a head with no CPUs, so every task runs on a worker node, and
worker nodes with 100 MB object stores) and shuts it down, leaving no Ray process behind.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ptool
from ptool.errors import UsageError
from ptool.tune.record import Status
from ptool.tune.tuner import TIE

ROOT = Path(__file__).resolve().parents[2]
STORE = 100 * 2**20
OTHER = "000000000000"  # the fingerprint key of a device that is not this one

MODELS = '''
import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16)).eval()
    return model, (torch.randn(4, 64),)
'''


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16)).eval()
    x = torch.randn(4, 64)
    held = [(torch.randn(4, 64, generator=torch.Generator().manual_seed(s)),) for s in (1, 2)]
    return model, x, held


def start_cluster(monkeypatch, workers: int, other_head: bool = False):
    """A Ray head + ``workers`` timing nodes advertising this machine's fingerprint, each node a
    separate set of processes. The head has no CPU (every task runs on a worker node), or with
    ``other_head`` one CPU and another device's fingerprint (it may run fidelity checks, never timings)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from ptool.tune.cluster import RESOURCE_PREFIX, node_resources

    # the node processes (and their workers) import ptool from this checkout
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    head = {"num_cpus": 1, "resources": {RESOURCE_PREFIX + OTHER: 1}} if other_head else {"num_cpus": 0}
    cluster = Cluster(initialize_head=True, head_node_args={**head, "object_store_memory": STORE,
                                                            "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=1, resources=node_resources("cpu"), object_store_memory=STORE)
                 for _ in range(workers)]
    except BaseException:
        cluster.shutdown()
        raise
    return ray, cluster, nodes


def stop_cluster(ray, cluster) -> None:
    ray.shutdown()
    cluster.shutdown()


def short(node) -> str:
    return f"{node.node_ip_address}/{node.node_id[:8]}"


# -- without a cluster ------------------------------------------------------------------------------


def test_without_ray_the_cluster_option_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as it does when it is not installed
    model, x, _ = mlp()
    with pytest.raises(UsageError, match=r"needs Ray, which is not installed: pip install 'ptool\[cluster\]'"):
        ptool.autotune(model, (x,), cluster="auto", record_dir=tmp_path, progress=False)
    from ptool.cli import main

    (tmp_path / "tune_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "tune_models:mlp", "--ray", "auto", "-o", "out"]) == 2


@pytest.mark.parametrize("address", ["", "nohost", "ray://host:port", "host:"])
def test_a_bad_cluster_address_names_the_allowed_forms(address, tmp_path):
    pytest.importorskip("ray")
    model, x, _ = mlp()
    with pytest.raises(UsageError, match="allowed: auto, ray://HOST:PORT, HOST:PORT|must be 'auto'"):
        ptool.autotune(model, (x,), cluster=address, record_dir=tmp_path, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"tvm_tracker": "127.0.0.1:9190"}, "tvm_tracker and tvm_key go together"),
    ({"tvm_tracker": "127.0.0.1:9190", "tvm_key": "cpu"}, "give tvm_trials > 0 too"),
])
def test_tvm_tracker_options_are_checked_before_anything_runs(kwargs, message, tmp_path):
    model, x, _ = mlp()
    with pytest.raises(UsageError, match=message):
        ptool.autotune(model, (x,), record_dir=tmp_path, progress=False, **kwargs)


def test_tvm_rpc_backend_options_are_checked():
    from ptool.backends.tvm_backend import Options

    with pytest.raises(ValueError, match="'rpc_tracker' and 'rpc_key' go together"):
        Options(rpc_key="cpu")
    with pytest.raises(ValueError, match="'rpc_tracker' must be HOST:PORT, got 'nohost'"):
        Options(rpc_tracker="nohost", rpc_key="cpu")
    assert Options(rpc_tracker="127.0.0.1:9190", rpc_key="cpu").rpc_key == "cpu"


def test_node_resources_carry_this_machines_fingerprint(capsys):
    from ptool.tune.cluster import main
    from ptool.tune.fingerprint import device_fingerprint

    assert main([]) == 0
    assert json.loads(capsys.readouterr().out) == {f"ptool_fp_{device_fingerprint().key}": 1}


# -- on a local cluster -----------------------------------------------------------------------------


@pytest.mark.slow  # a 3-node cluster and two searches: ~60 s on 2 idle cores (150 s on busy ones)
def test_ray_search_matches_the_local_one_and_refuses_a_node_of_another_device(monkeypatch, tmp_path, capsys):
    from ptool.cli import main

    (tmp_path / "tune_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("tune_models", None)
    argv = ["tune", "tune_models:mlp", "--backends", "onnxruntime", "-p", "quantize", "--max-error", "1e-7",
            "--repeat", "10"]
    assert main([*argv, "-o", "local"]) == 0
    capsys.readouterr()
    ray, cluster, nodes = start_cluster(monkeypatch, workers=2, other_head=True)
    timing_nodes, refused = {short(n) for n in nodes}, short(cluster.head_node)
    try:
        assert main([*argv, "-o", "remote", "--ray", cluster.address]) == 0
        out = capsys.readouterr().out
        assert not ray.is_initialized()  # ptool joined the cluster for the search and left it
    finally:
        stop_cluster(ray, cluster)
    local = json.loads((tmp_path / "local" / "tuning_record.json").read_text())
    remote = json.loads((tmp_path / "remote" / "tuning_record.json").read_text())
    assert remote["status"] == "complete" and remote["key"] == local["key"]  # the same record a local run makes
    by_label = {r["label"]: r for r in local["rows"]}
    assert [r["label"] for r in remote["rows"]] == [r["label"] for r in local["rows"]]  # same candidates, same order
    assert {r["label"]: (r["status"], r["reason"]) for r in remote["rows"]} == \
        {r["label"]: (r["status"], r["reason"]) for r in local["rows"]}  # same exclusions, same reasons
    for r in remote["rows"]:
        if r["node"] == "":  # a fidelity check that ran on the refused node: no timing
            assert r["status"] == Status.EXCLUDED and r["median_ms"] is None and r["label"].endswith("(any backend)")
        else:
            assert r["node"] in timing_nodes, r  # every timing ran on a node with this device's fingerprint
        if r["status"] == Status.OK:  # the same fidelity, measured on another process
            assert r["error"] == pytest.approx(by_label[r["label"]]["error"], abs=1e-12)
    # the remote winner is picked by the local rule from the remote timings: an OK row within TIE of the
    # fastest one (not compared with the local run's timings: these candidates run in 0.05-0.1 ms, where
    # the other test worker beside this one doubled a median between the two runs)
    win_remote = next(r for r in remote["rows"] if r["winner"])
    fastest = min(r["median_ms"] for r in remote["rows"] if r["status"] == Status.OK)
    assert win_remote["status"] == Status.OK and by_label[win_remote["label"]]["status"] == Status.OK
    assert win_remote["median_ms"] <= fastest * (1 + TIE), win_remote
    # the table names each row's node; the node advertising another fingerprint is refused, in one line
    assert "node" in out.splitlines()[next(i for i, line in enumerate(out.splitlines()) if "candidate" in line)]
    line = next(x for x in out.splitlines() if refused in x)
    assert line == (f"note: node {refused} refused for timing: its device fingerprint {OTHER} differs from "
                    f"the target's {_fp_key(remote)}; it runs fidelity "
                    f"checks only")


def _fp_key(record: dict) -> str:
    from ptool.tune.fingerprint import DeviceFingerprint

    return DeviceFingerprint.from_dict(record["fingerprint"]).key


@pytest.mark.slow  # a 3-node cluster, an interrupted search, its resumption with a node killed: ~60 s
def test_ctrl_c_resumes_and_a_killed_worker_loses_no_candidate(monkeypatch, tmp_path):
    from ptool.tune.tuner import TuningInterrupted

    model, x, held = mlp()
    kw = dict(backends=["torch", "onnxruntime"], passes=["quantize"], max_error=1e-7, held_out_inputs=held,
              record_dir=tmp_path, repeat=5,
              variants={"torch": [{}], "onnxruntime": [{}, {"intra_op_threads": 1}, {"intra_op_threads": 2},
                                                       {"graph_optimization_level": "basic"}]})
    record = tmp_path / "tuning_record.json"
    ray, cluster, nodes = start_cluster(monkeypatch, workers=2)
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)

        def interrupt(done, total, label):
            if done >= 1 and label != "done":
                on_disk = json.loads(record.read_text())  # written as the result arrived
                assert on_disk["status"] == "running" and on_disk["rows"]
                raise KeyboardInterrupt

        with pytest.raises(TuningInterrupted) as stopped:
            ptool.autotune(model, (x,), cluster=cluster.address, progress=interrupt, **kw)
        first = json.loads(record.read_text())
        assert first["status"] == "interrupted" and stopped.value.result.status == "interrupted"
        finished = {r["label"]: r for r in first["rows"] if r["status"] in Status.DONE}
        assert 1 <= len(finished) < len(first["rows"])
        assert {r["status"] for r in first["rows"]} - set(Status.DONE) == {Status.NOT_MEASURED}

        driver = ray.get_runtime_context().get_node_id()
        victim = next(n for n in nodes if n.node_id != driver)
        survivor = short(next(n for n in nodes if n is not victim))
        killed, came_back = [], []

        def kill(done, total, label):
            came_back.append(label)
            if not killed and label != "done":
                cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: its raylet and its workers
                killed.append(done)

        result = ptool.autotune(model, (x,), cluster=cluster.address, progress=kill, **kw)
        assert ray.is_initialized()  # the caller's own connection is left open
    finally:
        stop_cluster(ray, cluster)
    assert killed
    done = json.loads(record.read_text())
    assert done["status"] == "complete" and result.status == "complete"
    labels = [r["label"] for r in done["rows"]]
    assert len(labels) == len(set(labels))  # every candidate exactly once
    # the stage-1 rows the interrupted run listed, and the approximate pass whose check it never saw back
    assert set(labels) == {r["label"] for r in first["rows"]} | {"quantize | (any backend)"}
    assert all(r["status"] in Status.DONE for r in done["rows"]), [(r["label"], r["reason"]) for r in done["rows"]]
    rows = {r["label"]: r for r in done["rows"]}
    # what the interrupted run finished (whichever rows the race between the tasks and Ctrl-C made those) is
    # kept as it was: no task of the resumed run measured it, and its row is the same but for the run-off's
    # side-by-side re-timing of the best few (which rebuilds them on one node) and the winner's marks
    assert not set(finished) & set(came_back), came_back
    assert ("checked quantize" in came_back) == ("quantize | (any backend)" not in finished)
    run_off = {"median_ms", "p10_ms", "p90_ms", "spread", "runs", "peak_rss_mb", "timing", "node"}
    for label, row in finished.items():
        kept = {k for k in row if k not in {"pareto", "winner"} | (run_off if rows[label]["timing"] == "run-off"
                                                                  else set())}
        assert {k: rows[label][k] for k in kept} == {k: row[k] for k in kept}, label
    assert f"{len(finished)} rows reused from an unfinished record" in " ".join(done["notes"])
    assert any(r["node"] == survivor for r in done["rows"] if r["label"] not in finished)
