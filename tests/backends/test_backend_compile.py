"""compile_module with the torch and onnxruntime backends; option parsing and input checks."""

from __future__ import annotations

import pytest
import torch

import ptool.backends as backends
from ptool.backends import BACKENDS, compile_module
from ptool.errors import InputError, UsageError
from ptool.verify import compare

MAX_REL_ERROR = 1e-4
CASES = ["cnn", "bert", "structured", "cnn_exported", "bert_exported"]


def _assert_same_structure(ref, out) -> None:
    import torch.utils._pytree as pytree

    assert type(out) is type(ref)
    assert pytree.tree_structure(out) == pytree.tree_structure(ref)
    for r, o in zip(pytree.tree_leaves(ref), pytree.tree_leaves(out)):
        assert type(o) is type(r)
        if isinstance(r, torch.Tensor):
            assert o.dtype == r.dtype and o.shape == r.shape


@pytest.fixture(scope="module")
def ort_models(request):
    """One onnxruntime compile per case, shared by the tests of this module."""
    cache = {}

    def get(name):
        if name not in cache:
            case = request.getfixturevalue(name)
            cache[name] = compile_module(case.model, "onnxruntime", case.args, case.kwargs)
        return cache[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_onnxruntime_matches_torch(name, request, ort_models):
    case = request.getfixturevalue(name)
    run = ort_models(name)
    ref = case.reference()
    out = run(*case.args, **case.kwargs)
    _assert_same_structure(ref, out)
    assert compare(ref, out).max_rel_error <= MAX_REL_ERROR
    assert run.verify().max_rel_error <= MAX_REL_ERROR
    assert run.backend == "onnxruntime" and run.onnx_path.is_file()
    assert run.options["graph_optimization_level"] == "all" and run.options["allow_spinning"] is False


@pytest.mark.parametrize("name", CASES)
def test_torch_backend_matches_torch(name, request):
    case = request.getfixturevalue(name)
    run = compile_module(case.model, "torch", case.args, case.kwargs)
    ref = case.reference()
    out = run(*case.args, **case.kwargs)
    _assert_same_structure(ref, out)
    assert compare(ref, out).max_abs_error == 0
    assert run.backend == "torch" and run.onnx_path is None and run.options == {
        "compile": False,
        "mode": "default",
        "dynamic": None,
        "freezing": False,
        "aot": False,
    }


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_either_call_spelling(backend, bert, bert_exported, ort_models):
    """Positional or keyword: both reach the model, even an exported module that accepts only
    the spelling it was exported with."""
    ids, mask = bert.args[0], bert.kwargs["attention_mask"]
    run = (
        ort_models("bert_exported")
        if backend == "onnxruntime"
        else compile_module(bert_exported.model, backend, bert.args, bert.kwargs)
    )
    ref = bert.reference()
    for out in (run(ids, mask), run(ids, attention_mask=mask), run(input_ids=ids, attention_mask=mask)):
        assert compare(ref, out).max_rel_error <= MAX_REL_ERROR


def test_onnxruntime_new_values_same_shapes(bert, ort_models):
    run = ort_models("bert")
    torch.manual_seed(1)
    ids = torch.randint(0, 128, bert.args[0].shape)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    assert run.verify(ids, attention_mask=mask).max_rel_error <= MAX_REL_ERROR
    # int32 ids are accepted like eager torch accepts them
    out = run(ids.to(torch.int32), attention_mask=mask)
    assert compare(run(ids, attention_mask=mask), out).max_abs_error == 0


def test_onnxruntime_input_errors(bert, cnn, ort_models):
    run = ort_models("bert")
    ids, mask = bert.args[0], bert.kwargs["attention_mask"]
    with pytest.raises(InputError, match=r"input 'input_ids' has shape \[2, 5\], the compiled model expects \[2, 12\]"):
        run(ids[:, :5], attention_mask=mask[:, :5])
    with pytest.raises(InputError, match="different structure"):
        run(ids)  # no mask: not the example call's structure
    with pytest.raises(InputError, match="different structure"):
        run(ids, mask, token_type_ids=torch.zeros_like(ids))
    cnn_run = ort_models("cnn")
    with pytest.raises(InputError, match="inputs do not fit forward"):
        cnn_run(cnn.args[0], bogus=1)
    with pytest.raises(InputError, match="dtype float64, the compiled model expects float32"):
        cnn_run(cnn.args[0].double())


def test_specialized_constant_is_checked(structured, ort_models):
    run = ort_models("structured")
    x, pair = structured.args
    with pytest.raises(InputError, match="input 'scale' is 3.0 but the compiled model specialized it to 2.0"):
        run(x, pair, scale=3.0)


def test_onnxruntime_dynamic_batch(cnn):
    batch = torch.export.Dim("batch", min=1, max=32)
    run = compile_module(cnn.model, "onnxruntime", cnn.args, dynamic_shapes=({0: batch},))
    assert run.verify(torch.randn(7, 3, 16, 16)).max_rel_error <= MAX_REL_ERROR


def test_onnxruntime_dynamic_sequence(bert):
    seq = torch.export.Dim("seq", min=2, max=64)
    shapes = {"input_ids": {1: seq}, "attention_mask": {1: seq}}
    run = compile_module(bert.model, "onnxruntime", bert.args, bert.kwargs, dynamic_shapes=shapes)
    ids = torch.randint(0, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    assert run.verify(ids, attention_mask=mask).max_rel_error <= MAX_REL_ERROR


def test_exported_program_is_accepted(cnn):
    ep = torch.export.export(cnn.model, cnn.args)
    run = compile_module(ep, "onnxruntime", cnn.args)
    assert compare(cnn.reference(), run(*cnn.args)).max_rel_error <= MAX_REL_ERROR


def test_onnxruntime_options(cnn, tmp_path):
    path = tmp_path / "kept" / "cnn.onnx"
    run = compile_module(
        cnn.model,
        "onnxruntime",
        cnn.args,
        onnx_path=str(path),
        intra_op_threads="1",  # CLI strings are parsed into the field type
        inter_op_threads=2,
        graph_optimization_level="disable",
        allow_spinning=True,
    )
    assert run.onnx_path == path and path.is_file()
    assert run.options["intra_op_threads"] == 1 and run.options["graph_optimization_level"] == "disable"
    assert run.verify().max_rel_error <= MAX_REL_ERROR


def test_spinning_is_off_by_default():
    from ptool.backends.onnxruntime_backend import Options, _session_options

    so = _session_options(Options())
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    so = _session_options(Options(allow_spinning=True))
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_temp_onnx_is_removed_with_the_model(cnn):
    import gc

    run = compile_module(cnn.model, "onnxruntime", cnn.args)
    folder = run.onnx_path.parent
    assert folder.is_dir()
    del run
    gc.collect()
    assert not folder.exists()


def test_unknown_backend_and_device(cnn):
    with pytest.raises(UsageError, match=r"unknown backend 'onnxrt' \(allowed: torch, onnxruntime, tvm\)"):
        compile_module(cnn.model, "onnxrt", cnn.args)
    with pytest.raises(UsageError, match="did you mean 'onnxruntime'"):
        compile_module(cnn.model, "onnxruntim", cnn.args)
    with pytest.raises(UsageError, match=r"unknown device 'gpu' \(allowed: cpu, cuda, cuda:N\)"):
        compile_module(cnn.model, "torch", cnn.args, device="gpu")
    assert BACKENDS == ("torch", "onnxruntime", "tvm")


@pytest.mark.parametrize(
    ("backend", "options", "message"),
    [
        ("onnxruntime", {"threads": 2}, r"backend 'onnxruntime' has no option 'threads' \(allowed: intra_op_threads,"),
        ("onnxruntime", {"intra_op_thread": 2}, r"did you mean 'intra_op_threads'"),
        ("onnxruntime", {"graph_optimization_level": "max"}, r"allowed: disable \| basic \| extended \| all"),
        ("onnxruntime", {"intra_op_threads": "two"}, r"'two' is not"),
        ("onnxruntime", {"intra_op_threads": 1.5}, r"option 'intra_op_threads'"),
        ("onnxruntime", {"intra_op_threads": -1}, r"must be >= 0"),
        ("onnxruntime", {"allow_spinning": "maybe"}, r"not a boolean"),
        ("torch", {"compile": 1}, r"expected true or false"),
        ("torch", {"fullgraph": True}, r"has no option 'fullgraph' \(allowed: compile, mode, dynamic, freezing, aot\)"),
        ("tvm", {"frontend": "relay"}, r"allowed: auto \| exported_program \| onnx"),
        ("tvm", {"num_cores": 0}, r"must be >= 1"),
    ],
)
def test_bad_options(backend, options, message, cnn):
    with pytest.raises(UsageError, match=message) as err:
        compile_module(cnn.model, backend, cnn.args, **options)
    assert "\n" not in str(err.value)


def test_bad_example_inputs(cnn):
    with pytest.raises(InputError, match="example_inputs must be a tuple"):
        compile_module(cnn.model, "torch", {"x": cnn.args[0]})
    with pytest.raises(InputError, match="the model fails on the example inputs"):
        compile_module(cnn.model, "torch", (torch.randn(2, 4),))


def test_backend_options_defaults():
    opts = backends.backend_options("onnxruntime")
    assert opts.graph_optimization_level == "all" and opts.allow_spinning is False
    assert backends.backend_options("tvm", {"frontend": "onnx"}).frontend == "onnx"


def test_import_is_light():
    """Importing the package must not pull in onnxruntime, onnx or tvm (ptool itself may use torch)."""
    import subprocess
    import sys

    code = (
        "import sys, ptool.backends; "
        "print(sorted(m for m in ('onnxruntime', 'tvm', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_torch_compile(cnn):
    run = compile_module(cnn.model, "torch", cnn.args, compile=True)
    assert run.verify().max_rel_error <= MAX_REL_ERROR


def test_dynamic_compile_of_a_graph_traced_at_fixed_shapes_is_one_clear_error():
    import ptool

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()).eval()
    x = torch.randn(3, 8)
    fixed = ptool.transform(model, ["dce"], (x,))
    with pytest.raises(UsageError, match=r"dynamic=true needs a model traced with dynamic shapes.*dynamic_shapes="):
        ptool.compile(fixed, backend="torch", compile=True, dynamic=True)
    batch = torch.export.Dim("batch", min=1, max=64)
    free = ptool.transform(model, ["dce"], (x,), dynamic_shapes=({0: batch},))
    run = ptool.compile(free, backend="torch", compile=True, dynamic=True)
    y = torch.randn(7, 8)
    with torch.no_grad():
        assert compare(model(y), run(y)).max_abs_error < 1e-6


def test_freezing_without_compile_is_one_clear_error():
    from ptool.backends import backend_options

    with pytest.raises(UsageError, match="add compile=true"):
        backend_options("torch", {"freezing": True})
    with pytest.raises(UsageError, match="add compile=true"):
        backend_options("torch", {"aot": True})
    opts = backend_options("torch", {"compile": True, "freezing": True, "mode": "max-autotune"})
    from ptool.backends.torch_backend import compile_options, inductor_configs

    assert compile_options(opts, cpu=False) == {
        "options": {"freezing": True, "max_autotune": True, "triton.cudagraphs": True}, "dynamic": None}
    # AOTInductor: no CUDA graphs; a frozen CPU graph stores reused pointwise values
    assert inductor_configs(opts, cpu=False) == {"freezing": True, "max_autotune": True}
    assert inductor_configs(opts) == {"freezing": True, "max_autotune": True, "realize_opcount_threshold": 16}
    assert inductor_configs(backend_options("torch", {"compile": True, "aot": True})) == {"freezing": False}


def _gelu_sources() -> list[str]:
    """The code Inductor writes for a frozen compile of a per-token int8 ``Linear -> GELU -> Linear``."""
    from torch._inductor.utils import run_and_get_code

    import ptool

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()
    args = (torch.randn(5, 64),)
    m2 = ptool.transform(model, ["quantize:activations=per-token"], args)
    _, sources = run_and_get_code(
        lambda: ptool.compile(m2, backend="torch", example_inputs=args, compile=True, freezing=True))
    return sources


@pytest.mark.slow
def test_a_frozen_cpu_graph_computes_gelu_once_before_quantizing_it(monkeypatch):
    from ptool.backends import torch_backend

    # GELU's output is read twice, by the per-row maximum and by the levels: ptool's configs store it
    erf_calls = sum(code.count("erf(") for code in _gelu_sources())
    assert erf_calls == 1
    # Inductor's own default inlines it into both readers (what the config is for)
    monkeypatch.setattr(torch_backend, "CPU_REALIZE_OPCOUNT", 30)
    erf_default = sum(code.count("erf(") for code in _gelu_sources())
    assert erf_default == 2
