"""Shift and additive TVM kernels against the float and int8 matmuls they replace, on this CPU.

Writes the "Shift-add kernels" section of ``BENCHMARKS.md`` (key ``shiftadd_kernels``).

Protocol: one process, every candidate of a size timed round-robin (``measure_interleaved``),
median of the calls; ratios are against torch eager fp32 of the same size. Two threads
everywhere (torch ``set_num_threads(2)``, ORT ``intra_op_num_threads=2``, TVM ``num-cores=2`` and
``TVM_NUM_THREADS=2``).
Every integer candidate is checked equal to the arith.py reference (or to the others) before
timing. Idle pool threads sleep (``OMP_WAIT_POLICY=PASSIVE``, ``TVM_THREAD_POOL_SPIN_COUNT=0``)
so torch's and TVM's pools do not steal each other's cores.

Shift linear, ``(M, K) x (K, N)`` (MiniLM MLP, BERT-base MLP, a square):
- torch fp32 ``F.linear``; TVM fp32 matmul (same TE + schedule as the shift kernel);
- int8 matmuls: torch ``_int_mm`` (int8 -> int32), ORT ``MatMulInteger`` (s8 x s8 -> int32),
  TVM int8 matmul (same schedule);
- TVM ``matshift`` with T = 1 and T = 2 power-of-two terms, TVM ``matadd`` (ternary).

Binary attention, per (batch x head) group G: ``kv = h_k^T v`` (``masked_accumulate``, codes
``(G, J, bits)`` packed, int8 ``v (G, J, Dv)``) and the Hamming scores ``h_q h_k^T``
(``code_dot``), against torch fp32 ``bmm`` of the +-1 matrices.

    .venv/bin/python tools/bench_shiftadd.py [--repeat 40]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

# Two thread pools (torch's OpenMP, TVM's) share the cores in one process: idle workers must
# sleep, not spin, or each pool's spinning steals the other's time (set before they start).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
# TVM's pool would otherwise run half the hardware threads (1 on a 2-core host without SMT)
os.environ.setdefault("TVM_NUM_THREADS", "2")  # = THREADS

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _sections import write_section  # noqa: E402

from ptool.benchmark import measure_interleaved  # noqa: E402
from ptool.ops import shift_arith as arith  # noqa: E402

THREADS = 2
LINEAR_SIZES = {  # label -> (M, K, N)
    "MiniLM fc1 128x384x1536": (128, 384, 1536),
    "MiniLM fc2 128x1536x384": (128, 1536, 384),
    "BERT-base fc1 128x768x3072": (128, 768, 3072),
    "square 512x512x512": (512, 512, 512),
}
ATTENTION_SIZES = {  # label -> (G, J tokens, Dv, bits)
    "MiniLM 12 heads, 128 tokens, Dv 32, 16 bits": (12, 128, 32, 16),
    "12 heads, 512 tokens, Dv 64, 64 bits": (12, 512, 64, 64),
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class TvmKernel:
    """A built PrimFunc bound to fixed inputs: ``kernel()`` runs it once."""

    def __init__(self, func, inputs: list[torch.Tensor], out_shape: tuple[int, ...], out_dtype: str):
        import tvm

        from ptool.backends.tvm_host import host_target
        from ptool.backends.tvm_kernels.shiftadd import compile_kernel

        dev = tvm.cpu()
        self.executable = compile_kernel(func, host_target(num_cores=THREADS))
        self.args = [tvm.runtime.tensor(t.contiguous().numpy(), dev) for t in inputs]
        self.out = tvm.runtime.tensor(np.zeros(out_shape, dtype=out_dtype), dev)

    def __call__(self) -> None:
        self.executable(*self.args, self.out)

    def result(self) -> torch.Tensor:
        return torch.from_numpy(self.out.numpy())


def ort_matmul_integer(x_int: torch.Tensor, w_int_kn: torch.Tensor):
    """An ORT session running ``MatMulInteger(x, W)`` (s8 x s8 -> int32) with W an initializer."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k = x_int.shape
    n = w_int_kn.shape[1]
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "mmi",
        [helper.make_tensor_value_info("x", TensorProto.INT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(w_int_kn.numpy(), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "mmi.onnx"
        onnx.save(model, str(path))
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {"x": x_int.numpy()}
    return lambda: sess.run(None, feed)[0]


def linear_candidates(m: int, k: int, n: int) -> dict:
    from ptool.backends.tvm_kernels import shiftadd

    gen = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    x_int = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    sign = torch.randint(-1, 2, (2, n, k), generator=gen, dtype=torch.int8)
    exp = torch.randint(0, arith.MAX_EXP + 1, (2, n, k), generator=gen, dtype=torch.int8)
    exp[1] = torch.clamp(exp[0] - 1, min=0)  # second term smaller: |W_int| <= 96 fits int8
    sign[1] = torch.where(exp[0] == 0, 0, sign[1])
    w_int = (arith.shift_weight_int(sign[0], exp[0]) + arith.shift_weight_int(sign[1], exp[1])).to(torch.int8)
    w_int_kn = w_int.T.contiguous()
    km = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  (T, N, K) -> k-major (T, K, N)

    want2 = arith.matshift_reference(x_int, list(zip(sign, exp)))
    want1 = arith.matshift_reference(x_int, [(sign[0], exp[0])])
    want_ternary = arith.matshift_reference(x_int, [(sign[0], torch.zeros_like(exp[0]))])

    tvm_f32 = TvmKernel(shiftadd.matmul(m, n, k, "float32"), [x, w.T], (m, n), "float32")
    tvm_i8 = TvmKernel(shiftadd.matmul(m, n, k, "int8"), [x_int, w_int_kn], (m, n), "int32")
    shift2 = TvmKernel(shiftadd.matshift(m, n, k, 2), [x_int, km(sign), km(exp)], (m, n), "int32")
    shift1 = TvmKernel(shiftadd.matshift(m, n, k, 1), [x_int, km(sign[:1]), km(exp[:1])], (m, n), "int32")
    ternary = TvmKernel(shiftadd.matadd(m, n, k, 1), [x_int, km(sign[:1])], (m, n), "int32")
    ort_mmi = ort_matmul_integer(x_int, w_int_kn)

    checks = {  # every integer path gives the reference accumulator
        "tvm matshift T=2": (shift2, want2), "tvm matshift T=1": (shift1, want1),
        "tvm matadd ternary": (ternary, want_ternary), "tvm int8 matmul": (tvm_i8, want2),
    }
    for name, (kernel, want) in checks.items():
        kernel()
        assert torch.equal(kernel.result(), want), name
    assert torch.equal(torch.from_numpy(ort_mmi()), want2), "ort MatMulInteger"
    assert torch.equal(torch._int_mm(x_int, w_int_kn), want2), "torch _int_mm"
    tvm_f32()
    torch.testing.assert_close(tvm_f32.result(), x @ w.T, rtol=1e-4, atol=1e-3)

    return {
        "torch fp32 (F.linear)": lambda: torch.nn.functional.linear(x, w),
        "tvm fp32 matmul": tvm_f32,
        "torch int8 _int_mm": lambda: torch._int_mm(x_int, w_int_kn),
        "ort int8 MatMulInteger": ort_mmi,
        "tvm int8 matmul": tvm_i8,
        "tvm matshift T=2": shift2,
        "tvm matshift T=1": shift1,
        "tvm matadd (ternary)": ternary,
    }


def attention_candidates(groups: int, tokens: int, dv: int, bits: int) -> dict:
    from ptool.backends.tvm_kernels import shiftadd

    gen = torch.Generator().manual_seed(groups * tokens + bits)
    h_k = torch.randint(0, 2, (groups, tokens, bits), generator=gen) * 2 - 1
    h_q = torch.randint(0, 2, (groups, tokens, bits), generator=gen) * 2 - 1
    v_int = torch.randint(-127, 128, (groups, tokens, dv), generator=gen, dtype=torch.int8)
    k_codes, q_codes = arith.pack_codes(h_k), arith.pack_codes(h_q)
    h_k_t, h_q_f, v_f = h_k.float().transpose(1, 2).contiguous(), h_q.float(), v_int.float()

    macc = TvmKernel(shiftadd.masked_accumulate(groups, tokens, dv, bits), [k_codes, v_int], (groups, bits, dv), "int32")
    cdot = TvmKernel(shiftadd.code_dot(groups, tokens, tokens, bits), [q_codes, k_codes], (groups, tokens, tokens),
                     "int32")
    macc()
    cdot()
    assert torch.equal(macc.result(), torch.stack([arith.masked_accumulate_reference(h_k[g], v_int[g])
                                                   for g in range(groups)]))
    assert torch.equal(cdot.result(), (h_q @ h_k.transpose(1, 2)).to(torch.int32))
    return {
        "torch fp32 bmm h_k^T v": lambda: torch.bmm(h_k_t, v_f),
        "tvm masked_accumulate": macc,
        "torch fp32 bmm h_q h_k^T": lambda: torch.bmm(h_q_f, h_k_t),
        "tvm code_dot (popcount)": cdot,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    load_at_start = os.getloadavg()[0]
    from ptool.backends.tvm_host import host_cpu

    data: dict = {"threads": THREADS, "load_average_at_start": load_at_start, "cpu": host_cpu(), "linear": {}, "attention": {}}
    lines = [
        "## Shift-add kernels",
        "",
        f"`tools/bench_shiftadd.py`: TVM TIR kernels of `ptool/backends/tvm_kernels/shiftadd.py` (no tuning, "
        f"one hand schedule: 8-row x 32-column tiles, 16-lane int32 vectors, tiles in parallel) against the "
        f"matmuls they replace; {THREADS} threads everywhere, LLVM target `{host_cpu()}`; candidates of one size "
        "timed round-robin in one process, median ms (p10 beside it; load average when the run started: "
        f"{load_at_start:.1f} on {os.cpu_count()} cores, so absolute figures are inflated and noisy when "
        "that exceeds the core count), ratio = torch fp32 time / candidate time (> 1: faster). "
        "Every integer candidate was checked bit-exact against `arith.py` before timing.",
        "",
        "### Shift linear (int8 activations, power-of-two weights) vs float and int8 matmul",
        "",
    ]
    for label, (m, k, n) in LINEAR_SIZES.items():
        log(f"linear {label}")
        cands = linear_candidates(m, k, n)
        timings = measure_interleaved(cands, warmup=3, repeat=args.repeat)
        data["linear"][label] = {name: t.median_ms for name, t in timings.items()}
        base = timings["torch fp32 (F.linear)"].median_ms
        lines += [f"**{label}** ({m * k * n / 1e6:.1f} M multiply-adds replaced)", "",
                  "| candidate | median ms | p10 ms | vs torch fp32 |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {t.median_ms:.3f} | {t.p10_ms:.3f} | {base / t.median_ms:.2f}x |"
                  for name, t in timings.items()]
        lines.append("")
    lines += ["### Binary-attention additive kernels vs float matmul of the +-1 codes", ""]
    for label, (g, j, dv, bits) in ATTENTION_SIZES.items():
        log(f"attention {label}")
        cands = attention_candidates(g, j, dv, bits)
        timings = measure_interleaved(cands, warmup=3, repeat=args.repeat * 2)
        data["attention"][label] = {name: t.median_ms for name, t in timings.items()}
        lines += [f"**{label}**", "", "| candidate | median ms | p10 ms | vs its torch fp32 bmm |", "|---|---:|---:|---:|"]
        names = list(timings)
        for i, name in enumerate(names):
            base = timings[names[i - i % 2]].median_ms
            t = timings[name]
            lines.append(f"| {name} | {t.median_ms:.3f} | {t.p10_ms:.3f} | {base / t.median_ms:.2f}x |")
        lines.append("")
    lines += _verdict(data)
    section = write_section("shiftadd_kernels", "\n".join(lines), data)
    print(section)
    return 0


def _verdict(data: dict) -> list[str]:
    """A plain reading of the numbers just measured (who wins, by how much)."""
    out = ["### Reading", ""]
    for label, row in data["linear"].items():
        best_int8 = min(("torch int8 _int_mm", "ort int8 MatMulInteger", "tvm int8 matmul"), key=row.get)
        out.append(
            f"- {label}: matshift T=2 is {row['tvm matshift T=2'] / row['torch fp32 (F.linear)']:.1f}x the time of "
            f"torch fp32 and {row['tvm matshift T=2'] / row[best_int8]:.1f}x that of the fastest int8 matmul "
            f"({best_int8}); the same-schedule TVM fp32 matmul takes "
            f"{row['tvm fp32 matmul'] / row['tvm matshift T=2']:.2f}x the time of matshift T=2."
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
