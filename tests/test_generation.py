"""ptool.generation and ``ptool bench --generate``: the int8 KV cache's perplexity cost on a trained decoder,
the generation grid on a small decoder, and the one-line errors for what cannot be generated from."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest
import torch

from ptool.cli import main
from ptool.frontends.decoder import DecodeStep

_TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
#: A smaller recipe than tools/train_decoder.py's (same text, same held-out split): trained once, cached.
_RECIPE = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, steps=300, batch=8)


def _train_decoder():
    spec = importlib.util.spec_from_file_location("train_decoder", _TOOLS / "train_decoder.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_decoder"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_int8_kv_cache_perplexity_change_is_small():
    """Held-out perplexity with keys and values stored int8 per token and head (float32 scale beside each):
    within 0.5% of the float cache's on a trained byte-level decoder; the cache 3.2x smaller (head dim 16)."""
    td = _train_decoder()
    recipe = td.Recipe(**_RECIPE)
    torch.manual_seed(0)
    with torch.random.fork_rng():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model, meta = td.load(recipe, folder=td.CACHE.parent / "decoder-test")
        finally:
            torch.set_num_threads(threads)
    _, held = td.corpus(recipe.heldout_every)
    windows = td.windows(held, count=64)
    ppl = {}
    for kv in ("float32", "int8"):
        spec = DecodeStep.cache_spec(model, 1, batch=8, kv_dtype=kv)
        step = DecodeStep(model, spec).eval()
        ppl[kv] = td.perplexity(lambda ids: step(ids, torch.tensor(0), *spec.empty())[0], windows)
    assert ppl["float32"] == pytest.approx(td.perplexity(td.Logits(model), windows), rel=1e-5)
    assert ppl["float32"] < 12  # it learned something: a byte-uniform model has 256
    assert 0 < abs(ppl["int8"] / ppl["float32"] - 1) < 5e-3, ppl
    ratio = DecodeStep.cache_spec(model, 64).nbytes() / DecodeStep.cache_spec(model, 64, kv_dtype="int8").nbytes()
    assert ratio == pytest.approx(64 / 20)


def _decoder():
    """A 2-layer Llama-style decoder with random weights (4 / 2 heads of 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_generation_grid_on_a_small_decoder():
    from ptool.generation import benchmark_generation, format_table

    model = _decoder()
    prompt = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(0))
    seen = []
    rows = benchmark_generation(model, prompt, contexts=(16, 32), new_tokens=4, chunk=16,
                                variants=[("torch", "fp32", "float32"), ("torch", "fp32", "int8")],
                                on_row=lambda so_far: seen.append([r.label for r in so_far]))
    assert seen == [[r.label for r in rows[:n]] for n in (1, 2, 3)]  # each row handed over as it finishes
    eager, fp32, kv8 = rows
    assert [r.error for r in rows] == [None, None, None]
    assert fp32.same_tokens == {16: 4, 32: 4}  # the same greedy tokens as Hugging Face's own cache
    assert all(r.prefill_ms[c] > 0 and r.tokens_per_s(c) > 0 for r in rows for c in (16, 32))
    assert all(0 < r.decode_cpu_ms[c] < 10 * r.decode_ms[c] for r in rows for c in (16, 32))  # one thread's CPU time
    assert fp32.kv_cache_bytes == 2 * 2 * 2 * 36 * 16 * 4  # k and v, 2 layers, 2 kv heads, 36 slots, dim 16
    assert kv8.kv_cache_bytes == 2 * 2 * 2 * 36 * (16 + 4)
    table = format_table(rows, (16, 32), 4)
    assert "torch eager (HF DynamicCache)" in table and "torch fp32 kv-int8" in table
    assert f"| {fp32.cpu_tokens_per_s(32):.1f} | {fp32.cpu_tokens_per_s(32) / eager.cpu_tokens_per_s(32):.2f} |" in table


def _fixture(tmp_path, monkeypatch):
    (tmp_path / "gen_fixture.py").write_text(
        "import torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "def decoder():\n"
        "    torch.manual_seed(0)\n"
        "    c = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,\n"
        "                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)\n"
        "    return LlamaForCausalLM(c).eval(), (torch.zeros(1, 8, dtype=torch.long),)\n"
        "def mlp():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(1, 4),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_cli_generate_on_a_decoder(capsys, tmp_path, monkeypatch):
    _fixture(tmp_path, monkeypatch)
    out_json = tmp_path / "gen.json"
    code = main(["bench", "gen_fixture:decoder", "--generate", "--context", "16,32", "--chunk", "16",
                 "--new-tokens", "3", "--backend", "torch", "--precision", "fp32", "--kv-cache", "float32,int8",
                 "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "torch eager (HF DynamicCache)" in out and "tok/s @32" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["label"] for r in rows] == ["torch eager (HF DynamicCache)", "torch fp32", "torch fp32 kv-int8"]


@pytest.mark.parametrize("argv,fragment", [
    (["gen_fixture:mlp", "--generate"], "needs a Llama-family causal decoder"),
    (["gen_fixture:decoder", "--generate", "--context", "100"], "multiple of --chunk 128"),
    (["gen_fixture:decoder", "--generate", "--precision", "fp8"], "unknown precision 'fp8'"),
    (["gen_fixture:decoder", "--generate", "--kv-cache", "int4"], "unknown kv cache dtype 'int4'"),
    (["gen_fixture:decoder", "--generate", "--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["gen_fixture:decoder", "--generate", "-p", "fold-bn"], "--passes does not apply"),
])
def test_cli_generate_errors_are_one_line(capsys, tmp_path, monkeypatch, argv, fragment):
    _fixture(tmp_path, monkeypatch)
    code = main(["bench", *argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ptool: error: "), err
    assert fragment in lines[0], lines[0]


def test_a_variant_past_its_build_limit_is_a_row_saying_so(monkeypatch):
    import time

    from ptool import generation
    from ptool.generation import benchmark_generation, format_table

    def slow_build(*args, **kwargs):  # a build that spends 1 s of CPU time in Python, past the 0.05 s limit
        start = time.process_time()
        while time.process_time() - start < 1.0:
            sum(range(1000))
        raise AssertionError("the limit did not stop the build")

    model = _decoder()
    prompt = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(generation, "_build", slow_build)
    rows = benchmark_generation(model, prompt, contexts=(16,), new_tokens=2, chunk=16, build_timeout_s=0.05,
                                variants=[("torch", "int8", "float32")])
    assert rows[0].error is None and rows[1].error.startswith("not built: ")
    assert "did not build within" in rows[1].error and not rows[1].decode_ms
    assert "| torch int8 | not built: " in format_table(rows, (16,), 2)
    import signal

    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)  # the timer is off again
