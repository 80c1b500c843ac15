"""Generation measured: pre-fill time, decode tokens per second and memory of a causal decoder per backend.

:func:`benchmark_generation` runs greedy generation of a Llama-family causal LM (a Hugging Face
``*ForCausalLM``) side by side on:

- ``eager``: the model itself in eager torch with Hugging Face's growing ``DynamicCache`` (the
  baseline every other row is compared with);
- ``torch`` / ``onnxruntime`` / ``tvm``: ptool's :class:`~ptool.frontends.decoder.DecodeStep` graph
  with a static, preallocated KV cache of ``max(contexts) + new_tokens`` slots, after the weight
  variant's passes (``fp32``: none; ``bf16``: ``precision:dtype=bf16``; ``int8``:
  ``quantize:mode=int8-dynamic``; ``int4``: ``quantize:mode=int4-weight``). Two static graphs per
  variant: a pre-fill chunk of ``chunk`` tokens and a one-token decode step. ONNX Runtime runs them
  through IO binding: the cache buffers, the inputs and the outputs are bound once as ``OrtValue``
  views of host arrays, and each step only writes the new keys and values into the cache slots.
  TVM compiles each graph once (every shape is static). torch runs the graphs eagerly through its
  backend (``ptool.compile(..., "torch")``), which puts the int4 linears on torch's packed int4 kernel.

Per context length ``c`` (a multiple of ``chunk``): the pre-fill of ``c`` prompt tokens (median of
``prefill_repeat`` runs), then ``new_tokens`` greedy decode steps, each timed; tokens per second =
1000 / the median step in ms. Memory: the process RSS growth from before the variant is built to
after its last generation (the weights it converted, its runtime, its cache), and the KV cache's
own bytes. Fidelity: how many of the greedy tokens match the eager baseline's, in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptool.benchmark import memory_snapshot
from ptool.errors import UsageError
from ptool.frontends.decoder import KV_DTYPES, CacheSpec, DecodeStep, decoder_parts, write_cache

__all__ = ["BACKENDS", "PRECISIONS", "GenerationRow", "benchmark_generation", "check_generation_args",
           "eager_generate", "step_generator"]

#: Weight variant -> the passes that make it.
PRECISIONS: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ["precision:dtype=bf16"],
    "int8": ["quantize:mode=int8-dynamic,embeddings=false"],
    "int4": ["quantize:mode=int4-weight,group_size=32,embeddings=false"],
}
BACKENDS = ("torch", "onnxruntime", "tvm")
EAGER = "eager"


@dataclass
class GenerationRow:
    """One backend x weight variant x KV dtype: its figures per context length."""

    backend: str
    precision: str
    kv_dtype: str
    prefill_ms: dict[int, float] = field(default_factory=dict)
    decode_ms: dict[int, float] = field(default_factory=dict)
    decode_cpu_ms: dict[int, float] = field(default_factory=dict)
    same_tokens: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    build_s: float = 0.0
    rss_delta_mb: float | None = None
    kv_cache_bytes: int = 0
    error: str | None = None

    @property
    def label(self) -> str:
        if self.backend == EAGER:
            return "torch eager (HF DynamicCache)"
        return f"{self.backend} {self.precision}" + (" kv-int8" if self.kv_dtype == "int8" else "")

    def tokens_per_s(self, context: int) -> float:
        return 1e3 / self.decode_ms[context] if self.decode_ms.get(context) else float("nan")

    def cpu_tokens_per_s(self, context: int) -> float:
        """Tokens per second of the process's CPU time: what a step costs, whatever else shares the cores."""
        return 1e3 / self.decode_cpu_ms[context] if self.decode_cpu_ms.get(context) else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["label"] = self.label
        d["tokens_per_s"] = {c: self.tokens_per_s(c) for c in self.decode_ms}
        d["cpu_tokens_per_s"] = {c: self.cpu_tokens_per_s(c) for c in self.decode_cpu_ms}
        return d


def check_generation_args(contexts: Sequence[int], new_tokens: int, chunk: int, precisions: Sequence[str],
                          backends: Sequence[str], kv_dtypes: Sequence[str]) -> None:
    """One-line :class:`UsageError` for a bad value (named, with what is allowed)."""
    if not contexts or any(c < 1 for c in contexts):
        raise UsageError(f"--context needs positive token counts, got {','.join(map(str, contexts)) or 'none'}")
    if chunk < 1:
        raise UsageError(f"--chunk must be at least 1, got {chunk}")
    bad = [c for c in contexts if c % chunk]
    if bad:
        raise UsageError(f"every --context must be a multiple of --chunk {chunk} (pre-fill runs whole chunks); "
                         f"got {', '.join(map(str, bad))}")
    if new_tokens < 2:
        raise UsageError(f"--new-tokens must be at least 2, got {new_tokens}")
    for what, given, allowed in (("precision", precisions, tuple(PRECISIONS)), ("backend", backends, BACKENDS),
                                 ("kv cache dtype", kv_dtypes, KV_DTYPES)):
        wrong = [g for g in given if g not in allowed]
        if wrong:
            raise UsageError(f"unknown {what} '{wrong[0]}'; choose from {', '.join(allowed)}")


def _trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next RSS delta starts clean."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


#: ``(wall ms, process CPU ms)`` of one timed piece of work.
Timing = tuple[float, float]
#: What a generator's ``run(prompt, new_tokens)`` returns: the pre-fill's timing, each decode step's, the tokens.
Generated = tuple[Timing, list[Timing], list[int]]


class _Clock:
    """Wall and process-CPU milliseconds since it was started (or last read). On a shared machine the
    CPU time is the step's own cost, the wall time includes the waits for a core."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> Timing:
        wall, cpu = time.perf_counter(), time.process_time()
        out = ((wall - self.wall) * 1e3, (cpu - self.cpu) * 1e3)
        self.wall, self.cpu = wall, cpu
        return out


def _argmax_last(logits: Any) -> torch.Tensor:
    t = torch.as_tensor(logits)
    return t[:, -1].float().argmax(-1, keepdim=True)  # (B, 1)


def eager_generate(model: torch.nn.Module) -> Callable[[torch.Tensor, int], Generated]:
    """``run(prompt, new_tokens) -> (prefill timing, timing per decode step, tokens)`` with Hugging Face's
    own cache (timings: ``(wall ms, CPU ms)``)."""

    def run(prompt: torch.Tensor, new_tokens: int) -> Generated:
        with torch.inference_mode():
            clock = _Clock()
            out = model(input_ids=prompt, use_cache=True)
            tok = _argmax_last(out.logits)
            prefill = clock.lap()
            cache, tokens, steps = out.past_key_values, [int(tok[0, 0])], []
            for _ in range(new_tokens - 1):
                clock = _Clock()
                out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                tok = _argmax_last(out.logits)
                steps.append(clock.lap())
                cache = out.past_key_values
                tokens.append(int(tok[0, 0]))
        return prefill, steps, tokens

    return run


class _TorchSteps:
    """Pre-fill and decode callables taking and returning torch tensors (torch graphs, TVM)."""

    def __init__(self, prefill: Callable, decode: Callable, spec: CacheSpec) -> None:
        self.prefill_fn, self.decode_fn, self.spec = prefill, decode, spec
        self.cache = spec.empty()

    def step(self, fn: Callable, ids: torch.Tensor, pos: int) -> torch.Tensor:
        outs = fn(ids, torch.tensor(pos, dtype=torch.int64), *self.cache)
        write_cache(self.cache, [torch.as_tensor(o) for o in outs[1:]], pos)
        return outs[0]


class _OrtSteps:
    """The two ONNX graphs on ONNX Runtime through IO binding: every input and output is an ``OrtValue``
    bound once over a host array; the cache arrays are shared by both sessions and updated in place."""

    def __init__(self, prefill_path: Path, decode_path: Path, spec: CacheSpec, chunk: int, vocab: int,
                 threads: int) -> None:
        import numpy as np
        import onnxruntime as ort

        self.spec = spec
        self.cache = [t.numpy() for t in spec.empty()]
        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.bound = {}
        for key, path, t in (("prefill", prefill_path, chunk), ("decode", decode_path, 1)):
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            ids = np.zeros((spec.batch, t), dtype=np.int64)
            pos = np.zeros((), dtype=np.int64)
            logits_t = 1 if key == "prefill" else t
            new_shape = (spec.layers, spec.batch, spec.kv_heads, t)
            outs = [np.zeros((spec.batch, logits_t, vocab), dtype=np.float32),
                    np.zeros((*new_shape, spec.head_dim), dtype=self.cache[0].dtype),
                    np.zeros((*new_shape, spec.head_dim), dtype=self.cache[1].dtype)]
            if spec.dtype == "int8":
                outs += [np.zeros((*new_shape, 1), dtype=np.float32), np.zeros((*new_shape, 1), dtype=np.float32)]
            binding = sess.io_binding()
            keep = []
            for inp, arr in zip(sess.get_inputs(), [ids, pos, *self.cache]):
                v = ort.OrtValue.ortvalue_from_numpy(arr)  # shares the array's memory on the CPU
                keep.append(v)
                binding.bind_ortvalue_input(inp.name, v)
            for o, arr in zip(sess.get_outputs(), outs):
                v = ort.OrtValue.ortvalue_from_numpy(arr)
                keep.append(v)
                binding.bind_ortvalue_output(o.name, v)
            self.bound[key] = (sess, binding, ids, pos, outs, keep)

    def step(self, key: str, ids: torch.Tensor, pos: int) -> torch.Tensor:
        sess, binding, ids_buf, pos_buf, outs, _ = self.bound[key]
        ids_buf[...] = ids.numpy()
        pos_buf[...] = pos
        sess.run_with_iobinding(binding)
        write_cache(self.cache, outs[1:], pos)
        return torch.from_numpy(outs[0])


def step_generator(steps: Any, chunk: int) -> Callable[[torch.Tensor, int], Generated]:
    """``run(prompt, new_tokens)`` over a static-cache runner: pre-fill chunk by chunk, then decode."""

    def call(key: str, ids: torch.Tensor, pos: int) -> torch.Tensor:
        if isinstance(steps, _OrtSteps):
            return steps.step(key, ids, pos)
        return steps.step(steps.prefill_fn if key == "prefill" else steps.decode_fn, ids, pos)

    def run(prompt: torch.Tensor, new_tokens: int) -> Generated:
        c = prompt.shape[1]
        with torch.inference_mode():
            clock = _Clock()
            for s in range(0, c, chunk):
                logits = call("prefill", prompt[:, s:s + chunk], s)
            tok = _argmax_last(logits)
            prefill = clock.lap()
            tokens, times = [int(tok[0, 0])], []
            for i in range(new_tokens - 1):
                clock = _Clock()
                tok = _argmax_last(call("decode", tok, c + i))
                times.append(clock.lap())
                tokens.append(int(tok[0, 0]))
        return prefill, times, tokens

    return run


class BuildTimeout(Exception):
    """A variant's build ran past its time limit."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise :class:`BuildTimeout` in the block once the process has used ``seconds`` of CPU time, and
    again every 5 s after (a backend that catches the first to try another route gets stopped too).
    CPU time, not wall time: a process paused (``SIGSTOP``) or waiting for a busy core is not charged
    for it. ``SIGPROF``: main thread only, and only when control is back in Python; elsewhere, or with
    None, no limit."""
    import signal
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise BuildTimeout(f"did not build within {seconds / 60:g} min of CPU time (stopped there)")

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds, 5.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def _same_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _build(model: torch.nn.Module, backend: str, precision: str, spec: CacheSpec, chunk: int,
           folder: Path, threads: int) -> Any:
    """The static-cache runner of one variant on one backend."""
    import ptool

    prefill_step = DecodeStep(model, spec, last_only=True).eval()
    decode_step = DecodeStep(model, spec).eval()
    b = spec.batch
    example = {"prefill": (torch.zeros(b, chunk, dtype=torch.int64), torch.tensor(0), *spec.empty()),
               "decode": (torch.zeros(b, 1, dtype=torch.int64), torch.tensor(0), *spec.empty())}
    specs = PRECISIONS[precision]
    graphs = {}
    for key, module in (("prefill", prefill_step), ("decode", decode_step)):
        if specs:
            module = ptool.transform(module, specs, example_inputs=example[key], copy_model=False)
        graphs[key] = module
    if backend in ("torch", "tvm"):  # torch: eager, the 4-bit linears on torch's packed int4 kernel
        compiled = {k: ptool.compile(g, backend, example_inputs=example[k]) for k, g in graphs.items()}
        return _TorchSteps(compiled["prefill"], compiled["decode"], spec)
    paths = {}
    for key, g in graphs.items():
        paths[key] = folder / f"{precision}_{spec.dtype}_{key}.onnx"
        compiled = ptool.compile(g, "onnxruntime", example_inputs=example[key], onnx_path=str(paths[key]))
        del compiled  # only its file is kept: the runner opens its own sessions with IO binding
    vocab = model.config.vocab_size
    return _OrtSteps(paths["prefill"], paths["decode"], spec, chunk, vocab, threads)


def benchmark_generation(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    *,
    contexts: Sequence[int] = (128, 512),
    new_tokens: int = 16,
    chunk: int = 128,
    backends: Sequence[str] = BACKENDS,
    precisions: Sequence[str] = ("fp32", "bf16", "int8", "int4"),
    kv_dtypes: Sequence[str] = ("float32",),
    prefill_repeat: int = 1,
    variants: Sequence[tuple[str, str, str]] | None = None,
    log: Callable[[str], None] | None = None,
    on_row: Callable[[list[GenerationRow]], None] | None = None,
    build_timeout_s: float | None = None,
) -> list[GenerationRow]:
    """Greedy generation of ``model`` on every backend x precision x KV dtype, beside eager torch.

    Args:
        model: a Llama-family Hugging Face causal LM in eval mode.
        prompt: ``(batch, >= max(contexts))`` token ids; context ``c`` uses its first ``c`` tokens.
        contexts: prompt lengths, each a multiple of ``chunk``.
        new_tokens: tokens generated after each prompt (the first comes from the pre-fill).
        chunk: pre-fill chunk (the static pre-fill graph's length).
        backends / precisions / kv_dtypes: the grid measured (``variants`` lists
            ``(backend, precision, kv_dtype)`` triples instead).
        prefill_repeat: pre-fill runs per context (median quoted).
        log: progress lines.
        on_row: called with the rows so far after each one is done (a long run's figures kept as they come).
        build_timeout_s: a variant whose build takes more CPU time is stopped and gets that as its error.

    Returns:
        The eager baseline row first, then one row per variant (a variant that failed to build or run
        carries its one-line ``error``).

    Raises:
        UsageError: a model that is not a Llama-family decoder, or a bad argument.
    """
    decoder_parts(model)
    check_generation_args(contexts, new_tokens, chunk, precisions, backends, kv_dtypes)
    if prompt.shape[1] < max(contexts):
        raise UsageError(f"the prompt has {prompt.shape[1]} tokens; the longest --context needs {max(contexts)}")
    log = log or (lambda text: None)
    threads = torch.get_num_threads()
    length = max(contexts) + new_tokens
    grid = list(variants) if variants is not None else \
        [(b, p, k) for k in kv_dtypes for p in precisions for b in backends]
    rows = []

    def measure(row: GenerationRow, run: Callable) -> None:
        run(prompt[:, :chunk], 2)  # warm-up: lazy initialization, allocator growth
        for c in contexts:
            runs = [run(prompt[:, :c], new_tokens) for _ in range(prefill_repeat)]
            row.prefill_ms[c] = statistics.median(prefill[0] for prefill, _, _ in runs)
            _, steps, row.tokens[c] = runs[-1]
            row.decode_ms[c] = statistics.median(wall for wall, _ in steps)
            row.decode_cpu_ms[c] = statistics.median(cpu for _, cpu in steps)
            if rows:
                row.same_tokens[c] = _same_prefix(rows[0].tokens[c], row.tokens[c])
            log(f"{row.label}: context {c}: pre-fill {row.prefill_ms[c]:.1f} ms, decode {row.decode_ms[c]:.2f} ms/token "
                f"({row.decode_cpu_ms[c]:.2f} ms CPU)")

    _trim()
    before = memory_snapshot().rss_mb
    base = GenerationRow(EAGER, "fp32", "float32")
    spec_eager = DecodeStep.cache_spec(model, length, batch=prompt.shape[0])
    base.kv_cache_bytes = spec_eager.nbytes()  # HF's cache at the longest context holds as many tokens
    measure(base, eager_generate(model))
    _trim()
    after = memory_snapshot().rss_mb
    base.rss_delta_mb = after - before if before is not None and after is not None else None
    rows.append(base)
    if on_row is not None:
        on_row(rows)
    with tempfile.TemporaryDirectory(prefix="ptool-generate-") as tmp:
        for backend, precision, kv in grid:
            row = GenerationRow(backend, precision, kv)
            spec = DecodeStep.cache_spec(model, length, batch=prompt.shape[0], kv_dtype=kv)
            row.kv_cache_bytes = spec.nbytes()
            _trim()
            before = memory_snapshot().rss_mb
            steps = None
            try:
                start = time.perf_counter()
                with _time_limit(build_timeout_s):
                    steps = _build(model, backend, precision, spec, chunk, Path(tmp), threads)
                row.build_s = time.perf_counter() - start
                log(f"{row.label}: built in {row.build_s:.1f} s")
                measure(row, step_generator(steps, chunk))
                after = memory_snapshot().rss_mb
                row.rss_delta_mb = after - before if before is not None and after is not None else None
            except Exception as e:  # one variant a backend cannot build or run: say so in its row, go on
                what = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                row.error = f"{'not built' if steps is None else 'not run'}: {what}"
                log(f"{row.label}: {row.error}")
            steps = None
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            for f in Path(tmp).iterdir():
                f.unlink()
    return rows


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


def format_table(rows: Sequence[GenerationRow], contexts: Sequence[int], new_tokens: int) -> str:
    """A Markdown table: per row the build time, RSS growth, KV-cache bytes, and per context the
    pre-fill ms, decode tokens/s by wall time and by the process's CPU time (each with its ratio to
    eager's) and the greedy tokens that match eager's."""
    base = rows[0]
    head = ["backend / weights / KV", "build s", "RSS delta", "KV cache"]
    for c in contexts:
        head += [f"pre-fill {c} ms", f"tok/s @{c}", f"x eager @{c}", f"CPU tok/s @{c}", f"x eager CPU @{c}",
                 f"same tokens @{c}"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.label} | {r.error[:140]} |" + " |" * (len(head) - 2))
            continue
        rss = f"{r.rss_delta_mb:.0f} MiB" if r.rss_delta_mb is not None else "-"
        cells = [r.label, f"{r.build_s:.1f}", rss, _mib(r.kv_cache_bytes)]
        for c in contexts:
            speed, cpu = r.tokens_per_s(c), r.cpu_tokens_per_s(c)
            cells += [f"{r.prefill_ms[c]:.1f}", f"{speed:.1f}", f"{speed / base.tokens_per_s(c):.2f}",
                      f"{cpu:.1f}", f"{cpu / base.cpu_tokens_per_s(c):.2f}",
                      "-" if r is base else f"{r.same_tokens.get(c, 0)}/{new_tokens}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
