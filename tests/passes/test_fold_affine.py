"""fold-affine: norm affines, constants and the attention scale folded into weights; refusals with reasons."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import ptool
from ptool.frontends.torch_export import capture
from ptool.ir.graph import is_op, op_histogram
from ptool.passes.base import PassContext
from ptool.passes.fold_affine import FoldAffine
from tests.models import zoo

aten = torch.ops.aten
RTOL = 1e-5  # exact passes, fp32: the project's bound for exact rewrites


@functools.cache
def _transformed(name: str, attn: str = "sdpa"):
    """(fixture, transformed module) per model, shared by the tests below (building is the slow part)."""
    fixture = zoo.minilm() if name == "minilm" else getattr(zoo, name)(attn_implementation=attn)
    m2 = ptool.transform(fixture.model, [FoldAffine()], fixture.example_inputs, example_kwargs=fixture.example_kwargs)
    return fixture, m2


def _max_rel(fixture, m2, seed: int) -> float:
    args, kwargs = fixture.inputs(seed)
    with torch.no_grad():
        return ptool.verify.compare(fixture.run((args, kwargs)), m2(*args, **kwargs)).max_rel_error


def _affine_norms(gm) -> int:
    return sum(is_op(n, aten.layer_norm) and any(isinstance(a, torch.fx.Node) for a in n.args[2:4])
               for n in gm.graph.nodes)


def _sdpa_scales(gm) -> list:
    return [n.kwargs.get("scale") for n in gm.graph.nodes if is_op(n, aten.scaled_dot_product_attention)]


# ------------------------------------------------------------------------------ real models
PRE_LN = {  # model -> (norm folds, attention-scale folds, skipped sites)
    "vit": (5, 2, 0),  # 2 x (layernorm_before, layernorm_after) + final LN -> select(CLS) -> classifier
    "gpt2": (4, 2, 3),  # ln_1, ln_2 per block; ln_f refused (lm_head tied to wte); gelu_new's 0.5*x shares x
    "llama": (5, 2, 0),  # input/post-attention RMSNorm weights + final norm -> lm_head; scale through RoPE
}


@pytest.mark.parametrize("name", list(PRE_LN))
def test_pre_ln_models_fold_norms_and_attention_scale_exactly(name):
    fixture, m2 = _transformed(name)
    rec = m2.report["fold-affine"]
    norms, scales, skips = PRE_LN[name]
    assert rec.notes == {"norm-affine": norms, "attention-scale": scales}
    assert rec.rewritten == norms + scales and len(rec.skipped) == skips
    assert set(_sdpa_scales(m2.graph_module)) == {1.0}
    assert rec.params_after < rec.params_before  # gamma/beta are gone
    assert rec.nodes_after <= rec.nodes_before
    assert rec.fidelity.max_rel_error <= RTOL
    assert _max_rel(fixture, m2, seed=7) <= RTOL  # held-out batch
    assert "fold-affine" in str(m2.report)


def test_vit_keeps_no_layernorm_affine():
    _, m2 = _transformed("vit")
    assert op_histogram(m2.graph_module)["aten.layer_norm"] == 5
    assert _affine_norms(m2.graph_module) == 0


def test_gpt2_refusals_name_the_tied_head_and_the_shared_activation_input():
    _, m2 = _transformed("gpt2")
    reasons = {s.site.split()[0]: s.reason for s in m2.report["fold-affine"].skipped}
    assert "tied" in reasons["layer_norm_4"] and "untie_weights" in reasons["layer_norm_4"]
    assert sum("also feeds pow" in r for r in reasons.values()) == 2  # gelu_new: 0.5 * x, x used 3 times
    assert _affine_norms(m2.graph_module) == 1  # only ln_f keeps its affine


def test_llama_query_weight_is_scale_times_weight_times_rmsnorm_gamma():
    """The fold through RoPE is the claimed one: W_q' = s * W_q diag(gamma), checked on the weights."""
    fixture, m2 = _transformed("llama")
    layer = fixture.model.model.layers[0]
    expected = (layer.self_attn.q_proj.weight.double() * layer.input_layernorm.weight.double()
                * layer.self_attn.head_dim ** -0.5)
    got = next(p for n, p in m2.graph_module.named_parameters() if n.endswith("layers.0.self_attn.q_proj.weight"))
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    k_got = next(p for n, p in m2.graph_module.named_parameters() if n.endswith("layers.0.self_attn.k_proj.weight"))
    torch.testing.assert_close(k_got.double(), layer.self_attn.k_proj.weight.double() * layer.input_layernorm.weight.double())


@pytest.mark.parametrize("name", ["vit", "llama"])
def test_eager_attention_loses_its_scale_multiply(name):
    fixture, m2 = _transformed(name, "eager")
    rec = m2.report["fold-affine"]
    assert rec.notes["attention-scale"] == 2 and rec.skipped == []
    softmaxes = [n for n in m2.graph_module.graph.nodes if is_op(n, aten.softmax)]
    for sm in softmaxes:  # softmax(add(matmul, mask)): no mul left between scores and softmax
        add = sm.args[0]
        assert any(is_op(a, aten.matmul) for a in add.args), add.args
    assert rec.fidelity.max_rel_error <= RTOL
    assert _max_rel(fixture, m2, seed=3) <= RTOL


@pytest.mark.parametrize("name", ["bert", "minilm"])
def test_post_ln_bert_refuses_norms_with_the_residual_reason_but_folds_the_scale(name):
    fixture, m2 = _transformed(name)
    rec = m2.report["fold-affine"]
    layers = fixture.model.config.num_hidden_layers
    assert rec.notes == {"attention-scale": layers}
    assert set(_sdpa_scales(m2.graph_module)) == {1.0}
    residual = [s for s in rec.skipped if "residual connection" in s.reason and "post-LN" in s.reason]
    assert len(residual) == 2 * layers  # embeddings LN + every LN but the last
    assert [s.reason for s in rec.skipped if s not in residual] == ["LayerNorm affine: layer_norm_%d is a model output" % (2 * layers)]
    assert _affine_norms(m2.graph_module) == 2 * layers + 1
    assert rec.params_after == rec.params_before
    assert rec.fidelity.max_rel_error <= RTOL
    assert _max_rel(fixture, m2, seed=5) <= RTOL


def _bare_cnn(name: str) -> nn.Module:
    """The zoo's CNN architectures without the zoo's measured BatchNorm statistics, which cost most of
    the build and are irrelevant here: fold-affine leaves BatchNorm to fold-bn."""
    import transformers as t

    if name == "resnet":
        config = t.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                layer_type="bottleneck", num_labels=10)
        return t.ResNetForImageClassification(config).eval()
    config = t.MobileNetV2Config(num_channels=3, image_size=zoo.MOBILENET_IMAGE, depth_multiplier=0.35, num_labels=10)
    return t.MobileNetV2ForImageClassification(config).eval()


@pytest.mark.parametrize("name, size", [("resnet", zoo.IMAGE), ("mobilenet_v2", zoo.MOBILENET_IMAGE)])
def test_cnns_have_nothing_to_fold(name, size):
    gm = capture(_bare_cnn(name), (torch.randn(2, 3, size, size),), {}).graph_module
    before = str(gm.graph)
    result = FoldAffine().run(gm, PassContext())
    assert (result.changed, result.rewritten, result.skipped) == (False, 0, [])
    assert str(gm.graph) == before


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_second_run_changes_nothing(name):
    _, m2 = _transformed(name)
    result = FoldAffine().run(m2.graph_module, PassContext())
    assert result.changed is False and result.rewritten == 0


def test_exact_in_float64():
    fixture = zoo.vit()
    model = fixture.model.double()
    x = fixture.example_inputs[0].double()
    m2 = ptool.transform(model, [FoldAffine()], (x,))
    assert m2.report["fold-affine"].rewritten == 7
    assert m2.report["fold-affine"].fidelity.max_rel_error <= 1e-10
    y = fixture.inputs(4)[0][0].double()
    with torch.no_grad():
        assert ptool.verify.compare(model(y), m2(y)).max_rel_error <= 1e-10


def test_onnxruntime_agrees_with_the_folded_model():
    fixture, m2 = _transformed("vit")
    run = ptool.compile(m2, backend="onnxruntime", example_inputs=fixture.example_inputs)
    args, kwargs = fixture.inputs(2)
    with torch.no_grad():
        assert ptool.verify.compare(m2(*args, **kwargs), run(*args, **kwargs)).max_rel_error <= 1e-4


# ------------------------------------------------------------------------------ small cases
def _run(model: nn.Module, *shapes, fold: FoldAffine | None = None):
    model.eval()
    xs = tuple(torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes))
    m2 = ptool.transform(model, [fold or FoldAffine()], xs)
    rec = m2.report["fold-affine"]
    held = tuple(torch.randn(s, generator=torch.Generator().manual_seed(10 + i)) for i, s in enumerate(shapes))
    with torch.no_grad():
        assert ptool.verify.compare(model(*held), m2(*held)).max_rel_error <= RTOL
    return m2, rec


class _Lambda(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, v in modules.items():
            setattr(self, k, v)

    def forward(self, *xs):
        return self.fn(self, *xs)


def _const(*shape):
    return nn.Parameter(torch.rand(shape, generator=torch.Generator().manual_seed(99)) + 0.5)


@pytest.mark.parametrize("case", ["mul_scalar", "mul_vector", "add_vector", "sub_scalar", "div_scalar", "input_mul"])
def test_linear_constant_folds(case):
    fns = {
        "mul_scalar": lambda m, x: m.lin(x) * 3.0,
        "mul_vector": lambda m, x: m.lin(x) * m.c,
        "add_vector": lambda m, x: m.lin(x) + m.c,
        "sub_scalar": lambda m, x: m.lin(x) - 0.5,
        "div_scalar": lambda m, x: m.lin(x) / 4.0,
        "input_mul": lambda m, x: m.lin(x * m.d),
    }
    model = _Lambda(fns[case], lin=nn.Linear(6, 5), c=_const(5), d=_const(6))
    m2, rec = _run(model, (2, 3, 6))
    assert rec.rewritten == 1 and rec.skipped == []
    assert op_histogram(m2.graph_module).keys() <= {"aten.linear"}


def test_chained_constants_fold_to_a_fixed_point():
    model = _Lambda(lambda m, x: m.lin(x * m.d + 1.0) * 2.0 + m.c, lin=nn.Linear(6, 5), c=_const(5), d=_const(6))
    m2, rec = _run(model, (3, 6))
    assert rec.rewritten == 4 and rec.notes == {"constant-into-producer": 2, "constant-into-consumers": 2}
    assert op_histogram(m2.graph_module).keys() == {"aten.linear"}
    assert FoldAffine().run(m2.graph_module, PassContext()).changed is False


def test_conv_output_and_input_scales_fold_even_with_padding():
    model = _Lambda(lambda m, x: m.conv2(m.conv(x) * m.c) * m.c2, conv=nn.Conv2d(3, 4, 3, padding=1),
                    conv2=nn.Conv2d(4, 4, 3, padding=1, groups=2), c=_const(4, 1, 1), c2=_const(1, 4, 1, 1))
    m2, rec = _run(model, (2, 3, 6, 6))
    assert rec.rewritten == 2 and rec.skipped == []
    assert op_histogram(m2.graph_module).keys() == {"aten.conv2d"}


def test_shift_into_padding_conv_is_refused():
    model = _Lambda(lambda m, x: m.conv(torch.relu(x) + m.c), conv=nn.Conv2d(4, 4, 3, padding=1), c=_const(4, 1, 1))
    _, rec = _run(model, (2, 4, 5, 5))
    (skip,) = rec.skipped
    assert "zero-pads its input" in skip.reason and "not exact" in skip.reason


def test_shared_linear_output_is_refused():
    model = _Lambda(lambda m, x: (lambda y: (y * 2.0, torch.relu(y)))(m.lin(x)), lin=nn.Linear(4, 4))
    _, rec = _run(model, (2, 4))
    (skip,) = rec.skipped
    assert "also feeds relu" in skip.reason


def test_constant_varying_along_another_dim_is_refused():
    model = _Lambda(lambda m, x: m.lin(x) * m.c, lin=nn.Linear(4, 4), c=_const(2, 1, 1))  # per batch row
    _, rec = _run(model, (2, 3, 4))
    (skip,) = rec.skipped
    assert "varies along dims [0]" in skip.reason


def test_runtime_multiplier_is_not_a_site():
    model = _Lambda(lambda m, x: m.lin(x) * x.mean(), lin=nn.Linear(4, 4))
    _, rec = _run(model, (2, 4))
    assert rec.rewritten == 0 and rec.skipped == []


def test_layernorm_with_a_non_linear_reader_is_refused():
    model = _Lambda(lambda m, x: m.lin(m.ln(x)) + torch.tanh(m.ln(x)), ln=nn.LayerNorm(4), lin=nn.Linear(4, 4))
    zoo.randomize_norms(model)
    _, rec = _run(model, (2, 4))
    (skip,) = rec.skipped
    assert "tanh (aten.tanh) reads layer_norm" in skip.reason


def test_tied_weight_is_refused_unless_untie_weights():
    lin = nn.Linear(4, 4, bias=False)
    model = _Lambda(lambda m, x: m.lin(m.ln(x)) + x @ m.lin.weight, ln=nn.LayerNorm(4), lin=lin)
    zoo.randomize_norms(model)
    _, rec = _run(model, (2, 4))
    assert rec.rewritten == 0 and "tied" in rec.skipped[0].reason
    m2, rec = _run(model, (2, 4), fold=FoldAffine(untie_weights=True))
    assert rec.rewritten == 1 and _affine_norms(m2.graph_module) == 0
    # gamma/beta (8) gone; the 4x4 weight duplicated (+16) and a bias W beta added (+4)
    assert rec.params_after == rec.params_before - 8 + 16 + 4


class _TinyAttention(nn.Module):
    def __init__(self, query_act=None, return_q=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.query_act, self.return_q = query_act, return_q

    def forward(self, x):
        q = self.q(x)
        q = self.query_act(q) if self.query_act else q
        scores = torch.softmax(q @ self.k(x).transpose(-1, -2) * 0.25, dim=-1)
        out = scores @ self.v(x)
        return (out, q) if self.return_q else out


@pytest.mark.parametrize("kwargs, reason", [
    ({}, None),
    ({"return_q": True}, "is a model output"),
    ({"query_act": torch.tanh}, "not a linear function of one Linear projection"),
])
def test_eager_attention_scale_conditions(kwargs, reason):
    _, rec = _run(_TinyAttention(**kwargs), (2, 5, 8))
    if reason is None:
        assert rec.notes == {"attention-scale": 1}
    else:
        (skip,) = rec.skipped
        assert skip.reason.startswith("attention scale 0.25:") and reason in skip.reason


def test_options_turn_rules_off():
    fixture, _ = _transformed("vit")
    gm = capture(fixture.model, fixture.example_inputs).graph_module
    result = FoldAffine(norms=False, attention_scale=False).run(gm, PassContext())
    assert result.rewritten == 0 and _affine_norms(gm) == 5
    assert FoldAffine(norms=False).spec() == "fold-affine:norms=false"


def test_norms_off_keeps_llama_rmsnorm_weights():
    fixture, _ = _transformed("llama")
    gm = capture(fixture.model, fixture.example_inputs, fixture.example_kwargs).graph_module
    result = FoldAffine(norms=False).run(gm, PassContext())
    assert result.notes == {"attention-scale": 2}
