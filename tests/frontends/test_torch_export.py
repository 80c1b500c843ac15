"""Capture: torch.export first, a documented fallback, clear errors for what cannot be traced."""

import pytest
import torch

import ptool
from ptool.frontends.torch_export import CaptureMethod, capture


class _DataDependent(torch.nn.Module):
    """Python control flow on a tensor value: torch.export refuses it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class _Untraceable(torch.nn.Module):
    """Converts a tensor to a Python list and back: no tracer can keep that in a graph."""

    def forward(self, x):
        values = x.tolist()
        return torch.tensor([v * 2 for v in values])


def test_export_is_the_first_choice():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    captured = capture(m, (torch.randn(2, 4),))
    assert captured.method is CaptureMethod.EXPORT
    assert captured.exported_program is not None
    assert all("val" in n.meta for n in captured.graph_module.graph.nodes if n.op in ("placeholder", "call_function"))


def test_data_dependent_control_flow_falls_back_with_a_warning():
    torch.manual_seed(0)
    model = _DataDependent().eval()
    x = torch.ones(2, 4)
    with pytest.warns(UserWarning, match="specializes Python control flow"):
        m2 = ptool.transform(model, ["dce"], (x,))
    assert m2.report.capture.startswith("torch.export.draft_export")
    torch.testing.assert_close(m2(x), model(x))
    # an input that takes the other branch fails loudly instead of computing the wrong thing
    with pytest.raises(ptool.InputError, match="takes a different path"):
        m2(-x)


def test_untraceable_model_raises_trace_error_or_falls_back():
    x = torch.tensor([1.0, 2.0])
    try:
        m2 = ptool.transform(_Untraceable(), ["dce"], (x,))
    except ptool.TraceError as e:
        assert "torch.export cannot trace this model" in str(e)
        assert "\n" not in str(e)
    else:  # a fallback that specializes is only acceptable if it still computes the right thing
        torch.testing.assert_close(m2(x), _Untraceable()(x))


def test_inputs_must_be_a_tuple():
    with pytest.raises(ptool.InputError, match="example_inputs must be a tuple"):
        ptool.transform(torch.nn.Linear(2, 2), ["dce"], example_inputs={"x": 1})
    with pytest.raises(ptool.InputError, match="example inputs are required"):
        ptool.transform(torch.nn.Linear(2, 2), ["dce"])


def test_bad_pass_is_reported_before_tracing():
    with pytest.raises(ptool.PassError, match="unknown pass"):
        ptool.transform(torch.nn.Linear(2, 2), ["fold-everything"], (torch.randn(1, 2),))


def test_user_model_left_in_its_mode():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    m2 = ptool.transform(m, ["dce"], (torch.randn(2, 4),))
    assert m.training  # ptool works on an eval-mode copy, not the user's object
    x = torch.randn(2, 4)
    torch.testing.assert_close(m2(x), m.eval()(x))
