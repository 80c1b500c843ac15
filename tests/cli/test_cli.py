"""The ``ptool`` command line: commands on tiny models, and the error contract.

Error contract checked for every bad input: exactly one line on stderr (``ptool: error: ...``),
the documented exit code, and no output file (nor a leftover staging folder) afterwards.

Exit codes: 2 for bad usage (missing path, folder without config.json, ONNX failing the checker,
unknown pass / option, bad flag, example inputs that do not fit the model, a module:function that
cannot be imported or called); 1 for a failed conversion. A model that runs but that torch.export
(and its fallbacks) cannot trace is a failed conversion, not bad usage: exit 1 (``TraceError``).

Commands run in-process through ``main([...])``; one test runs the real ``ptool`` executable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ptool.cli import main

_HAS_CUDA = torch.cuda.is_available()

FIXTURE_MODULE = "ptool_cli_fixture_models"

_FIXTURES = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class ConvBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


    def _conv_bn():
        torch.manual_seed(0)
        model = ConvBN().eval()
        with torch.no_grad():  # non-trivial statistics, so folding really changes the weights
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.3, 0.3)
        return model


    def conv_bn():
        return _conv_bn(), (torch.randn(2, 3, 8, 8),)


    def conv_bn_kwargs():
        return _conv_bn(), (), {"x": torch.randn(2, 3, 8, 8)}


    def wrong_shape():
        return _conv_bn(), (torch.randn(2, 5, 8, 8),)


    class TwoBranches(nn.Module):
        """conv3x3+BN || conv1x1+BN, summed: merge-branches merges only after fold-bn."""

        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
            self.b = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x))


    def two_branches():
        torch.manual_seed(0)
        return TwoBranches().eval(), (torch.randn(1, 4, 8, 8),)


    class OutlierMLP(nn.Module):
        """Weight columns 400x larger on inputs scaled 400x down: the same function, but int4 scales set
        by the outliers round every other weight to zero (far past quantize's cosine bound)."""

        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(64, 64), nn.Linear(64, 8)
            damp = torch.ones(64)
            damp[::16] = 1 / 400
            self.register_buffer("damp", damp)
            with torch.no_grad():
                self.fc.weight[:, ::16] *= 400.0

        def forward(self, x):
            return self.out(torch.relu(self.fc(x * self.damp)))


    def outlier_mlp():
        torch.manual_seed(0)
        return OutlierMLP().eval(), (torch.randn(4, 64),)


    class Boxed:  # a plain Python object (no pytree registration) holding the output
        def __init__(self, value):
            self.value = value


    class Untraceable(nn.Module):
        def forward(self, x):
            return Boxed(x * 2)


    def untraceable():
        return Untraceable(), (torch.randn(3),)


    def raises():
        raise RuntimeError("boom")


    def not_a_tuple():
        return _conv_bn()
    '''
)


@pytest.fixture(scope="module")
def fixture_module(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("cli_fixtures")
    (folder / f"{FIXTURE_MODULE}.py").write_text(_FIXTURES)
    sys.path.insert(0, str(folder))
    try:
        yield FIXTURE_MODULE
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(FIXTURE_MODULE, None)


def _spec(module: str, function: str) -> str:
    return f"{module}:{function}"


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _bad_onnx(path: Path) -> Path:
    """A parseable ONNX file that onnx.checker rejects (a node reads an undefined value)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["undefined_value"], ["y"])
    graph = helper.make_graph(
        [node], "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))  # onnx.save does not run the checker
    return path


# ---------------------------------------------------------------------------------------------
# commands


def test_passes_lists_the_registry(capsys):
    code, out, err = _run(capsys, "passes")
    assert code == 0 and err == ""
    for name in ("dce", "cse", "constant-fold", "fold-bn"):
        assert any(line.split()[0] == name for line in out.splitlines() if line.strip()), name
    assert "default pipeline" in out


def test_passes_is_a_compact_table_and_one_pass_shows_every_option(capsys):
    code, out, _ = _run(capsys, "passes")
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 220  # was 800+ with every option inline
    code, out, err = _run(capsys, "passes", "quantize")
    assert code == 0 and err == ""
    assert "module: ptool.passes.quant.quantize.Quantize" in out
    for option in ("mode", "granularity", "group_size", "activations", "keep_float"):
        assert any(line.split() and line.split()[0] == option for line in out.splitlines()), option
    code, _, err = _run(capsys, "passes", "quantise")
    assert code == 2 and "did you mean 'quantize'" in _assert_one_line_error(err)


def test_passes_json(capsys):
    code, out, _ = _run(capsys, "passes", "--json")
    assert code == 0
    assert {"dce", "cse", "constant-fold", "fold-bn"} <= {row["name"] for row in json.loads(out)}


def test_real_executable_help_and_passes():
    exe = Path(sys.executable).with_name("ptool")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ptool.cli"]
    help_run = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0, help_run.stderr
    for command in ("passes", "inspect", "convert", "bench", "demo"):
        assert command in help_run.stdout
    passes_run = subprocess.run([*cmd, "passes"], capture_output=True, text=True, timeout=120)
    assert passes_run.returncode == 0, passes_run.stderr
    assert "fold-bn" in passes_run.stdout and passes_run.stderr == ""


def test_parser_stays_light():
    """Building the parser (what `ptool --help` does) must not import torch."""
    code = "import sys, ptool.cli; ptool.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_inspect_reports_batchnorm(capsys, fixture_module):
    code, out, err = _run(capsys, "inspect", _spec(fixture_module, "conv_bn"))
    assert code == 0, err
    rows = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[-1] for line in out.splitlines() if line.strip()}
    assert rows["BatchNorm"] == "1"
    assert rows["attention (sdpa)"] == "0"
    assert "torch.export" in out and "FLOPs" in out
    assert "aten.conv2d" in out


def test_inspect_json_figures(capsys, fixture_module):
    code, out, _ = _run(capsys, "inspect", _spec(fixture_module, "conv_bn"), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["sites"]["BatchNorm"] == 1
    # conv: 2 * (2*8*8*8 outputs) * (3*3*3) + linear: 2 * (2*4) * 8
    assert data["flops"] == 2 * 2 * 8 * 8 * 8 * 27 + 2 * 2 * 4 * 8
    assert data["parameters"] == sum(p.numel() for p in _fixture_model(fixture_module).state_dict().values()
                                     if p.is_floating_point())


def _fixture_model(module: str):
    import importlib

    return importlib.import_module(module).conv_bn()[0]


def test_convert_writes_checked_onnx_and_prints_report(capsys, tmp_path, fixture_module):
    import onnx

    out_file = tmp_path / "nested" / "model.onnx"
    code, out, err = _run(capsys, "convert", _spec(fixture_module, "conv_bn"), "-p", "fold-bn", "-o", str(out_file),
                          "--verify")
    assert code == 0, err
    onnx.checker.check_model(str(out_file))
    assert "fold-bn" in out and "ptool report" in out
    assert "verify: onnxruntime" in out and "cosine 1.0000" in out
    proto = onnx.load(str(out_file))
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded
    assert sorted(p.name for p in out_file.parent.iterdir()) == ["model.onnx"]  # no staging left over


def test_convert_default_pipeline_and_kwargs_model(capsys, tmp_path, fixture_module):
    out_file = tmp_path / "kw.onnx"
    code, out, err = _run(capsys, "convert", _spec(fixture_module, "conv_bn_kwargs"), "-o", str(out_file))
    assert code == 0, err
    assert out_file.is_file()
    for name in ("dce", "cse", "constant-fold", "fold-bn"):
        assert name in out


def test_convert_runs_the_exact_passes_to_a_fixpoint_unless_told_not_to(capsys, tmp_path, fixture_module):
    import onnx

    def convs(*extra):
        out_file = tmp_path / f"m{len(extra)}.onnx"
        code, out, err = _run(capsys, "convert", _spec(fixture_module, "two_branches"), "-p", "merge-branches,fold-bn",
                              "-o", str(out_file), "--verify", *extra)
        assert code == 0, err
        return sum(n.op_type == "Conv" for n in onnx.load(str(out_file)).graph.node), out

    count, out = convs()
    assert count == 1 and "merge-branches (round 2)" in out
    count, out = convs("--no-fixpoint")
    assert count == 2 and "round 2" not in out


def test_convert_onnx_input_roundtrip(capsys, tmp_path, fixture_module):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert _run(capsys, "convert", _spec(fixture_module, "conv_bn"), "-o", str(first))[0] == 0
    code, out, err = _run(capsys, "convert", str(first), "-o", str(second), "--verify")
    assert code == 0, err
    assert second.is_file() and "verify: onnxruntime" in out


@pytest.mark.tvm
def test_convert_verify_with_tvm(capsys, tmp_path, fixture_module):
    out_file = tmp_path / "tvm.onnx"
    code, out, err = _run(capsys, "convert", _spec(fixture_module, "conv_bn"), "-o", str(out_file), "--verify",
                          "--backend", "tvm")
    assert code == 0, err
    assert "verify: tvm" in out and out_file.is_file()


def test_bench_table(capsys, tmp_path, fixture_module):
    report = tmp_path / "bench.json"
    code, out, err = _run(capsys, "bench", _spec(fixture_module, "conv_bn"), "--backend", "torch,onnxruntime",
                          "--repeat", "3", "--warmup", "1", "--json", str(report))
    assert code == 0, err
    for label in ("torch eager (original)", "torch (transformed graph)", "onnxruntime", "speedup vs eager",
                  "cosine"):
        assert label in out
    rows = json.loads(report.read_text())["rows"]
    assert [r["name"] for r in rows] == ["torch eager (original)", "torch (transformed graph)", "onnxruntime"]
    assert rows[0]["speedup_vs_baseline"] == 1.0
    assert all(r["runs"] == 3 and r["cosine"] > 0.9999 for r in rows)


@pytest.mark.skipif(_HAS_CUDA, reason="a machine with CUDA runs test_bench_table_on_the_gpu instead")
def test_bench_device_cuda_without_cuda_is_refused_in_one_line(capsys, fixture_module):
    """--device cuda on a machine without CUDA: one line naming what it allows, before any model work."""
    code, out, err = _run(capsys, "bench", _spec(fixture_module, "conv_bn"), "--device", "cuda")
    assert code == 2 and not out
    assert "device 'cuda' is not available" in _assert_one_line_error(err) and "allowed here: cpu" in err


@pytest.mark.gpu
def test_bench_table_on_the_gpu(capsys, fixture_module):
    code, out, err = _run(capsys, "bench", _spec(fixture_module, "conv_bn"), "--backend", "torch,onnxruntime",
                          "--device", "cuda", "--repeat", "3", "--warmup", "1")
    assert code == 0, err
    assert "device: cuda" in out and "onnxruntime" in out and "torch (transformed graph)" in out


# ---------------------------------------------------------------------------------------------
# the error contract


def _assert_one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ptool: error: "), err
    assert "Traceback" not in err
    return lines[0]


BAD_INPUTS = [
    # (id, argv builder(tmp_path, module) -> argv without -o, expected code, message fragment)
    ("missing-file", lambda t, m: ["convert", str(t / "nothere.onnx")], 2, "does not exist"),
    ("folder-without-config", lambda t, m: ["convert", str(_mkdir(t / "emptydir"))], 2, "config.json"),
    ("onnx-fails-checker", lambda t, m: ["convert", str(_bad_onnx(t / "bad.onnx"))], 2, "checker"),
    ("unknown-pass", lambda t, m: ["convert", _spec(m, "conv_bn"), "-p", "fold-bm"], 2, "did you mean 'fold-bn'"),
    ("unknown-pass-option", lambda t, m: ["convert", _spec(m, "conv_bn"), "-p", "fold-bn:bogus=1"], 2, "bogus"),
    ("bad-pass-value", lambda t, m: ["convert", _spec(m, "conv_bn"), "-p", "fold-bn:fold_into_next=maybe"], 2,
     "fold_into_next"),
    ("bad-flag", lambda t, m: ["convert", _spec(m, "conv_bn"), "--bogus"], 2, "--bogus"),
    ("untraceable-model", lambda t, m: ["convert", _spec(m, "untraceable")], 1, "cannot trace"),
    ("wrong-input-shape", lambda t, m: ["convert", _spec(m, "wrong_shape")], 2, "example inputs"),
    ("function-raises", lambda t, m: ["convert", _spec(m, "raises")], 2, "boom"),
    ("function-returns-model-only", lambda t, m: ["convert", _spec(m, "not_a_tuple")], 2, "must return"),
    ("no-such-module", lambda t, m: ["convert", "no_such_module_xyz:build"], 2, "no_such_module_xyz"),
    ("no-such-function", lambda t, m: ["convert", _spec(m, "conv_bm")], 2, "did you mean 'conv_bn'"),
]


def test_output_under_a_file_is_refused_before_any_work(capsys, tmp_path, fixture_module):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    code, _, err = _run(capsys, "convert", "no_such_module_xyz:build", "-o", str(blocker / "sub" / "model.onnx"))
    line = _assert_one_line_error(err)
    assert code == 2 and "is not a writable folder" in line  # before the model (which would fail to load)


def _mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


@pytest.mark.parametrize("build_argv,expected,fragment", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_one_line_exit_code_no_output(capsys, tmp_path, fixture_module, build_argv, expected, fragment):
    out_dir = tmp_path / "out"  # does not exist: a failed conversion must not create it either
    out_file = out_dir / "model.onnx"
    code, _, err = _run(capsys, *build_argv(tmp_path, fixture_module), "-o", str(out_file))
    line = _assert_one_line_error(err)
    assert code == expected, line
    assert fragment in line
    assert not out_file.exists() and not out_dir.exists()


def test_convert_dynamic_dims(capsys, tmp_path, fixture_module):
    import numpy as np
    import onnx
    import onnxruntime as ort

    out_file = tmp_path / "dyn.onnx"
    code, out, err = _run(capsys, "convert", _spec(fixture_module, "conv_bn"), "--dynamic", "batch,x:2=height",
                          "-o", str(out_file), "--verify")
    assert code == 0, err
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out_file)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", 8]
    session = ort.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((5, 3, 12, 8), np.float32)})[0].shape == (5, 4)
    code, _, err = _run(capsys, "convert", _spec(fixture_module, "conv_bn"), "--dynamic", "bacth", "-o",
                        str(tmp_path / "bad.onnx"))
    assert code == 2 and "--dynamic item 'bacth' is not batch, seq, or NAME:AXIS[=DIM]" in err
    code, _, err = _run(capsys, "convert", _spec(fixture_module, "conv_bn"), "--dynamic", "y:0", "-o",
                        str(tmp_path / "bad.onnx"))
    assert code == 2 and "input 'y', which the model does not take" in err


def test_a_lossy_pass_past_its_bound_writes_nothing_unless_accepted(capsys, tmp_path, fixture_module):
    out_file = tmp_path / "lossy.onnx"
    argv = ["convert", _spec(fixture_module, "outlier_mlp"), "-p", "quantize:mode=int4-weight,group_size=64",
            "-o", str(out_file)]
    code, out, err = _run(capsys, *argv)
    line = _assert_one_line_error(err)
    assert code == 1 and not out_file.exists()
    assert "approximate pass 'quantize:mode=int4-weight,group_size=64' missed its declared bound" in line
    assert "--accept-lossy writes it anyway" in line
    code, out, err = _run(capsys, *argv, "--accept-lossy")
    assert code == 0 and out_file.is_file()
    assert "ptool: warning: approximate pass 'quantize:mode=int4-weight,group_size=64' missed its declared bound" in err


def test_quantized_model_verified_by_the_passes_bound(capsys, tmp_path, fixture_module):
    out_file = tmp_path / "q.onnx"
    code, out, err = _run(capsys, "convert", _spec(fixture_module, "conv_bn"), "-p", "fold-bn", "-p", "quantize",
                          "-o", str(out_file), "--verify")
    assert code == 0, err
    assert "judged by the approximate passes' own bounds vs the original model (quantize: approx(cosine bound" in out


def test_failed_conversion_keeps_existing_output(capsys, tmp_path, fixture_module):
    out_file = tmp_path / "model.onnx"
    out_file.write_bytes(b"previous")
    code, _, err = _run(capsys, "convert", _spec(fixture_module, "untraceable"), "-o", str(out_file))
    assert code == 1
    _assert_one_line_error(err)
    assert out_file.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("argv,fragment", [
    (["convert", "x:y", "-o", "model.txt"], "must end in .onnx"),
    (["bench", "x:y", "--backend", "onnxrt"], "did you mean 'onnxruntime'"),
    (["bench", "x:y", "--repeat", "0"], "--repeat"),
    (["bench", "x:y", "--device", "gpu"], "did you mean 'cuda'"),
    (["bench", "--generate", "--device", "cuda:0"], "--device" if _HAS_CUDA else "is not available"),
    (["inspect", "--top", "many"], "invalid int value"),
    (["convert"], "-o/--output"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors(capsys, argv, fragment):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert fragment in _assert_one_line_error(err)


def test_unexpected_error_is_one_line_with_debug_hint(capsys, monkeypatch):
    import ptool.cli.passes as passes_cmd

    def boom(args, ui):
        raise RuntimeError("internal\nfailure")

    monkeypatch.setattr(passes_cmd, "run", boom)
    code, _, err = _run(capsys, "passes")
    line = _assert_one_line_error(err)
    assert code == 1 and "RuntimeError" in line and "--debug" in line
    with pytest.raises(RuntimeError):
        main(["--debug", "passes"])


# ---------------------------------------------------------------------------------------------
# the real default model


@pytest.mark.slow
def test_convert_default_model(capsys, tmp_path):
    import onnx

    out_file = tmp_path / "minilm.onnx"
    code, out, err = _run(capsys, "convert", "-o", str(out_file))
    assert code == 0, err
    onnx.checker.check_model(str(out_file))
    assert "all-MiniLM-L6-v2" in out and "fold-bn" in out
    assert "whole model vs original" in out
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("command", ["convert", "inspect", "bench"])
def test_pickled_weights_are_refused_unless_opted_in(capsys, tmp_path, command):
    import torch

    weights = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.ones(2, 2)}, weights)
    extra = ["-o", str(tmp_path / "out.onnx")] if command == "convert" else []
    code, _, err = _run(capsys, command, str(weights), *extra)
    assert code == 2 and "pickle file" in err and "--allow-pickle" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, command, str(weights), "--allow-pickle", *extra)
    assert code == 2 and "holds a state dict" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("size, text", [(0, "0 B"), (900, "900 B"), (33_000, "32.2 KiB"), (90_500_000, "86.3 MiB"),
                                        (3 * 2**30, "3.0 GiB")])
def test_sizes_read_in_the_unit_that_fits(size, text):
    from ptool.cli._ui import format_bytes

    assert format_bytes(size) == text
