"""ONNX Runtime options the autotuner searches: execution providers and ORT's transformer fusions."""

from __future__ import annotations

import pytest
import torch

from ptool.backends import compile_module, onnxruntime_backend
from ptool.errors import BackendError, UsageError
from ptool.tune.fingerprint import device_fingerprint


@pytest.fixture(scope="module")
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(100, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    return model, (ids, torch.ones(1, 32, dtype=torch.int64))


def test_transformer_fusions_fuse_layernorm_and_gelu_and_keep_outputs(tiny_bert):
    model, args = tiny_bert
    compiled = compile_module(model, "onnxruntime", args, transformer_fusions=True)
    fused = compiled.info["fused_ops"]
    # per layer: two residual + LayerNorm pairs -> SkipLayerNormalization, one bias + GELU -> BiasGelu
    assert fused["SkipLayerNormalization"] == 4 and fused["BiasGelu"] == 2
    assert compiled.onnx_path.name.endswith(".fused.onnx")
    with torch.no_grad():
        ref = model(*args).last_hidden_state
    assert (compiled(*args)[0] - ref).abs().max().item() < 1e-4


def test_cpu_is_always_available_and_the_default():
    assert onnxruntime_backend.available_providers()[0] == "cpu"
    assert onnxruntime_backend.Options().provider == "cpu"


def test_missing_provider_is_a_one_line_error_naming_the_available_ones(tiny_bert, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    model, args = tiny_bert
    with pytest.raises(BackendError, match=r"provider 'cuda' is not in this onnxruntime build \(available: cpu\)"):
        compile_module(model, "onnxruntime", args, provider="cuda")


def test_unknown_provider_name_is_rejected_with_the_allowed_ones(tiny_bert):
    model, args = tiny_bert
    with pytest.raises(UsageError, match="provider"):
        compile_module(model, "onnxruntime", args, provider="vulkan")


def test_autotuner_searches_fusions_and_every_installed_provider(monkeypatch):
    import onnxruntime as ort

    fp = device_fingerprint()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    cpu_only = onnxruntime_backend.tuning_variants(fp)
    assert {"transformer_fusions": True} in cpu_only
    assert not any("provider" in v for v in cpu_only)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"])
    with_gpu = onnxruntime_backend.tuning_variants(fp)
    assert [v["provider"] for v in with_gpu if "provider" in v] == ["cuda", "openvino"]


def test_transformer_optimizer_noise_stays_off_the_terminal(capfd):
    """On MiniLM + mean pooling ORT's optimizer prints 'failed in shape inference' and warns 'symbolic
    shape inference disabled or failed' (3 lines) unless ptool quiets it."""
    from tests.models import zoo

    f = zoo.sentence_embedder()
    capfd.readouterr()
    compiled = compile_module(f.model, "onnxruntime", f.example_inputs, transformer_fusions=True)
    out, err = capfd.readouterr()
    assert "shape inference" not in out + err
    assert compiled.info["fused_ops"]  # it still fused what it could
