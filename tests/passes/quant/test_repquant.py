"""repquant: per-channel post-norm quantization re-parameterized into per-tensor, exactly.

The formulas on known values; the float model unchanged on a pre-LN ViT, GPT-2 (Conv1D
consumers) and Llama (decomposed RMSNorm, bias-free Linears); the quantized model unchanged too,
in float64, to 1e-10: per-channel fake quantization of the old norm output followed by the old
Linear equals per-tensor fake quantization of the new output followed by the new Linear. Also:
``aten.rms_norm``, an RMSNorm whose weight fold-affine already took, the re-parameterized Llama
on ONNX Runtime. Post-LN BERT and a tied ``lm_head`` are skipped with their reasons.
"""

import pytest
import torch
from torch import nn

import ptool
from ptool.errors import PassError
from ptool.frontends.torch_export import capture
from ptool.ir.graph import attr_tensor, is_op
from ptool.ir.record import record_values
from ptool.options import build_pass, split_spec
from ptool.passes.fold_affine import FoldAffine
from ptool.passes.fold_affine._layers import as_layer
from ptool.passes.quant.quantizers import fake_quantize
from ptool.passes.quant.repquant import RepQuant, reparameterize
from tests.models import zoo

aten = torch.ops.aten
CALIBRATION_BATCHES = 4


def _transform(fixture, *passes):
    return ptool.transform(fixture.model, list(passes), fixture.example_inputs, example_kwargs=fixture.example_kwargs,
                           calibration=fixture.batches(CALIBRATION_BATCHES))


def test_reparameterize_on_known_values():
    rep = reparameterize(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 10.0, 21.0]), bits=8)
    assert rep.tensor_scale == 2.0 and rep.tensor_zero_point == 10.0  # round(31 / 3)
    assert rep.ratio.tolist() == [0.5, 1.0, 1.5]
    # b = (-z s) / r - (-z~ s~) = s~ (z~ - z)
    assert rep.shift.tolist() == [20.0, 0.0, -22.0]
    assert torch.equal(rep.shift, (-rep.zero_point * rep.scale) / rep.ratio + rep.tensor_zero_point * rep.tensor_scale)


@pytest.mark.parametrize(("model", "sites", "observer"), [("vit", 5, "minmax"), ("gpt2", 4, "percentile")])
def test_float_model_is_unchanged(model, sites, observer):
    f = zoo.FIXTURES[model]()
    m2 = _transform(f, RepQuant(observer=observer))  # the manager checks Close(rtol=1e-5) on 5 batches
    rec = m2.report["repquant"]
    assert rec.rewritten == sites
    for note in rec.notes["sites"].values():
        assert note["scale"] > 0 and note["zero_point"] == round(note["zero_point"])
        assert note["ratio_min"] < 1 < note["ratio_max"]  # the grids really differed per channel
    args, kwargs = f.inputs(9)
    fid = ptool.verify.compare(f.run((args, kwargs)), m2(*args, **kwargs))
    assert fid.max_rel_error <= 1e-5, fid
    if model == "gpt2":  # ln_f feeds the lm_head, whose weight is the (tied) embedding
        (skip,) = rec.skipped
        assert "ln_f" in skip.site and "tied" in skip.reason


@pytest.mark.parametrize("model", ["vit", "gpt2", "llama"])
def test_quantized_model_is_unchanged_bit_for_bit_in_float64(model):
    f = zoo.FIXTURES[model]()
    f.model.double()
    batches = [(tuple(a.double() if a.is_floating_point() else a for a in args), kwargs)
               for args, kwargs in f.batches(CALIBRATION_BATCHES + 1)]
    checked = _check_quantized_equivalence(f.model, batches)
    assert checked == {"gpt2": 4, "vit": 9, "llama": 11}[model]  # every consumer: GPT-2 fuses qkv into one Conv1D


def _check_quantized_equivalence(model, batches):
    """Per-channel fake quant of each old norm output -> old Linear == per-tensor of the new -> new Linear.

    Returns how many consumer Linears were compared.
    """
    before = capture(model, *batches[0]).graph_module
    m2 = ptool.transform(model, [RepQuant(bits=4)], batches[0][0], example_kwargs=batches[0][1],
                         calibration=batches[1:])
    after = m2.graph_module
    old_by_name = {n.name: n for n in before.graph.nodes}
    checked = 0
    for new_y_node in [n for n in after.graph.nodes if "ptool.repquant" in n.meta]:
        rep = new_y_node.meta["ptool.repquant"]
        old_y_node = _old_output(new_y_node, old_by_name)
        old_y = record_values(before, [old_y_node], batches[:1])[0][old_y_node]
        new_y = record_values(after, [new_y_node], batches[:1])[0][new_y_node]
        # per channel on the old output, per tensor on the new one
        old_q = fake_quantize(old_y, rep.scale, rep.zero_point, rep.grid)
        s_t = torch.tensor(rep.tensor_scale, dtype=torch.float64)
        new_q = fake_quantize(new_y, s_t, rep.tensor_zero_point, rep.grid)
        assert (old_q != old_y).any()  # 4 bits: the quantization is real
        old_layers, new_layers = _consumers(before, old_y_node), _consumers(after, new_y_node)
        assert [la.node.name for la in old_layers] == [la.node.name for la in new_layers]
        for old_layer, new_layer in zip(old_layers, new_layers):
            ref = _apply(before, old_layer, old_q)
            out = _apply(after, new_layer, new_q)
            assert (out - ref).abs().max() <= 1e-10 * ref.abs().max(), (old_layer.node.name, (out - ref).abs().max())
            checked += 1
    return checked


def _old_output(new_y, old_by_name):
    """The original graph's node whose output ``new_y`` replaces: the LayerNorm itself; for an
    RMSNorm, the norm output before the new ``+ beta'`` (and the ``* gamma'`` put back if it had no
    weight), which the original graph has under the same name."""
    node = new_y if is_op(new_y, aten.layer_norm) else new_y.args[0]
    while node.name not in old_by_name:
        node = node.args[0]
    return old_by_name[node.name]


def _consumers(gm, ln):
    """The Linears reading ``ln`` (through views), in graph order."""
    seen, todo = [], [ln]
    while todo:
        node = todo.pop()
        for user in node.users:
            layer = as_layer(user)
            if layer is not None:
                seen.append(layer)
            else:
                todo.append(user)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(seen, key=lambda layer: order[layer.node])


def _apply(gm, layer, y):
    w, b = attr_tensor(gm, layer.weight), attr_tensor(gm, layer.bias) if layer.bias is not None else None
    y = y.reshape(-1, y.shape[-1])
    out = y @ w if layer.kind == "addmm" else y @ w.t()
    return out + b if b is not None else out


def test_post_ln_bert_is_skipped_with_its_reason():
    bert = _transform(zoo.bert(), RepQuant()).report["repquant"]
    assert bert.rewritten == 0 and len(bert.skipped) == 5
    assert sum("post-LN: the output is also the residual stream" in s.reason for s in bert.skipped) == 4


# ------------------------------------------------------------------------------------------- RMSNorm


@pytest.fixture(scope="module")
def llama():
    f = zoo.llama()
    return f, _transform(f, RepQuant())  # the manager checks Close(rtol=1e-5) on 5 batches


def test_llama_rmsnorm_gains_a_shift_and_its_linears_a_bias(llama):
    f, m2 = llama
    rec = m2.report["repquant"]
    # 2 layers x (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up) + model.norm -> lm_head (untied)
    assert rec.rewritten == 5 and not rec.skipped
    assert [note["consumers"] for note in rec.notes["sites"].values()] == [
        ["linear", "linear_1", "linear_2"], ["linear_4", "linear_5"], ["linear_7", "linear_8", "linear_9"],
        ["linear_11", "linear_12"], ["linear_14"]]
    assert all(note["ratio_min"] < 1 < note["ratio_max"] for note in rec.notes["sites"].values())
    gm = m2.graph_module
    for shifted in [n for n in gm.graph.nodes if "ptool.repquant" in n.meta]:
        rep, scaled = shifted.meta["ptool.repquant"], shifted.args[0]
        assert is_op(shifted, aten.add) and is_op(scaled, aten.mul)  # (gamma' * x) + beta'
        gamma = scaled.args[0]
        path = gamma.target.rpartition(".")[0]
        original = f.model.get_submodule(path).weight.detach().double()
        torch.testing.assert_close(attr_tensor(gm, gamma).double(), original / rep.ratio, rtol=1e-6, atol=0)
        assert shifted.args[1].target == f"{path}.bias"  # the norm's new beta' = -b
        torch.testing.assert_close(attr_tensor(gm, shifted.args[1]).double(), -rep.shift, rtol=1e-6, atol=1e-7)
        for user in shifted.users:  # Llama's Linears had no bias: W' b needs one
            layer = as_layer(user) or as_layer(next(iter(user.users)))
            assert layer.bias is not None and attr_tensor(gm, layer.bias).abs().max() > 0
    args, kwargs = f.inputs(9)
    fid = ptool.verify.compare(f.run((args, kwargs)), m2(*args, **kwargs))
    assert fid.max_rel_error <= 1e-5, fid


def test_reparameterized_llama_runs_on_onnxruntime(llama):
    f, m2 = llama
    run = ptool.compile(m2, backend="onnxruntime", example_inputs=f.example_inputs, example_kwargs=f.example_kwargs)
    args, kwargs = f.inputs(3)
    with torch.no_grad():
        fid = ptool.verify.compare(m2(*args, **kwargs), run(*args, **kwargs))
    assert fid.max_rel_error <= 1e-4, fid


def test_rmsnorm_after_fold_affine_gets_its_weight_back_and_a_tied_lm_head_is_skipped():
    f = zoo.llama()
    f.model.lm_head.weight = f.model.model.embed_tokens.weight  # tie_word_embeddings
    m2 = _transform(f, FoldAffine(), RepQuant())
    assert m2.report["fold-affine"].rewritten >= 4  # the four decoder norms' weights went into q/k/v, gate/up
    rec = m2.report["repquant"]
    assert rec.rewritten == 4
    (skip,) = rec.skipped
    assert "model.norm" in skip.site and "tied" in skip.reason
    gm = m2.graph_module
    for shifted in [n for n in gm.graph.nodes if "ptool.repquant" in n.meta]:
        scaled = shifted.args[0]  # put back: x * gamma' (= 1 / r), x the normalized value
        assert is_op(scaled, aten.mul) and is_op(scaled.args[0], aten.to, aten.mul)
        assert scaled.args[1].target.rpartition(".")[0].endswith("layernorm")  # on the norm module again


class _RMSNormPair(nn.Module):
    """``aten.rms_norm`` (nn.RMSNorm) feeding two Linears, one without a bias."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.norm = nn.RMSNorm(16)
            self.a, self.b = nn.Linear(16, 8, bias=False), nn.Linear(16, 8)
            with torch.no_grad():
                self.norm.weight.copy_(torch.rand(16) * 3 + 0.1)

    def forward(self, x):
        y = self.norm(x)
        return self.a(y) * self.b(y)


def test_aten_rms_norm_is_unchanged_bit_for_bit_in_float64():
    model = _RMSNormPair().double().eval()
    gen = torch.Generator().manual_seed(1)
    outliers = torch.ones(16, dtype=torch.float64)
    outliers[[3, 11]] = 20.0  # channels with much wider ranges: per-channel scales differ
    batches = [((torch.randn(2, 5, 16, generator=gen, dtype=torch.float64) * outliers,), {}) for _ in range(5)]
    assert any(is_op(n, aten.rms_norm) for n in capture(model, *batches[0]).graph_module.graph.nodes)
    assert _check_quantized_equivalence(model, batches) == 2


def test_second_run_changes_nothing_and_says_why():
    m2 = _transform(zoo.vit(), RepQuant(), RepQuant())
    second = m2.report[1]
    assert second.rewritten == 0 and second.nodes_after == second.nodes_before
    assert [s.reason for s in second.skipped] == ["already re-parameterized"] * 5


def test_bad_options_name_the_allowed_values():
    with pytest.raises(PassError, match="minmax | percentile"):
        build_pass(RepQuant, split_spec("repquant:observer=mse")[1])
    with pytest.raises(ValueError, match="minmax, percentile"):
        RepQuant(observer="mse")
    with pytest.raises(ValueError, match="2..16"):
        RepQuant(bits=1)
    p = RepQuant(bits=4, observer="percentile", percentile=99.5)
    assert build_pass(RepQuant, split_spec(p.spec())[1]) == p and p.exact and p.needs_calibration


def test_missing_calibration_is_a_pass_error_naming_the_pass():
    f = zoo.vit()
    with pytest.raises(PassError, match="pass 'repquant' needs calibration data"):
        ptool.transform(f.model, [RepQuant()], f.example_inputs)
