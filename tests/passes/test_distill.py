"""The shared training loop: a step whose loss or gradient is not finite stops the run cleanly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ptool import checkpoint
from ptool.passes.distill import train

STEPS = 8


@pytest.fixture(autouse=True)
def no_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(checkpoint.DIR_ENV, str(tmp_path / "checkpoints"))


def _fit(bad_step: int | None, bad: str) -> tuple[torch.Tensor, list[torch.Tensor], object]:
    """A least-squares fit whose step ``bad_step`` has a NaN loss (``bad="loss"``) or a finite loss
    with an infinite gradient (``bad="grad"``: sqrt at 0, as an RMS norm of an all-zero row gives)."""
    w = torch.nn.Parameter(torch.ones(4))
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.randn(16)
    seen: list[torch.Tensor] = []

    def loss_at(step: int) -> torch.Tensor:
        seen.append(w.detach().clone())
        loss = (x @ w - y).pow(2).mean()
        if step == bad_step:
            loss = loss * math.nan if bad == "loss" else loss + (w[0] - w[0].detach()).sqrt()
        return loss

    trained = train([w], steps=STEPS, lr=0.1, loss_at=loss_at, desc="toy fit")
    return w.detach(), seen, trained


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_non_finite_step_stops_the_run_with_the_weights_before_it(bad, capsys):
    w, seen, trained = _fit(3, bad)
    assert trained.stopped_at == 3 and len(seen) == 4
    assert torch.isfinite(w).all()
    assert torch.equal(w, seen[3])  # the parameters step 3 started from: its update was not taken
    assert not torch.equal(w, torch.ones(4))  # steps 0-2 were
    assert "stopped at step 3 of 8" in trained.notes("distill")["distill_stopped"]
    assert "toy fit: stopped at step 3 of 8" in capsys.readouterr().err


def test_a_finite_run_takes_every_step_and_says_nothing():
    w, seen, trained = _fit(None, "loss")
    assert trained.stopped_at is None and len(seen) == STEPS and trained.notes("distill") == {}
    assert math.isfinite(trained.loss)
