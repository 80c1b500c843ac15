"""Loading local Hugging Face folders: real MiniLM, saved tiny models, and every refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptool.default_model import minilm_folder
from ptool.errors import ModelLoadError, UsageError
from ptool.frontends.huggingface import load_hf_folder, load_hf_model, sample_sentences, split_call

transformers = pytest.importorskip("transformers")


def _one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


def _tiny_bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=40)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _tiny_vit():
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=5)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).eval()


def _tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=40,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = _tiny_bert()
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    return folder, model


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0, msg=key)


def test_minilm_folder_tokenizes_real_sentences() -> None:
    model, args, kwargs = load_hf_folder(minilm_folder(), seq_len=32, batch_size=2)
    assert type(model).__name__ == "BertModel" and not model.training
    ids, mask = args
    assert kwargs == {}
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == torch.long
    assert int(ids[0, 0]) == 101  # [CLS]
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    expected = tokenizer(sample_sentences()[:2], padding="max_length", truncation=True, max_length=32)
    assert ids.tolist() == expected["input_ids"]
    assert "guitar" in tokenizer.decode(ids[0])
    with torch.no_grad():
        hidden = model(*args)[0]
    assert hidden.shape == (2, 32, 384) and torch.isfinite(hidden).all()


def test_minilm_default_seq_len_pads_and_truncates() -> None:
    _, (ids, mask), _ = load_hf_folder(minilm_folder())
    assert ids.shape == (1, 128)
    assert mask[0].sum() < 128  # a short sentence is padded to max_length


def test_saved_bert_round_trips(bert_folder) -> None:
    folder, original = bert_folder
    assert (folder / "model.safetensors").is_file()
    model, args, kwargs = load_hf_folder(folder, seq_len=24, batch_size=3)
    _assert_same_weights(model, original)
    ids, mask = args  # no tokenizer: synthesized from the config
    assert ids.shape == (3, 24) and int(ids.max()) < 64 and bool((mask == 1).all()) and kwargs == {}
    with torch.no_grad():
        torch.testing.assert_close(model(*args)[0], original(*args)[0], atol=0, rtol=0)
    again = load_hf_folder(folder, seq_len=24, batch_size=3)[1]
    assert torch.equal(again[0], ids), "synthesized inputs are seeded"


def test_saved_vit_gets_pixel_values(tmp_path) -> None:
    original = _tiny_vit()
    original.save_pretrained(tmp_path)
    model, args, kwargs = load_hf_folder(tmp_path)
    assert type(model).__name__ == "ViTForImageClassification"
    (pixels,) = args
    assert pixels.shape == (1, 3, 16, 16) and kwargs == {}
    _assert_same_weights(model, original)
    with torch.no_grad():
        # Same weights; the loaded copy may pick another kernel path, hence float32 round-off only.
        torch.testing.assert_close(model(*args).logits, original(*args).logits, atol=1e-6, rtol=1e-5)


def test_loaded_gpt2_exports_with_mask_as_kwarg(tmp_path) -> None:
    _tiny_gpt2().save_pretrained(tmp_path)
    model, args, kwargs = load_hf_folder(tmp_path, seq_len=16)
    assert len(args) == 1 and set(kwargs) == {"attention_mask"}  # past_key_values sits in between
    assert model.config.use_cache is False
    ep = torch.export.export(model, args, kwargs, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args, **kwargs).logits, model(*args, **kwargs).logits)


def test_sharded_safetensors(tmp_path) -> None:
    original = _tiny_bert()
    original.save_pretrained(tmp_path, max_shard_size="4KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _assert_same_weights(load_hf_model(tmp_path), original)


def test_sharded_with_missing_shard(tmp_path) -> None:
    _tiny_bert().save_pretrained(tmp_path, max_shard_size="4KB")
    sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(ModelLoadError) as info:
        load_hf_folder(tmp_path)
    assert "missing shard" in _one_line_error(info)


def test_missing_folder(tmp_path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_hf_folder(tmp_path / "nope")
    assert "does not exist" in _one_line_error(info)


def test_file_instead_of_folder(tmp_path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        load_hf_folder(path)
    assert "not a folder" in _one_line_error(info)


def test_folder_without_config(bert_folder, tmp_path) -> None:
    folder, _ = bert_folder
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError) as info:
        load_hf_folder(tmp_path)
    assert "config.json" in _one_line_error(info)


def test_folder_without_weights(tmp_path) -> None:
    _tiny_bert().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_hf_folder(tmp_path)
    assert "no weights" in _one_line_error(info)


def test_pickle_only_is_refused_then_allowed(tmp_path) -> None:
    original = _tiny_bert()
    original.config.save_pretrained(tmp_path)
    torch.save(original.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as info:
        load_hf_folder(tmp_path)
    message = _one_line_error(info)
    assert "pytorch_model.bin" in message and "allow_pickle=True" in message
    model, _, _ = load_hf_folder(tmp_path, allow_pickle=True)
    _assert_same_weights(model, original)


def test_weights_of_another_architecture(bert_folder, tmp_path) -> None:
    folder, _ = bert_folder
    _tiny_vit().config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError) as info:
        load_hf_folder(tmp_path)
    assert "do not match" in _one_line_error(info)


def test_unknown_model_type(bert_folder, tmp_path) -> None:
    folder, _ = bert_folder
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError) as info:
        load_hf_folder(tmp_path)
    assert "config.json" in _one_line_error(info)


def test_seq_len_beyond_positions(bert_folder) -> None:
    folder, _ = bert_folder
    with pytest.raises(UsageError) as info:
        load_hf_folder(folder, seq_len=41)
    assert "40" in _one_line_error(info)
    # Left to its default, seq_len is capped at the model's positions instead.
    assert load_hf_folder(folder)[1][0].shape == (1, 40)


def test_split_call_follows_forward_order() -> None:
    ids, mask = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    assert split_call(_tiny_bert(), {"input_ids": ids, "attention_mask": mask}) == ((ids, mask), {})
    args, kwargs = split_call(_tiny_gpt2(), {"input_ids": ids, "attention_mask": mask})
    assert args == (ids,) and kwargs == {"attention_mask": mask}


def test_import_is_lazy() -> None:
    code = "import sys, ptool.frontends.huggingface; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
