"""Decode time per token as the context grows: linear attention's (S, z) state vs softmax's KV cache.

Writes the "Decode per token" section of ``BENCHMARKS.md`` (key ``attention_decode``).

One causal attention layer, 12 heads x 64 dims, batch 1, fp32, after a context of N tokens
(N = 1k ... 64k). Each row is one new token: from ``(q_t, k_t, v_t)`` and what the context left
behind to the attended values.

* **softmax + KV cache**: the new key and value are written into a preallocated cache of the
  context's keys and values (no copy of the cache), then SDPA of the one query over all N + 1
  keys - the work grows with N.
* **linear, recurrent**: ptool's :class:`~ptool.passes.attention.linear.RecurrentDecoder` for the
  causal ``elu`` and ``hedgehog`` kernels, whose state ``(S (H, m, Dv), z (H, m))`` is the
  context summed once (``sum_j phi(k_j) v_j^T`` and ``sum_j phi(k_j)``); its size does not
  depend on N, so neither should the time. Run in eager torch and as its own exported graph
  on ONNX Runtime.

Each cell is the median of 200 steps after 20 warm-up steps, all rows of one N timed side by
side (round robin).

    .venv/bin/python tools/bench_decode.py
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ptool  # noqa: E402
from _sections import write_section  # noqa: E402
from ptool.benchmark import measure_interleaved  # noqa: E402
from ptool.passes.attention.kernel import SiteShape  # noqa: E402
from ptool.passes.attention.linear import EluKernel, HedgehogKernel, RecurrentDecoder  # noqa: E402

HEADS, DIM = 12, 64
CONTEXTS = (1024, 4096, 16384, 65536)
KERNELS = {"elu": EluKernel, "hedgehog": HedgehogKernel}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class KVCacheStep(nn.Module):
    """Softmax decode with a preallocated KV cache holding ``n`` context tokens."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        n = k.shape[2]
        self.n = n
        self.k_cache = torch.cat([k, torch.zeros_like(k[:, :, :1])], dim=2)
        self.v_cache = torch.cat([v, torch.zeros_like(v[:, :, :1])], dim=2)

    def forward(self, q_t, k_t, v_t):
        self.k_cache[:, :, self.n:] = k_t
        self.v_cache[:, :, self.n:] = v_t
        return torch.nn.functional.scaled_dot_product_attention(q_t, self.k_cache, self.v_cache)


class StateStep(nn.Module):
    """A decoder step with its state bound (the same state every call, as a context of ``n`` leaves it)."""

    def __init__(self, step, s: torch.Tensor, z: torch.Tensor) -> None:
        super().__init__()
        self.step, self.s, self.z = step, s, z

    def forward(self, q_t, k_t, v_t):
        return self.step(q_t, k_t, v_t, self.s, self.z)[0]


def context(n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n)
    return tuple(torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(3))


def prefill_state(kernel, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, z)`` after the context: what :meth:`decode_step` would have summed token by token."""
    fk = kernel.features(k, k)[1].float()
    return torch.einsum("bhnm,bhnd->bhmd", fk, v.float()), fk.sum(2)


def decode_row(n: int) -> dict[str, float]:
    q, k, v = context(n)
    token = tuple(t[:, :, -1:].clone() for t in (q, k, v))
    shape = SiteShape(layer=0, heads=HEADS, kv_heads=HEADS, head_dim=DIM, value_dim=DIM, q_len=1, kv_len=1,
                      scale=DIM ** -0.5, causal=True)
    cands: dict[str, object] = {"softmax + KV cache": KVCacheStep(k, v)}
    for name, cls in KERNELS.items():
        torch.manual_seed(0)
        kernel = cls(shape).eval()
        with torch.no_grad():
            s, z = prefill_state(kernel, k, v)
        decoder = RecurrentDecoder(kernel).eval()
        cands[f"{name}, torch"] = StateStep(decoder, s, z)
        ort = ptool.compile(decoder, "onnxruntime", (*token, s, z))
        cands[f"{name}, ORT"] = StateStep(ort, s, z)
    with torch.inference_mode():
        t = measure_interleaved(cands, token, warmup=20, repeat=200, settle=1)
    return {name: r.median_ms for name, r in t.items()}


def markdown(rows: dict[int, dict[str, float]]) -> str:
    ns = sorted(rows)
    names = list(rows[ns[0]])
    lines = ["## Decode per token (`tools/bench_decode.py`)", "",
             f"One causal attention layer ({HEADS} heads x {DIM} dims, batch 1, fp32) decoding one token after a "
             "context of N tokens; median ms per token of 200 steps, side by side. Softmax writes the token into a "
             "preallocated KV cache and attends over N + 1 keys; ptool's linear kernels carry the (S, z) state, "
             "whose size does not depend on N, through `RecurrentDecoder` (eager torch, and its exported graph on "
             "ONNX Runtime).", "",
             "| decode step | " + " | ".join(f"N={n // 1024}k" for n in ns)
             + f" | t({ns[-1] // 1024}k)/t({ns[0] // 1024}k) |",
             "|---|" + "---:|" * (len(ns) + 1)]
    for name in names:
        ms = [rows[n][name] for n in ns]
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in ms) + f" | {ms[-1] / ms[0]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    rows = {}
    for n in CONTEXTS:
        rows[n] = decode_row(n)
        log(f"N={n}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[n].items()))
    md = markdown(rows)
    print(md if a.no_write else write_section("attention_decode", md, {"rows": rows}))


if __name__ == "__main__":
    main()
