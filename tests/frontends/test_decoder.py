"""The static-cache decode step (ptool.frontends.decoder) against the Hugging Face model's full forward.

Fixture: a Llama-style decoder (RoPE, grouped-query attention 4 / 2 heads, SwiGLU, RMSNorm) with
random weights, plus Qwen2 (q/k/v biases). The prompt is pre-filled in chunks, the rest decoded one
token at a time; the logits must equal the full forward's within 1e-4 on torch, ONNX Runtime (the
exported graphs) and TVM.
"""

from __future__ import annotations

import pytest
import torch

from ptool.errors import UsageError
from ptool.frontends.decoder import CacheSpec, DecodeStep, write_cache

SEQ, CHUNK, PREFILL, BATCH = 24, 8, 16, 2


def _llama(kind: str = "llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0)
    torch.manual_seed(0)
    return model_cls(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 97, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _examples(spec: CacheSpec) -> tuple[tuple, tuple]:
    return ((torch.zeros(BATCH, CHUNK, dtype=torch.int64), torch.tensor(0), *spec.empty()),
            (torch.zeros(BATCH, 1, dtype=torch.int64), torch.tensor(0), *spec.empty()))


def _generate_logits(prefill, decode, spec: CacheSpec, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position: PREFILL tokens in chunks of CHUNK, then one token per step."""
    cache = spec.empty()
    out = []
    with torch.no_grad():
        for s in range(0, PREFILL, CHUNK):
            o = prefill(ids[:, s:s + CHUNK], torch.tensor(s), *cache)
            write_cache(cache, [torch.as_tensor(t) for t in o[1:]], s)
            out.append(torch.as_tensor(o[0]))
        for p in range(PREFILL, SEQ):
            o = decode(ids[:, p:p + 1], torch.tensor(p), *cache)
            write_cache(cache, [torch.as_tensor(t) for t in o[1:]], p)
            out.append(torch.as_tensor(o[0]))
    return torch.cat(out, dim=1)


def _reference(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_step_equals_full_forward_in_torch(kind):
    model = _llama(kind)
    ids = _ids()
    spec = DecodeStep.cache_spec(model, SEQ + 4, batch=BATCH)
    step = DecodeStep(model, spec).eval()
    got = _generate_logits(step, step, spec, ids)
    assert (got - _reference(model, ids)).abs().max().item() < 1e-4
    # the whole sequence in one call (pre-fill of SEQ tokens) too
    with torch.no_grad():
        whole = step(ids, torch.tensor(0), *spec.empty())[0]
    assert (whole - _reference(model, ids)).abs().max().item() < 1e-4


@pytest.mark.slow  # two ONNX exports (about a minute on a busy 2-core machine); TVM builds take longer
@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_step_equals_full_forward_on_backends(backend):
    import ptool

    if backend == "tvm":
        pytest.importorskip("tvm")
    model = _llama()
    ids = _ids()
    spec = DecodeStep.cache_spec(model, SEQ + 4, batch=BATCH)
    prefill_ex, decode_ex = _examples(spec)
    prefill = ptool.compile(DecodeStep(model, spec).eval(), backend, example_inputs=prefill_ex)
    decode = ptool.compile(DecodeStep(model, spec).eval(), backend, example_inputs=decode_ex)
    got = _generate_logits(prefill, decode, spec, ids)
    assert (got - _reference(model, ids)).abs().max().item() < 1e-4


def test_int8_cache_close_and_chunking_exact():
    """int8 keys / values per token and head: the same logits whether pre-filled at once or token by token
    (the new tokens' own keys go through the same rounding), close to float, a quarter of the bytes."""
    model = _llama()
    ids = _ids()
    spec = DecodeStep.cache_spec(model, SEQ + 4, batch=BATCH, kv_dtype="int8")
    step = DecodeStep(model, spec).eval()
    stepped = _generate_logits(step, step, spec, ids)
    with torch.no_grad():
        whole = step(ids, torch.tensor(0), *spec.empty())[0]
    ref = _reference(model, ids)
    assert (stepped - whole).abs().max().item() < 1e-4
    rel = ((stepped - ref).norm() / ref.norm()).item()
    assert 1e-5 < rel < 2e-2  # the rounding is really there, and small
    float_bytes = DecodeStep.cache_spec(model, SEQ + 4, batch=BATCH).nbytes()
    assert float_bytes / spec.nbytes() == pytest.approx(4 * 16 / (16 + 4))  # head_dim 16: 64 B vs 16 + 4 B


@pytest.mark.slow
def test_int8_cache_on_onnxruntime_matches_torch():
    import ptool

    model = _llama()
    ids = _ids()
    spec = DecodeStep.cache_spec(model, SEQ + 4, batch=BATCH, kv_dtype="int8")
    step = DecodeStep(model, spec).eval()
    prefill_ex, decode_ex = _examples(spec)
    prefill = ptool.compile(step, "onnxruntime", example_inputs=prefill_ex)
    decode = ptool.compile(step, "onnxruntime", example_inputs=decode_ex)
    got = _generate_logits(prefill, decode, spec, ids)
    want = _generate_logits(step, step, spec, ids)
    assert (got - want).abs().max().item() < 1e-4


def test_not_a_decoder_is_one_line_usage_error():
    with pytest.raises(UsageError, match="Llama-family causal decoder.*got Linear") as e:
        DecodeStep.cache_spec(torch.nn.Linear(2, 2), 8)
    assert "\n" not in str(e.value)


def test_cache_geometry_must_fit():
    model = _llama()
    with pytest.raises(UsageError, match="does not fit the model"):
        DecodeStep(model, CacheSpec(layers=3, batch=1, kv_heads=2, length=8, head_dim=16))


def test_other_decoder_families_are_refused_not_mirrored_wrong():
    """Gemma has the same module names but other norms and embedding scaling: refused, never run wrong."""
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(UsageError, match="model types llama, qwen2, mistral.*GemmaForCausalLM is 'gemma'"):
        DecodeStep.cache_spec(GemmaForCausalLM(config), 8)
