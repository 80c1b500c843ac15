"""The shift-add TIR kernels equal ``ptool.ops.shift_arith`` bit for bit, alone and inside
the TVM backend (``custom_convert_map`` lowering of the ``ptool_shift`` ops)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from ptool.ops import shift_arith as arith

pytestmark = pytest.mark.tvm

tvm = pytest.importorskip("tvm")
shiftadd = pytest.importorskip("ptool.backends.tvm_kernels.shiftadd")


@pytest.fixture(scope="module")
def kernels():
    """Built kernels, one per (builder, shape), shared by the module (each build costs ~0.2 s)."""
    cache = {}

    def get(builder, *shape):
        key = (builder, shape)
        if key not in cache:
            cache[key] = shiftadd.compile_kernel(getattr(shiftadd, builder)(*shape))
        return cache[key]

    return get


def _run(executable, inputs, out_shape):
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(t.contiguous().numpy(), dev) for t in inputs]
    out = tvm.runtime.tensor(torch.zeros(out_shape, dtype=torch.int32).numpy(), dev)
    executable(*args, out)
    return torch.from_numpy(out.numpy())


def _codes(gen, terms, n, k, exp_low=0, exp_high=arith.MAX_EXP):
    sign = torch.randint(-1, 2, (terms, n, k), generator=gen).to(torch.int8)
    exp = torch.randint(exp_low, exp_high + 1, (terms, n, k), generator=gen).to(torch.int8)
    return sign, exp


def _k_major(codes):
    return codes.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# matshift / matadd


@pytest.mark.parametrize(
    "m, n, k, terms, symbolic",
    [
        (1, 1, 1, 1, False),
        (5, 7, 13, 1, False),  # nothing divides the tiles or the 16 lanes
        (33, 48, 129, 2, True),  # K not a multiple of anything; rows symbolic
        (64, 96, 250, 2, False),
        (17, 40, 31, 2, True),  # N % 16 != 0: scalar N loop
    ],
)
def test_matshift_is_exact(kernels, m, n, k, terms, symbolic):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    sign, exp = _codes(gen, terms, n, k)
    want = arith.matshift_reference(x, list(zip(sign, exp)))
    got = _run(kernels("matshift", None if symbolic else m, n, k, terms), [x, _k_major(sign), _k_major(exp)], (m, n))
    assert torch.equal(got, want)


def test_matshift_symbolic_rows_take_any_count(kernels):
    gen = torch.Generator().manual_seed(1)
    sign, exp = _codes(gen, 2, 48, 129)
    for m in (1, 8, 9, 100):
        x = torch.randint(-127, 128, (m, 129), generator=gen, dtype=torch.int8)
        got = _run(kernels("matshift", None, 48, 129, 2), [x, _k_major(sign), _k_major(exp)], (m, 48))
        assert torch.equal(got, arith.matshift_reference(x, list(zip(sign, exp))))


@pytest.mark.parametrize("exp_value", [0, arith.MAX_EXP])
def test_matshift_extremes(kernels, exp_value):
    """Largest magnitudes: x = +-127, every exponent at an edge, sign +1 / -1 / 0 blocks."""
    m, n, k = 8, 32, 300
    x = torch.full((m, k), 127, dtype=torch.int8)
    x[1::2] = -127
    sign = torch.ones(2, n, k, dtype=torch.int8)
    sign[:, 8:16] = -1
    sign[:, 16:20] = 0
    exp = torch.full((2, n, k), exp_value, dtype=torch.int8)
    want = arith.matshift_reference(x, list(zip(sign, exp)))
    assert want.abs().max() == 2 * 127 * k * 2**exp_value  # the edge is really reached
    got = _run(kernels("matshift", None, n, k, 2), [x, _k_major(sign), _k_major(exp)], (m, n))
    assert torch.equal(got, want)


@pytest.mark.parametrize("m, n, k, terms", [(5, 7, 13, 1), (33, 64, 129, 2)])
def test_matadd_is_exact_ternary(kernels, m, n, k, terms):
    gen = torch.Generator().manual_seed(k)
    x = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    sign, _ = _codes(gen, terms, n, k)
    want = arith.matshift_reference(x, [(s, torch.zeros_like(s)) for s in sign])
    assert torch.equal(_run(kernels("matadd", None, n, k, terms), [x, _k_major(sign)], (m, n)), want)


def test_bad_terms_is_a_clear_error():
    with pytest.raises(ValueError, match="terms must be 1 or 2"):
        shiftadd.matshift(4, 16, 16, 3)


# ---------------------------------------------------------------------------------------------
# binary codes


def _signs(gen, *shape):
    return torch.randint(0, 2, shape, generator=gen) * 2 - 1


@pytest.mark.parametrize("bits", [16, 32, 40, 64])
@pytest.mark.parametrize("n", [48, 20])
def test_masked_accumulate_is_exact(kernels, bits, n):
    gen = torch.Generator().manual_seed(bits + n)
    groups, j = 3, 37
    h = _signs(gen, groups, j, bits)
    v = torch.randint(-127, 128, (groups, j, n), generator=gen, dtype=torch.int8)
    want = torch.stack([arith.masked_accumulate_reference(h[g], v[g]) for g in range(groups)])
    got = _run(kernels("masked_accumulate", None, None, n, bits), [arith.pack_codes(h), v], (groups, bits, n))
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [16, 32, 40, 64])
def test_sign_matmul_is_exact(kernels, bits):
    gen = torch.Generator().manual_seed(bits)
    groups, m, n = 2, 19, 48
    h = _signs(gen, groups, m, bits)
    w = torch.randint(-(2**20), 2**20, (groups, bits, n), generator=gen, dtype=torch.int32)
    want = torch.stack([(h[g].long() @ w[g].long()).to(torch.int32) for g in range(groups)])
    got = _run(kernels("sign_matmul", None, None, n, bits), [arith.pack_codes(h), w], (groups, m, n))
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [16, 32, 40, 64])
@pytest.mark.parametrize("n", [48, 21])
def test_code_dot_is_exact(kernels, bits, n):
    gen = torch.Generator().manual_seed(bits * n)
    groups, m = 2, 19
    q = arith.pack_codes(_signs(gen, groups, m, bits))
    k = arith.pack_codes(_signs(gen, groups, n, bits))
    want = torch.stack([arith.code_dot_reference(q[g], k[g], bits) for g in range(groups)])
    got = _run(kernels("code_dot", None, m, n, bits), [q, k], (groups, m, n))
    assert torch.equal(got, want)


def test_code_dot_identical_and_opposite_codes(kernels):
    bits = 40
    h = _signs(torch.Generator().manual_seed(0), 1, 4, bits)
    q = arith.pack_codes(h)
    both = torch.cat([q, arith.pack_codes(-h)], dim=1)  # (1, 8, W): the codes, then their negations
    got = _run(kernels("code_dot", 1, 4, 8, bits), [q, both], (1, 4, 8))
    assert torch.equal(got.diagonal(dim1=1, dim2=2), torch.full((1, 4), bits, dtype=torch.int32))
    assert torch.equal(got[:, :, 4:].diagonal(dim1=1, dim2=2), torch.full((1, 4), -bits, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# the machine code: shifts, selects and adds, no vector multiplies


def _instructions(executable) -> set[str]:
    asm = executable.mod.inspect_source("asm")
    return {line.split()[0] for line in asm.splitlines() if line.startswith("\t") and not line.split()[0].startswith(".")}


def _cpu_flags() -> set[str]:
    text = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":")[1].split()}


@pytest.mark.parametrize("builder, shape", [
    ("matshift", (None, 64, 100, 2)),
    ("matadd", (None, 64, 100, 2)),
    ("masked_accumulate", (None, None, 48, 64)),
    ("sign_matmul", (None, None, 48, 64)),
    ("code_dot", (None, None, 48, 64)),
])
def test_no_vector_multiplies(kernels, builder, shape):
    if "avx512f" not in _cpu_flags():
        pytest.skip("the instruction check is written for AVX-512 hosts")
    ops = _instructions(kernels(builder, *shape))
    assert not {op for op in ops if op.startswith(("vpmull", "vpmadd", "vpdp", "vpmuldq", "vpmuludq"))}
    if builder == "matshift":
        assert "vpsllvd" in ops  # the variable shift is the product
    if builder == "code_dot" and "avx512_vpopcntdq" in _cpu_flags():
        assert "vpopcntd" in ops


# ---------------------------------------------------------------------------------------------
# inside the TVM backend


class _ShiftLayer(torch.nn.Module):
    def __init__(self, n, k, terms, *, ternary=False, bias=True, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        sign, exp = _codes(gen, terms, n, k)
        self.register_buffer("sign", sign)
        self.register_buffer("exp", torch.zeros_like(exp) if ternary else exp)
        self.alpha = torch.nn.Parameter(torch.rand(n, generator=gen) * 0.01)
        self.bias = torch.nn.Parameter(torch.randn(n, generator=gen)) if bias else None

    def forward(self, x):
        return torch.ops.ptool_shift.shift_linear(x, self.sign, self.exp, self.alpha, self.bias)


def _kernel_names(module, args):
    """The functions the Relax module calls, after the ptool_shift ops are converted."""
    from tvm.relax.frontend.torch import from_exported_program

    from ptool.backends.tvm_kernels.relax_ops import convert_map

    ep = torch.export.export(module, args, strict=False)
    mod = from_exported_program(ep, keep_params_as_input=False, custom_convert_map=convert_map(ep))
    return {gv.name_hint for gv in mod.get_global_vars()}


@pytest.mark.parametrize("ternary", [False, True])
def test_shift_linear_on_tvm_matches_torch(ternary):
    import ptool.ops.shift  # noqa: F401  (registers the op)
    from ptool.backends import compile_module

    layer = _ShiftLayer(48, 40, 2, ternary=ternary).eval()
    x = torch.randn(2, 5, 40)
    x[0, 0, :4] = torch.tensor([127.0, 0.5, 1.5, 2.5])  # sx = 1: ties that round half to even
    names = _kernel_names(layer, (x,))
    assert ("ptool_matadd" in names) == ternary and ("ptool_matshift" in names) != ternary
    run = compile_module(layer, "tvm", (x,), frontend="exported_program")  # no fallback: the kernel path
    with torch.no_grad():
        want = layer(x)
    got = run(x)
    # The accumulator is exact; the epilogue is the same float32 ops in the same order, so the
    # bound is rounding (measured: 0 here, <= 6e-8 through the shift-linear pass below).
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_shift_linear_accumulator_is_exact_through_the_backend():
    """``alpha = 1``, no bias and integer rows with max 127 (``sx = 1``): the output is ``acc``."""
    import ptool.ops.shift  # noqa: F401
    from ptool.backends import compile_module

    layer = _ShiftLayer(64, 300, 2, bias=False, seed=3).eval()
    with torch.no_grad():
        layer.alpha.fill_(1.0)
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(-127, 128, (3, 300), generator=gen).float()
    x[:, 0] = 127.0
    run = compile_module(layer, "tvm", (x,), frontend="exported_program")
    acc = arith.matshift_reference(x.to(torch.int8), list(zip(layer.sign, layer.exp)))
    assert acc.abs().max() < 2**24  # exact in float32
    assert torch.equal(run(x), acc.float())


def test_shift_linear_pass_compiles_to_the_kernel():
    import ptool

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(4, 32)
    m2 = ptool.transform(model, passes=["shift-linear"], example_inputs=(x,))
    run = ptool.compile(m2, backend="tvm", example_inputs=(x,), frontend="exported_program")
    with torch.no_grad():
        want = m2(x)
    torch.testing.assert_close(run(x), want, rtol=1e-6, atol=1e-6)


class _BinaryAttention(torch.nn.Module):
    def __init__(self, bits):
        super().__init__()
        self.bits = bits

    def forward(self, q_codes, k_codes, v, keep):
        return torch.ops.ptool_shift.binary_attention(q_codes, k_codes, v, keep, self.bits)


@pytest.mark.parametrize("bits", [16, 40])
def test_binary_attention_on_tvm_matches_reference(bits):
    import ptool.ops.binary  # noqa: F401  (registers the op)
    from ptool.backends import compile_module

    gen = torch.Generator().manual_seed(bits)
    b, h, n, m, dv = 2, 3, 7, 9, 20
    q = arith.pack_codes(_signs(gen, b, h, n, bits))
    k = arith.pack_codes(_signs(gen, b, h, m, bits))
    v = torch.randn(b, h, m, dv, generator=gen)
    keep = torch.ones(b, m, dtype=torch.bool)
    keep[1, 6:] = False  # right padding
    module = _BinaryAttention(bits)
    assert {"ptool_masked_accumulate", "ptool_sign_matmul"} <= _kernel_names(module, (q, k, v, keep))
    run = compile_module(module, "tvm", (q, k, v, keep), frontend="exported_program")
    want = arith.binary_attention_reference(q, k, v, keep, bits)
    # integer sums exact; one float32 divide and multiply per output, as in the reference
    torch.testing.assert_close(run(q, k, v, keep), want, rtol=1e-6, atol=1e-6)
