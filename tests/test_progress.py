"""Step progress: loops report to an installed sink (the CLI's status line), else tqdm on a terminal."""

from __future__ import annotations

import torch

import ptool
from ptool.progress import reporting_to, steps


def test_steps_report_to_the_installed_sink_with_their_fields():
    seen = []
    with reporting_to(lambda label, done, total, fields: seen.append((label, done, total, dict(fields)))):
        with steps(3, "toy loop", initial=1) as bar:
            bar.update(1)
            bar.set_postfix(loss="0.5")
            bar.update(1)
    assert seen == [("toy loop", 1, 3, {}), ("toy loop", 2, 3, {}), ("toy loop", 2, 3, {"loss": "0.5"}),
                    ("toy loop", 3, 3, {"loss": "0.5"})]
    with steps(3, "no sink, no terminal") as bar:  # pytest's stderr is not a terminal: nothing shows
        assert bar is None


def test_a_calibrating_pass_reports_its_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(4, 8)
    seen = []
    with reporting_to(lambda label, done, total, fields: seen.append((label, done, total))):
        ptool.transform(model, ["quantize:mode=int8-static"], (x,), calibration=[(torch.randn(4, 8),)] * 3)
    assert seen[0] == ("quantize: calibrating", 0, 3) and seen[-1] == ("quantize: calibrating", 3, 3)
