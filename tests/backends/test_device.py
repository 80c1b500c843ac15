"""``device="cuda"``: parsing, the one-line refusal without a GPU, the GPU fingerprint and what it
says runs fast, ONNX Runtime's provider choice and IO binding, TVM's CUDA pipeline; and, on a
machine with a GPU (``gpu`` marker), every backend on CUDA against the CPU."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import ptool
from ptool.backends import DEVICES, compile_module
from ptool.backends.device import CPU, Device, check_available, parse_device
from ptool.errors import BackendError, UsageError
from ptool.tune.fingerprint import FEATURES, DeviceFingerprint, device_fingerprint

HAS_CUDA = torch.cuda.is_available()
no_cuda_only = pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: the refusal cannot be shown")


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def small_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4)).eval()
    return model, torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------
# Parsing and availability


@pytest.mark.parametrize(("text", "device", "spelled"), [
    ("cpu", Device("cpu"), "cpu"),
    ("cuda", Device("cuda", 0), "cuda"),
    ("cuda:0", Device("cuda", 0), "cuda"),
    ("cuda:1", Device("cuda", 1), "cuda:1"),
    ("cuda:12", Device("cuda", 12), "cuda:12"),
    (" cuda:3 ", Device("cuda", 3), "cuda:3"),
])
def test_every_spelling_parses(text, device, spelled):
    parsed = parse_device(text)
    assert parsed == device and str(parsed) == spelled
    assert parse_device(str(parsed)) == parsed  # str() spells it back
    assert parsed.torch == (torch.device("cpu") if device.kind == "cpu" else torch.device("cuda", device.index))


def test_torch_devices_and_parsed_devices_pass_through():
    assert parse_device(torch.device("cuda", 2)) == Device("cuda", 2)
    assert parse_device(torch.device("cpu")) is CPU
    assert parse_device(CPU) is CPU
    assert DEVICES == ("cpu", "cuda")


@pytest.mark.parametrize(("text", "hint"), [
    ("gpu", "did you mean 'cuda'"), ("cuda:x", "did you mean 'cuda'"), ("tpu", ""), ("CUDA", ""),
    ("cuda:", ""), ("cuda:-1", ""), ("cpu:1", ""), ("", ""), ("cuda:0:1", ""),
])
def test_bad_spellings_name_the_allowed_ones(text, hint):
    with pytest.raises(UsageError) as e:
        parse_device(text)
    msg = one_line(e)
    assert f"unknown device '{text.strip()}' (allowed: cpu, cuda, cuda:N)" in msg and hint in msg


def test_device_is_frozen_and_checked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CPU.index = 1  # type: ignore[misc]
    with pytest.raises(UsageError):
        Device("tpu")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Device("cpu", 1)


def test_cpu_is_always_available():
    check_available(CPU)


@no_cuda_only
def test_missing_cuda_is_one_clear_line():
    with pytest.raises(UsageError) as e:
        check_available(parse_device("cuda"))
    msg = one_line(e)
    assert msg.startswith("device 'cuda' is not available: torch ") and "torch.cuda.is_available() is False" in msg
    assert msg.endswith("allowed here: cpu")


def test_an_index_past_the_gpus_says_how_many_there_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_available(parse_device("cuda:1"))
    with pytest.raises(UsageError) as e:
        check_available(parse_device("cuda:2"))
    assert one_line(e) == ("device 'cuda:2' is not available: this machine has 2 CUDA GPUs; "
                           "allowed here: cpu, cuda, cuda:0, cuda:1")


@no_cuda_only
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tvm"])
def test_compile_on_cuda_without_a_gpu_is_a_usage_error(backend):
    model, x = small_model()
    with pytest.raises(UsageError) as e:
        ptool.compile(model, backend=backend, example_inputs=(x,), device="cuda")
    msg = one_line(e)
    assert "device 'cuda' is not available" in msg and "cuda" in msg


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tvm"])
def test_compile_rejects_a_bad_device_spelling_before_any_work(backend):
    model, x = small_model()
    with pytest.raises(UsageError) as e:
        ptool.compile(model, backend=backend, example_inputs=(x,), device="gpu")
    assert "unknown device 'gpu'" in one_line(e)


def test_compile_on_cpu_is_unchanged():
    model, x = small_model()
    run = ptool.compile(model, backend="onnxruntime", example_inputs=(x,), device="cpu")
    assert run.info["device"] == "cpu" and run.verify().max_rel_error < 1e-5


def test_the_torch_backend_moves_a_copy_never_the_callers_model():
    from ptool.backends import _module_on, _tensors_to

    model, x = small_model()
    moved = _module_on(model, torch.device("meta"))
    assert moved is not model and next(moved.parameters()).is_meta
    assert next(model.parameters()).device.type == "cpu"
    assert _module_on(model, torch.device("cpu")) is model  # already there: no copy
    args, kwargs = _tensors_to(((x, 3), {"m": x}), torch.device("meta"))
    assert args[0].is_meta and args[1] == 3 and kwargs["m"].is_meta


# --------------------------------------------------------------------------------------------
# The fingerprint


def cpu_fingerprint(*isa: str) -> DeviceFingerprint:
    return DeviceFingerprint("cpu", "Some CPU", tuple(isa), 8, None, "x86_64", {"torch": "2.x"})


def gpu_fingerprint(capability: tuple[int, int], name: str = "NVIDIA Test GPU") -> DeviceFingerprint:
    return DeviceFingerprint("cuda", "Some CPU", ("avx2",), 8, f"{name} ({capability[0]}.{capability[1]})", "x86_64",
                             {"torch": "2.x"}, gpu_name=name, gpu_capability=capability, gpu_memory_gib=79.1,
                             cuda_version="12.4", gpu_driver="550.54.15")


def test_cpu_without_the_flags_leaves_reduced_precision_out_with_the_reason():
    fp = cpu_fingerprint("avx2", "fma", "avx512f")
    assert fp.supports("bf16") == (False, "this CPU has neither avx512_bf16 nor amx_bf16")
    assert fp.supports("fp16") == (False, "this CPU has neither avx512_fp16 nor amx_fp16")
    assert fp.supports("int8") == (False, "this CPU has none of avx512_vnni, avx_vnni, amx_int8")
    assert fp.fast_dtypes == ()


@pytest.mark.parametrize(("flags", "fast"), [
    (("avx512_bf16",), ("bf16",)),
    (("amx_tile", "amx_bf16", "amx_int8"), ("bf16", "int8")),
    (("avx512_fp16",), ("fp16",)),
    (("amx_fp16",), ("fp16",)),
    (("avx_vnni",), ("int8",)),
    (("avx512_vnni", "avx512_bf16", "avx512_fp16"), ("bf16", "fp16", "int8")),
])
def test_cpu_flags_decide_the_fast_formats(flags, fast):
    fp = cpu_fingerprint("avx2", *flags)
    assert fp.fast_dtypes == fast
    ok, reason = fp.supports(fast[0])
    assert ok and reason.startswith("this CPU has ")


@pytest.mark.parametrize(("capability", "fast"), [
    ((6, 1), ()),
    ((7, 0), ("fp16",)),
    ((7, 5), ("fp16", "int8")),
    ((8, 0), ("bf16", "fp16", "int8")),
    ((9, 0), ("bf16", "fp16", "int8")),
])
def test_gpu_compute_capability_decides_the_fast_formats(capability, fast):
    assert gpu_fingerprint(capability).fast_dtypes == fast


def test_gpu_reasons_name_the_gpu_and_the_capability():
    assert gpu_fingerprint((8, 0), "NVIDIA A100").supports("bf16") == (
        True, "NVIDIA A100 has compute capability 8.0 (>= 8.0)")
    assert gpu_fingerprint((7, 0), "Tesla V100").supports("bf16") == (
        False, "Tesla V100 has compute capability 7.0; bf16 tensor cores need >= 8.0")
    no_gpu = dataclasses.replace(gpu_fingerprint((8, 0)), gpu_capability=None)
    assert no_gpu.supports("fp16") == (False, "no GPU compute capability recorded for this device")


def test_a_cpu_fingerprint_on_a_gpu_machine_still_answers_for_the_cpu():
    fp = dataclasses.replace(gpu_fingerprint((9, 0)), device="cpu", isa=("avx2",))
    assert fp.fast_dtypes == ()


def test_unknown_feature_is_a_usage_error():
    with pytest.raises(UsageError, match=r"unknown feature 'bf61' \(allowed: bf16, fp16, int8\)"):
        cpu_fingerprint().supports("bf61")  # type: ignore[arg-type]
    assert FEATURES == ("bf16", "fp16", "int8")


def test_gpu_fields_round_trip_and_change_the_key():
    fp = gpu_fingerprint((8, 6))
    again = DeviceFingerprint.from_dict(fp.to_dict())
    assert again == fp and again.key == fp.key and again.gpu_capability == (8, 6)
    assert dataclasses.replace(fp, gpu_driver="535.0").key != fp.key
    assert "79.1 GiB" in str(fp) and "CUDA 12.4" in str(fp) and "550.54.15" in str(fp)


def test_records_older_than_the_gpu_fields_still_load():
    old = {"device": "cpu", "cpu_model": "AMD EPYC", "isa": ["avx2", "avx512_bf16"], "cores": 2, "gpu": None,
           "machine": "x86_64", "versions": {"torch": "2.5.0"}}
    fp = DeviceFingerprint.from_dict(old)
    assert (fp.gpu_name, fp.gpu_capability, fp.gpu_memory_gib, fp.cuda_version, fp.gpu_driver) == (None,) * 5
    assert fp.supports("bf16")[0] and len(fp.key) == 12


def test_this_machines_fingerprint_and_the_cuda_refusal():
    fp = device_fingerprint("cpu")
    assert fp.device == "cpu" and DeviceFingerprint.from_dict(fp.to_dict()) == fp
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        device_fingerprint("gpu")
    if not HAS_CUDA:
        with pytest.raises(UsageError, match="device 'cuda' is not available"):
            device_fingerprint("cuda")


@pytest.mark.gpu
def test_the_cuda_fingerprint_records_the_gpu():
    fp = device_fingerprint("cuda")
    assert fp.device == "cuda" and fp.gpu_name == torch.cuda.get_device_name(0)
    assert fp.gpu_capability == torch.cuda.get_device_capability(0) and fp.gpu_memory_gib > 0
    assert fp.cuda_version == torch.version.cuda


# --------------------------------------------------------------------------------------------
# ONNX Runtime: provider choice and IO binding


def test_ort_without_a_cuda_provider_is_one_line_naming_onnxruntime_gpu(monkeypatch):
    import onnxruntime as ort

    from ptool.backends.onnxruntime_backend import session_providers

    with pytest.raises(BackendError) as e:
        session_providers("cpu", Device("cuda"), ["CPUExecutionProvider"])
    msg = one_line(e)
    assert "needs ONNX Runtime's CUDA execution provider" in msg and "pip install onnxruntime-gpu" in msg
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendError, match=r"\(available: cpu\); pip install onnxruntime-gpu"):
        session_providers("cuda", Device("cuda", 1))


def test_ort_provider_choice_on_cuda(monkeypatch):
    import onnxruntime as ort

    from ptool.backends.onnxruntime_backend import session_providers

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    cuda1 = Device("cuda", 1)
    expected = [("CUDAExecutionProvider", {"device_id": 1}), ("CPUExecutionProvider", {})]
    assert session_providers("cpu", cuda1) == expected  # the default provider means the device's own
    assert session_providers("cuda", cuda1) == expected
    assert session_providers("tensorrt", cuda1) == [("TensorrtExecutionProvider", {"device_id": 1}), *expected]
    with pytest.raises(UsageError, match="provider 'openvino' runs on the CPU; on device 'cuda:1' use provider cuda"):
        session_providers("openvino", cuda1)
    no_trt = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(BackendError, match="'tensorrt' is not in this onnxruntime build"):
        session_providers("tensorrt", cuda1, no_trt)


def test_ort_provider_choice_on_the_cpu_is_as_before():
    from ptool.backends.onnxruntime_backend import session_providers

    assert session_providers("cpu", CPU, ["CPUExecutionProvider"]) == [("CPUExecutionProvider", {})]
    assert session_providers("cuda", CPU, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})]
    with pytest.raises(BackendError, match=r"provider 'cuda' is not in this onnxruntime build \(available: cpu\)"):
        session_providers("cuda", CPU, ["CPUExecutionProvider"])


def test_ort_io_binding_runner_matches_the_session_on_the_cpu():
    """The CUDA run path (IO binding, outputs through DLPack), exercised on the CPU device."""
    import onnxruntime as ort

    from ptool.backends import onnxruntime_backend as ob
    from ptool.backends._common import ExampleCall

    model, x = small_model()
    run = compile_module(model, "onnxruntime", (x,))
    session = ort.InferenceSession(str(run.onnx_path), providers=["CPUExecutionProvider"])
    example = ExampleCall.run(model, (x,), None)
    bound = ob._bound_runner(session, ob._feeds(session, example), CPU, ort.RunOptions())
    first = bound([x])[0]
    y = torch.randn(3, 16)
    second = bound([y])[0]
    with torch.no_grad():
        assert torch.allclose(first, model(x), atol=1e-5) and torch.allclose(second, model(y), atol=1e-5)
    assert first.data_ptr() != second.data_ptr()  # each call's outputs are its own
    with pytest.raises(ptool.InputError, match="shape"):
        bound([torch.randn(2, 16)])


def test_ort_element_types():
    import numpy as np

    from ptool.backends.onnxruntime_backend import _element_type

    assert _element_type(torch.float32) is np.float32 and _element_type(torch.int64) is np.int64
    assert _element_type(torch.float16) is np.float16 and _element_type(torch.bool) is np.bool_
    assert _element_type(torch.bfloat16) == 16  # onnx.TensorProto.BFLOAT16


# --------------------------------------------------------------------------------------------
# TVM: the CUDA target and pipeline (built, not run, where there is no GPU)


@pytest.mark.tvm
def test_tvm_cuda_target_from_the_compute_capability():
    from ptool.backends import tvm_cuda
    from ptool.backends.tvm_host import host_target

    assert tvm_cuda.arch_of("8.0") == "sm_80" and tvm_cuda.arch_of("9.0") == "sm_90"
    target = tvm_cuda.cuda_target("sm_86", host=host_target(), max_shared_memory_per_block=101376)
    assert target.kind.name == "cuda" and tvm_cuda.is_cuda(target) and not tvm_cuda.is_cuda(host_target())
    assert str(target.attrs["arch"]) == "sm_86" and int(target.attrs["max_shared_memory_per_block"]) == 101376
    assert target.host.kind.name == "llvm"


@pytest.mark.tvm
def test_tvm_without_its_cuda_runtime_is_one_line():
    import tvm

    from ptool.backends import tvm_cuda

    if tvm.runtime.enabled("cuda"):
        pytest.skip("TVM's CUDA runtime is loaded here")
    with pytest.raises(BackendError) as e:
        tvm_cuda.check_cuda(Device("cuda"))
    assert "tvm.runtime.enabled('cuda') is False" in one_line(e)


@pytest.fixture(scope="module")
def relax_mod():
    pytest.importorskip("tvm")
    from ptool.backends import tvm_backend
    from ptool.backends._common import ExampleCall

    model, x = small_model()

    class WithSoftmax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.inner(x), dim=-1)

    example = ExampleCall.run(WithSoftmax().eval(), (x,), None)
    return tvm_backend._from_exported_program(example, tvm_backend.Options())


@pytest.mark.tvm
def test_tvm_cuda_pipeline_schedules_every_kernel_for_the_gpu(relax_mod):
    import tvm

    from ptool.backends import tvm_backend, tvm_cuda

    target = tvm_cuda.cuda_target("sm_80", host=tvm_backend.host_target())
    with target:
        lowered = tvm_backend._pipeline(target, tvm_backend.Options())(relax_mod)
    kernels = {gv.name_hint: f for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert any("matmul" in name for name in kernels) and len(kernels) >= 3
    for name, func in kernels.items():
        assert func.attrs.get("tirx.is_scheduled"), name
        assert "threadIdx" in func.script(), name  # bound to GPU threads by dlight


@pytest.mark.tvm
def test_tvm_cuda_tuning_finds_the_heavy_kernels_with_dlight_baselines(relax_mod):
    import tvm

    from ptool.backends import tvm_backend, tvm_cuda, tvm_tuning

    target = tvm_cuda.cuda_target("sm_80", host=tvm_backend.host_target())
    legalized = tvm.transform.Sequential(tvm_backend._front_passes(target, tvm_backend.Options()))(relax_mod)
    tasks = tvm_tuning.heavy_tasks(legalized, target, tvm_cuda.gpu_rules())
    names = [task.task_name for task, _ in tasks]
    assert any("matmul" in n for n in names) and any("softmax" in n for n in names)
    assert all(sch is not None for _, sch in tasks)


@pytest.mark.tvm
@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda").exists()),
                    reason="no CUDA toolkit (nvcc) to compile the kernels with")
def test_tvm_cuda_build_compiles_without_a_gpu(relax_mod):
    import tvm

    from ptool.backends import tvm_backend, tvm_cuda

    target = tvm_cuda.cuda_target("sm_80", host=tvm_backend.host_target())
    with target:
        executable = tvm.compile(relax_mod, target=target, relax_pipeline=tvm_backend._pipeline(target,
                                                                                                 tvm_backend.Options()))
    assert executable is not None


# --------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tvm"])
def test_each_backend_on_cuda_matches_the_cpu(backend):
    if backend == "onnxruntime":
        from ptool.backends.onnxruntime_backend import available_providers

        if "cuda" not in available_providers():
            pytest.skip("this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    if backend == "tvm":
        tvm = pytest.importorskip("tvm")
        if not tvm.runtime.enabled("cuda"):
            pytest.skip("TVM's CUDA runtime is not loaded")
    model, x = small_model()
    on_cpu = ptool.compile(model, backend=backend, example_inputs=(x,))(x)
    run = ptool.compile(model, backend=backend, example_inputs=(x,), device="cuda")
    out = run(x.cuda())
    assert out.device.type == "cuda"
    assert (out.cpu() - on_cpu).abs().max().item() < 1e-3
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stayed put
    if backend != "torch":  # ORT and TVM move host inputs to the GPU; torch wants them there
        assert (run(x) - out).abs().max().item() == 0


@no_cuda_only
def test_bench_gpu_without_a_gpu_exits_2_with_one_line_and_writes_nothing():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    files = [root / "BENCHMARKS.md", root / "BENCHMARKS.json"]
    before = [f.read_bytes() if f.exists() else None for f in files]
    proc = subprocess.run([sys.executable, str(root / "tools" / "bench_gpu.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA device: ") and "torch.cuda.is_available()" in lines[0]
    assert [f.read_bytes() if f.exists() else None for f in files] == before


def test_example_inputs_follow_the_module_for_exporting_backends():
    from ptool.backends import _device_of

    model, x = small_model()
    assert _device_of(model) == torch.device("cpu") and _device_of(nn.ReLU()) == torch.device("cpu")
    assert _device_of(model.to("meta")) == torch.device("meta")
