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


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hedgehog_all_params(fixture):
    calibration = [fixture.inputs(i) for i in range(1, 3)]
    return dict(passes=["linear-attention:feature_map=hedgehog,transfer_steps=2,distill_steps=2,distill_params=all,"
                        "distill_lr=1e-6"],  # a step size that lowers the loss (larger ones raise it: reverted)
                example_inputs=fixture.example_inputs, example_kwargs=fixture.example_kwargs, calibration=calibration)


def test_transform_never_touches_the_users_model_even_when_training_all_parameters():
    from tests.models import zoo

    fixture = zoo.llama()
    fixture.model.train()
    before = _snapshot(fixture.model)
    m2 = ptool.transform(fixture.model, **_hedgehog_all_params(fixture))
    after = fixture.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in fixture.model.modules())
    trained = dict(m2.graph_module.named_parameters())
    assert any(not torch.equal(before[k], trained[k]) for k in before if k in trained)  # distillation did train


def test_copy_model_false_shares_the_weights_instead_of_copying():
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 8)).train()
    m2 = ptool.transform(m, ["dce"], (torch.randn(4, 64),), copy_model=False)
    params = dict(m2.graph_module.named_parameters())
    assert params["0.weight"].data_ptr() == m[0].weight.data_ptr()  # no second copy of the weights
    assert params["2.weight"].data_ptr() == m[2].weight.data_ptr()
    assert all(mod.training for mod in m.modules())  # flags restored
    x = torch.randn(4, 64)
    torch.testing.assert_close(m2(x), m.eval()(x))
    copied = ptool.transform(m, ["dce"], (torch.randn(4, 64),))
    assert dict(copied.graph_module.named_parameters())["0.weight"].data_ptr() != m[0].weight.data_ptr()
