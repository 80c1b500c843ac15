"""Data-parallel conversion: the share and weighting helpers, and torchrun against one process.

The torchrun cases launch ``tools/convert_parallel.py`` (hedgehog conversion, attention transfer
then distillation) in one process and in two under ``python -m torch.distributed.run``, and
compare the trained kernel weights; shapes are chosen so that neither stage splits evenly (3 rows
per batch, 3 calls per distillation step over 2 processes). all-MiniLM-L6-v2 is measured by
``tools/bench_parallel_conversion.py`` (minutes here, too slow for the suite).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ptool.distributed import DataParallelError, World, rows, world

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_parallel.py"


# -- shares and weights ------------------------------------------------------------------------------

@pytest.mark.parametrize("count,size", [(3, 2), (5, 3), (8, 2), (1, 2), (2, 3)])
def test_shares_cover_the_items_once_and_weights_add_to_one(count, size):
    parts = [World(rank, size).part(count) for rank in range(size)]
    taken = [i for part, _ in parts for i in range(count)[part]]
    assert taken == list(range(count))
    assert max(len(range(count)[p]) for p, _ in parts) - min(len(range(count)[p]) for p, _ in parts) <= 1
    assert sum(w for _, w in parts) == pytest.approx(1.0)
    for part, weight in parts:
        assert weight == len(range(count)[part]) / count


@pytest.mark.parametrize("count,size", [(3, 2), (7, 3), (1, 2)])
def test_weighted_shares_of_mean_losses_sum_to_the_global_mean(count, size):
    losses = torch.rand(count, generator=torch.Generator().manual_seed(count), dtype=torch.float64) * 10
    shares = []
    for rank in range(size):
        part, weight = World(rank, size).part(count)
        if weight:
            shares.append(weight * losses[part].mean())
    assert float(sum(shares)) == pytest.approx(float(losses.mean()), abs=1e-12)
    if count % size and count >= size:  # the plain average of the processes' means is not the global mean
        means = [losses[World(r, size).part(count)[0]].mean() for r in range(size)]
        assert abs(float(sum(means) / size) - float(losses.mean())) > 1e-3


def test_rows_split_the_batch_and_pass_broadcast_masks_through():
    x = torch.arange(12.0).reshape(3, 4)
    part, _ = World(1, 2).part(3)
    assert torch.equal(rows(x, part, 3), x[2:])
    mask = torch.ones(1, 1, 1, 4)
    assert rows(mask, part, 3) is mask
    assert rows(None, part, 3) is None
    assert rows(torch.ones(3, 1, 1, 4), part, 3).shape == (1, 1, 1, 4)


def test_one_process_is_a_world_of_one_and_reduce_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    here = world()
    assert (here.rank, here.size, here.parallel, here.writes) == (0, 1, False, True)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    assert float(here.reduce([p], torch.tensor(2.5))) == 2.5
    assert torch.equal(p.grad, torch.full((2,), 3.0))
    assert here.total([1.0, 2.0]) == [1.0, 2.0]


def test_reduce_sums_gradients_and_keeps_a_gradient_no_process_has_none(tmp_path):
    # a one-member gloo group: the collectives are the identity, the bookkeeping around them is real
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert world() == World(0, 1)
        a, b, c = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
        a.grad = torch.full((2, 2), 1.5)
        total = World(0, 2).reduce([a, b, c], torch.tensor(0.25))
        assert float(total) == 0.25
        assert torch.equal(a.grad, torch.full((2, 2), 1.5))
        assert b.grad is None and c.grad is None
    finally:
        torch.distributed.destroy_process_group()


def test_a_failed_collective_is_one_line_naming_the_run():
    def lost(*args, **kwargs):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1234\nmore backend detail")

    with pytest.raises(DataParallelError, match=r"over 2 processes: rank 1 lost its peers .*Connection closed") as e:
        World(1, 2)._collective(lost)
    assert "\n" not in str(e.value)


# -- the trainers' shares add up to the one-process loss (and gradient) ------------------------------

def _shares_match_whole(loss_of, params) -> None:
    """``loss_of(world)`` in one process vs summed over the two ranks' shares: loss and gradients."""
    whole = loss_of(World())
    grads = torch.autograd.grad(whole, params)
    shares = [loss_of(World(rank, 2)) for rank in range(2)]
    total = sum(shares)
    share_grads = torch.autograd.grad(total, params)
    assert float(total.detach()) == pytest.approx(float(whole.detach()), rel=1e-6)
    for g, h in zip(grads, share_grads):
        assert torch.allclose(g, h, rtol=1e-5, atol=1e-7)
    halves = [float(s.detach()) / float(whole.detach()) for s in shares]
    assert all(abs(h - 0.5) > 1e-3 for h in halves), halves  # the ranks' shares really differ


def test_attention_transfer_shares_sum_to_the_whole_step():
    from ptool.passes.attention.convert import _teacher, _transfer_share
    from ptool.passes.attention.kernel import SiteShape
    from ptool.passes.attention.linear import HedgehogKernel

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 8, 4, generator=g) * 2 for _ in range(3))  # 3 rows over 2 ranks
    mask = torch.zeros(3, 1, 1, 8)
    mask[0, ..., 5:] = -1e9
    kernel = HedgehogKernel(SiteShape.of(q, k, v))
    with torch.no_grad():
        for p in kernel.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    batch = (q, k, v, mask)
    teacher = _teacher(batch, kernel.shape)
    _shares_match_whole(lambda w: _transfer_share(w, {0: kernel}, {0: batch}, {0: teacher}, 1.0),
                        list(kernel.parameters()))


def test_learned_rotation_shares_sum_to_the_whole_objective():
    from ptool.passes.quant._learn import _loss, _Transform

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 4, generator=g)  # 5 tokens, 2 blocks of 4
    wrs = [torch.randn(6, 2, 4, generator=g)]
    targets = [x.flatten(-2) @ wrs[0].flatten(-2).t()]
    norms = [targets[0].pow(2).sum()]
    module = _Transform(4)
    with torch.no_grad():
        module.log_s.copy_(0.3 * torch.randn(4, generator=g))

    def loss_of(w: World) -> torch.Tensor:
        part, _ = w.part(x.shape[0])
        return _loss(module, x[part], wrs, [t[part] for t in targets], 4, 4, norms)

    _shares_match_whole(loss_of, list(module.parameters()))


# -- torchrun against one process ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PTOOL_CHECKPOINT_DIR": "off"}


def _convert(out: Path, processes: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    launch = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                                        "--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    return subprocess.run([sys.executable, *launch, str(TOOL), "-o", str(out), *args], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _compare(tmp_path: Path, args: list[str]) -> tuple[dict, dict]:
    runs = {}
    for n in (1, 2):
        done = _convert(tmp_path / f"{n}.pt", n, args)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[n] = torch.load(tmp_path / f"{n}.pt")
    one, two = runs[1], runs[2]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["notes"]["transfer_processes"] == 2 and two["notes"]["distill_processes"] == 2
    assert one["weights"].keys() == two["weights"].keys() and one["weights"]
    for name, w in one["weights"].items():
        assert (w - two["weights"][name]).abs().max() <= 1e-5, name
        moved = (w - torch.eye(w.shape[-2], w.shape[-1])).abs().max()  # hedgehog maps start at the identity
        assert moved > 1e-3, f"{name} barely trained ({moved}): the comparison would prove nothing"
    for key in ("transfer_last_loss", "distill_mse_before", "distill_mse_after"):
        assert two["notes"][key] == pytest.approx(one["notes"][key], rel=1e-5), key
    return one, two


@pytest.mark.slow  # three interpreters start and capture the model: tens of seconds
def test_torchrun_two_processes_train_the_weights_one_process_trains(tmp_path):
    _compare(tmp_path, ["--model", "tiny", "--rows", "3", "--seq", "16", "--batches", "3", "--transfer-steps", "4",
                        "--distill-steps", "4", "--distill-batch", "3"])


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_without_hanging(tmp_path):
    start = time.monotonic()
    done = _convert(tmp_path / "x.pt", 2, ["--model", "tiny", "--rows", "3", "--seq", "16", "--batches", "2",
                                           "--fail-rank", "1"], timeout=240)
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stderr
    assert not (tmp_path / "x.pt").exists()
    assert time.monotonic() - start < 200

