"""ptool's default TVM CPU schedules: which kernels they take, that the schedule took, and numerics."""

from __future__ import annotations

import re

import pytest
import torch

from ptool.backends import compile_module
from ptool.verify import compare
from tests.models import zoo

pytestmark = pytest.mark.tvm

MAX_REL_ERROR = 1e-4
"""Same function as eager torch in float32 (fast math included): rounding only."""


@pytest.fixture(scope="module")
def target():
    from ptool.backends.tvm_host import host_target

    return host_target()


def _legalized(fixture: zoo.Fixture, target, fast_math: bool = True):
    """The fixture's Relax module after (fast math and) legalization + fusion, before scheduling."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.torch import from_exported_program

    from ptool.backends import tvm_schedules

    mod = from_exported_program(fixture.export(), keep_params_as_input=False)
    with target:
        passes = ([tvm_schedules.fast_math_pass()] if fast_math else []) + cpu.legalize_passes(target)
        return tvm.transform.Sequential(passes)(mod)


def _loop_kinds(func) -> set[str]:
    """The loop kinds in a PrimFunc's TVMScript (0.27 has no Python TIR visitor)."""
    text = func.script()
    return {kind for kind in ("parallel", "vectorized", "unroll") if f"T.{kind}(" in text}


@pytest.fixture(scope="module")
def tiny_bert():
    return zoo.bert()


@pytest.fixture(scope="module")
def small_cnn():
    return zoo.resnet()


@pytest.fixture(scope="module")
def legalized(target):
    """Legalized module per fixture name, built once (imports cost seconds)."""
    cache = {}

    def get(fixture: zoo.Fixture):
        if fixture.name not in cache:
            cache[fixture.name] = _legalized(fixture, target)
        return cache[fixture.name]

    return get


@pytest.mark.parametrize("model, heavy", [("tiny_bert", ("matmul",)), ("small_cnn", ("conv2d", "matmul"))])
def test_heavy_kernels_get_the_matmul_rule_and_the_schedule_takes(model, heavy, request, target, legalized):
    from ptool.backends import tvm_schedules

    mod = legalized(request.getfixturevalue(model))
    chosen = tvm_schedules.rule_assignments(mod, target)
    heavy_funcs = [name for name in chosen if any(op in name for op in heavy)]
    assert heavy_funcs, chosen
    assert {chosen[name] for name in heavy_funcs} == {"MatmulRule"}, chosen

    with target:
        scheduled = tvm_schedules.schedule_pass(target)(mod)
    for name in heavy_funcs:
        func = scheduled[name]
        assert func.attrs["tirx.is_scheduled"]
        kinds = _loop_kinds(func)
        assert kinds == {"parallel", "vectorized", "unroll"}, (name, kinds, func)  # unroll: the tile rows


def test_bert_matmul_kernels_by_shape(tiny_bert, target, legalized):
    """Every dense and batched matmul of the tiny BERT (projections, FFN, QK^T, PV) is taken."""
    from ptool.backends import tvm_schedules

    chosen = tvm_schedules.rule_assignments(legalized(tiny_bert), target)
    matmuls = {name: rule for name, rule in chosen.items() if "matmul" in name}
    # 2-D dense (+ bias / GELU / tanh epilogues) and the two 3-D attention products
    assert len(matmuls) >= 4, chosen
    # the pooler's (batch 2) dense is narrow but still a matmul; everything else is elementwise or a
    # reduction that dlight takes
    assert set(matmuls.values()) == {"MatmulRule"}, matmuls
    assert chosen.get("layer_norm") == "Reduction"


def test_matmul_rule_declines_non_matmul_reductions(tiny_bert, target, legalized):
    from ptool.backends.tvm_schedules import MatmulRule

    mod = legalized(tiny_bert)
    rule = MatmulRule()
    with target:
        assert rule.apply(mod["layer_norm"], target, False) is None  # sum of squares, not A*B


def test_schedule_pass_is_idempotent(tiny_bert, target, legalized):
    import tvm_ffi

    from ptool.backends import tvm_schedules

    with target:
        once = tvm_schedules.schedule_pass(target)(legalized(tiny_bert))
        twice = tvm_schedules.schedule_pass(target)(once)
    assert tvm_ffi.structural_equal(once, twice)


@pytest.mark.parametrize("model", ["tiny_bert", "small_cnn"])
def test_scheduled_results_equal_unscheduled_and_torch(model, request):
    fixture = request.getfixturevalue(model)
    args, kwargs = fixture.example_inputs, fixture.example_kwargs
    reference = fixture.run()
    fast = compile_module(fixture.model, "tvm", args, kwargs)  # the default: schedules + fast math
    plain = compile_module(fixture.model, "tvm", args, kwargs, schedules=False, fast_math=False)
    assert fast.options["schedules"] and fast.options["fast_math"]
    fast_out, plain_out = fast(*args, **kwargs), plain(*args, **kwargs)
    assert compare(reference, fast_out).max_rel_error <= MAX_REL_ERROR
    assert compare(reference, plain_out).max_rel_error <= MAX_REL_ERROR
    assert compare(plain_out, fast_out).max_rel_error <= MAX_REL_ERROR
    held_args, held_kwargs = fixture.heldout()
    assert fast.verify(*held_args, **held_kwargs).max_rel_error <= MAX_REL_ERROR


def test_fast_math_gelu_softmax_tanh_within_bound():
    """TVM's polynomial exp/erf/tanh against torch's libm-accurate ones, over their useful range."""

    class Ops(torch.nn.Module):
        def forward(self, x, s):
            return torch.nn.functional.gelu(x), torch.softmax(s, dim=-1), torch.tanh(x), torch.exp(s)

    x = torch.linspace(-12, 12, 4096).reshape(32, 128)
    s = torch.randn(4, 32, 128, generator=torch.Generator().manual_seed(0)) * 8
    run = compile_module(Ops(), "tvm", (x, s))
    with torch.no_grad():
        ref = Ops()(x, s)
    gelu, softmax, tanh, exp = run(x, s)
    assert (gelu - ref[0]).abs().max() <= 2e-6 * ref[0].abs().max()
    assert (softmax - ref[1]).abs().max() <= 1e-6
    assert (tanh - ref[2]).abs().max() <= 2e-6
    assert ((exp - ref[3]).abs() / ref[3]).max() <= 1e-6


class _LinearResidual(torch.nn.Module):
    """A 2-D linear whose output is reshaped to 3-D before a residual add (BERT's layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x, residual):
        return self.fc(x.reshape(-1, 16)).reshape(x.shape) + residual, residual + 1.0


def _prim_funcs(mod) -> list[str]:
    from tvm import tirx

    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def test_reshape_after_add_puts_the_residual_add_into_the_matmul_kernel(target):
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.torch import from_exported_program

    from ptool.backends import tvm_schedules

    args = (torch.randn(1, 8, 16), torch.randn(1, 8, 16))
    ep = torch.export.export(_LinearResidual().eval(), args)
    with target:
        plain = tvm.transform.Sequential(cpu.legalize_passes(target))(from_exported_program(ep))
        moved = tvm.transform.Sequential([tvm_schedules.reshape_after_add_pass(), *cpu.legalize_passes(target)])(
            from_exported_program(ep))
    kernels = [name for name in _prim_funcs(moved) if "matmul" in name]
    assert len(kernels) == 1 and kernels[0].count("add") == 2, _prim_funcs(moved)  # bias + residual
    assert not any("matmul" in name and name.count("add") == 2 for name in _prim_funcs(plain))


def test_reshape_after_add_is_exact_and_leaves_broadcasting_adds():
    model = _LinearResidual().eval()
    args = (torch.randn(1, 8, 16), torch.randn(1, 8, 16))
    run = compile_module(model, "tvm", args)
    ref = model(*args)
    out = run(*args)
    assert compare(ref, out).max_rel_error <= MAX_REL_ERROR
    assert torch.equal(out[1], ref[1])  # residual + 1.0: a broadcasting add, untouched and exact


class _WideFFN(torch.nn.Module):
    """A reduction long enough (K=512 > k_block=128) for the k-blocked matmul schedule, + GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 512), torch.nn.Linear(512, 256)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_long_reductions_are_k_blocked_and_exact(target):
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.torch import from_exported_program

    from ptool.backends.tvm_schedules import MatmulRule

    torch.manual_seed(0)
    model, x = _WideFFN().eval(), torch.randn(32, 64)
    with target:
        mod = tvm.transform.Sequential(cpu.legalize_passes(target))(
            from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False))
    matmuls = {gv.name_hint: f for gv, f in mod.functions_items() if "matmul" in gv.name_hint}
    split_k = {}
    for name, func in matmuls.items():
        sch = MatmulRule().apply(func, target, False)
        assert sch is not None, name
        # the reduction loop split in blocks of 128: "T.axis.reduce(T.int64(512), ax2_0 * T.int64(128) + ax2_1)"
        blocked = re.search(r"axis\.reduce\([^,]+, \w+ \* T\.int64\(128\) \+", sch.mod["main"].script())
        split_k[name] = blocked is not None
    assert sorted(split_k.values()) == [False, True], split_k  # K=64: one block; K=512: four
    run = compile_module(model, "tvm", (x,))
    assert compare(model(x), run(x)).max_rel_error <= MAX_REL_ERROR


def test_prime_row_counts_get_full_tiles_and_a_predicated_last_one(target):
    # ViT's 197 tokens: no divisor in 4..2; 1-row tiles took twice as long as 4-row tiles
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.torch import from_exported_program

    from ptool.backends.tvm_schedules import MatmulRule

    torch.manual_seed(0)
    model, x = torch.nn.Linear(64, 128).eval(), torch.randn(1, 37, 64)
    with target:
        mod = tvm.transform.Sequential(cpu.legalize_passes(target))(
            from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False))
    (func,) = [f for gv, f in mod.functions_items() if "matmul" in gv.name_hint]
    script = MatmulRule().apply(func, target, False).mod["main"].script()
    assert re.search(r"in T\.unroll\(T\.int64\(4\)\)", script), script  # 4-row tiles ...
    assert "T.where" in script  # ... the 10th of which is cut at row 37
    for rows in (37, 36):  # a cut last tile, and whole tiles
        y = x[:, :rows]
        assert compare(model(y), compile_module(model, "tvm", (y,))(y)).max_rel_error <= MAX_REL_ERROR


class _RowDot(torch.nn.Module):
    """InLine's ``q . kbar``: per head, each row of q against one vector (a batched GEMV)."""

    def forward(self, q, kbar):
        return (q * kbar).sum(-1, keepdim=True)


def test_batched_row_dots_get_one_vector_of_rows_at_a_time(target):
    # dlight's GEMV schedule vectorized 128 rows with the reduction unrolled inside: LLVM was still
    # compiling InLine's kernel after 5 minutes at 128 tokens
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.torch import from_exported_program

    from ptool.backends.tvm_schedules import GemvRule, rule_assignments

    q, k = torch.randn(1, 3, 37, 64), torch.randn(1, 3, 1, 64)
    model = _RowDot().eval()
    with target:
        mod = tvm.transform.Sequential(cpu.legalize_passes(target))(
            from_exported_program(torch.export.export(model, (q, k)), keep_params_as_input=False))
    chosen = rule_assignments(mod, target)
    (name,) = [n for n, rule in chosen.items() if rule == "GemvRule"]
    script = GemvRule().apply(mod[name], target, False).mod["main"].script()
    lanes = [int(n) for n in re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", script)]
    assert lanes == [16], script
    assert re.search(r"T\.parallel\(T\.int64\(9\)\)", script), script  # 3 heads x 3 tiles of 16 rows, fused
    for rows in (37, 5):  # a cut last tile; fewer rows than a vector
        a = q[:, :, :rows]
        assert compare(model(a, k), compile_module(model, "tvm", (a, k))(a, k)).max_rel_error <= MAX_REL_ERROR
