"""Model sources: .pt2 ExportedPrograms, pickles refused, missing paths, unsupported objects."""

import pytest
import torch

import ptool
from ptool.frontends.loaders import ModelKind, load_model
from tests.models import zoo


def test_pt2_round_trip_transforms_with_its_own_example_inputs(tmp_path):
    case = next(f for f in zoo.bn_zoo() if f.name == "residual_block")
    ep = torch.export.export(case.model, case.example_inputs)
    path = tmp_path / "block.pt2"
    torch.export.save(ep, str(path))
    m2 = ptool.transform(str(path), ["fold-bn"])  # example inputs come from the .pt2
    assert m2.report["fold-bn"].rewritten == case.folds
    x = case.inputs(5)[0][0]
    assert ptool.verify.compare(case.model(x), m2(x)).max_rel_error <= 1e-5


def test_exported_program_object_is_accepted():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    x = torch.randn(2, 4)
    ep = torch.export.export(model, (x,))
    assert load_model(ep).kind is ModelKind.EXPORTED
    m2 = ptool.transform(ep, ["cse"])
    torch.testing.assert_close(m2(x), model(x))


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "pytorch_model.bin", "x.pkl"])
def test_pickles_are_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not really a pickle")
    with pytest.raises(ptool.ModelLoadError, match="pickle file.*refuses it"):
        ptool.transform(str(path), ["dce"])


def test_missing_path_and_unknown_types():
    with pytest.raises(ptool.ModelLoadError, match="does not exist"):
        ptool.transform("/no/such/model.onnx", ["dce"])
    with pytest.raises(ptool.ModelLoadError, match="cannot use a int as a model"):
        ptool.transform(3, ["dce"])


def test_unsupported_file_suffix(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"")
    with pytest.raises(ptool.ModelLoadError, match="unsupported model file 'model.h5'"):
        ptool.transform(str(path), ["dce"])


def test_corrupt_pt2_is_a_load_error(tmp_path):
    path = tmp_path / "broken.pt2"
    path.write_bytes(b"garbage")
    with pytest.raises(ptool.ModelLoadError, match="not a loadable torch.export .pt2"):
        ptool.transform(str(path), ["dce"])


def test_pickle_refusal_names_the_opt_in(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ptool.ModelLoadError, match="allow_pickle=True / --allow-pickle"):
        load_model(str(path))


def test_opted_in_state_dict_is_read_safely_and_explained(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.ones(2, 2)}, path)
    with pytest.raises(ptool.ModelLoadError, match="holds a state dict .weights without an architecture"):
        ptool.transform(str(path), ["dce"], allow_pickle=True)


class _Evil:
    """A pickle payload that would run code if unpickled unsafely."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PTOOL_PWNED']).write_text('x')",))


def test_opted_in_pickle_never_runs_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PTOOL_PWNED", str(marker))
    path = tmp_path / "model.pt"
    torch.save({"payload": _Evil()}, path)
    with pytest.raises(ptool.ModelLoadError, match="cannot be read with torch.load.weights_only=True.*never runs code"):
        load_model(str(path), allow_pickle=True)
    assert not marker.exists()


def test_opted_in_pickled_module_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ptool.ModelLoadError, match="pickled torch.nn.modules.linear.Linear, which needs its code") as e:
        load_model(str(path), allow_pickle=True)
    message = str(e.value)
    assert not any(advice in message for advice in ("weights_only=False", "\x1b", "two options"))  # not torch's advice
    assert message.endswith("as safetensors, or as ONNX")  # whole, not cut mid-sentence
