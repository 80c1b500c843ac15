"""repquant: per-channel post-LayerNorm quantization re-parameterized into per-tensor, exactly.

The formulas on known values; the float model unchanged on a pre-LN ViT and GPT-2 (Conv1D
consumers); the quantized model unchanged too, in float64, to 1e-10: per-channel fake
quantization of the old LayerNorm output followed by the old Linear equals per-tensor fake
quantization of the new output followed by the new Linear. Post-LN BERT and RMSNorm Llama are
skipped with their reasons.
"""

import pytest
import torch

import ptool
from ptool.errors import PassError
from ptool.frontends.torch_export import capture
from ptool.ir.graph import attr_tensor, is_op
from ptool.ir.record import record_values
from ptool.passes.fold_affine._layers import as_layer
from ptool.passes.options import build_pass, split_spec
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


@pytest.mark.parametrize("model", ["vit", "gpt2"])
def test_quantized_model_is_unchanged_bit_for_bit_in_float64(model):
    f = zoo.FIXTURES[model]()
    f.model.double()
    batches = [(tuple(a.double() if a.is_floating_point() else a for a in args), kwargs)
               for args, kwargs in f.batches(CALIBRATION_BATCHES + 1)]
    before = capture(f.model, *batches[0]).graph_module
    m2 = ptool.transform(f.model, [RepQuant(bits=4)], batches[0][0], example_kwargs=batches[0][1],
                         calibration=batches[1:])
    after = m2.graph_module
    lns = [[n for n in g.graph.nodes if is_op(n, aten.layer_norm)] for g in (before, after)]
    new_by_name = {n.name: n for n in lns[1]}
    checked = 0
    for old_ln in lns[0]:
        new_ln = new_by_name[old_ln.name]
        rep = new_ln.meta.get("ptool.repquant")
        if rep is None:
            continue
        old_y = record_values(before, [old_ln], batches[:1])[0][old_ln]
        new_y = record_values(after, [new_ln], batches[:1])[0][new_ln]
        # per channel on the old output, per tensor on the new one
        old_q = fake_quantize(old_y, rep.scale, rep.zero_point, rep.grid)
        s_t = torch.tensor(rep.tensor_scale, dtype=torch.float64)
        new_q = fake_quantize(new_y, s_t, rep.tensor_zero_point, rep.grid)
        assert (old_q != old_y).any()  # 4 bits: the quantization is real
        for old_layer, new_layer in zip(_consumers(before, old_ln), _consumers(after, new_ln)):
            ref = _apply(before, old_layer, old_q)
            out = _apply(after, new_layer, new_q)
            assert (out - ref).abs().max() <= 1e-10 * ref.abs().max(), (old_layer.node.name, (out - ref).abs().max())
            checked += 1
    assert checked == (4 if model == "gpt2" else 9)  # every consumer: GPT-2 fuses qkv into one Conv1D


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


def test_post_ln_bert_and_rmsnorm_llama_are_skipped_with_reasons():
    bert = _transform(zoo.bert(), RepQuant()).report["repquant"]
    assert bert.rewritten == 0 and len(bert.skipped) == 5
    assert sum("post-LN: the output is also the residual stream" in s.reason for s in bert.skipped) == 4
    llama = _transform(zoo.llama(), RepQuant()).report["repquant"]
    assert llama.rewritten == 0 and len(llama.skipped) == 5
    assert all(s.reason.startswith("RMSNorm, not LayerNorm") for s in llama.skipped)


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
