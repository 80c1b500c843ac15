"""precision: bf16 / fp16 compute with float32 islands; fidelity on real architectures, roles, lowering."""

from __future__ import annotations

import functools

import pytest
import torch

import ptool
from ptool.errors import PassError
from ptool.ir.graph import op_histogram
from ptool.passes.precision import Precision, Role, role_of
from tests.models import zoo

aten = torch.ops.aten


@functools.cache
def _converted(model: str, spec: str):
    fixture = getattr(zoo, model)()
    m2 = ptool.transform(fixture.model, [spec], fixture.example_inputs, example_kwargs=fixture.example_kwargs)
    return fixture, m2


def _heldout_cosine(fixture, m2, seed: int = 1) -> float:
    args, kwargs = fixture.heldout(seed)
    with torch.no_grad():
        return ptool.verify.compare(fixture.run((args, kwargs)), m2(*args, **kwargs)).cosine


def _dtypes_of(m2, packet) -> set[torch.dtype]:
    return {n.meta["val"].dtype for n in m2.graph_module.graph.nodes
            if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is packet}


@pytest.mark.parametrize("model", ["bert", "vit", "gpt2", "llama", "resnet"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_fidelity_on_held_out_inputs_within_the_declared_bound(model, dtype):
    fixture, m2 = _converted(model, f"precision:dtype={dtype}")
    assert _heldout_cosine(fixture, m2) >= Precision.numerics.bound  # 0.999
    assert m2.report.records[-1].rewritten > 0


def test_matmuls_run_in_bf16_softmax_and_norms_in_float32_outputs_keep_their_dtype():
    fixture, m2 = _converted("bert", "precision:dtype=bf16")
    assert _dtypes_of(m2, aten.linear) == {torch.bfloat16}
    assert _dtypes_of(m2, aten.layer_norm) == {torch.float32}
    assert _dtypes_of(m2, aten.scaled_dot_product_attention) == {torch.bfloat16}
    args, kwargs = fixture.heldout(1)
    with torch.no_grad():
        outputs = ptool.verify.flatten_outputs(m2(*args, **kwargs))
        reference = ptool.verify.flatten_outputs(fixture.run((args, kwargs)))
    assert [o.dtype for o in outputs] == [r.dtype for r in reference]


def test_weights_read_by_matmuls_are_stored_in_bf16_and_norm_weights_stay_float32():
    fixture, m2 = _converted("bert", "precision:dtype=bf16")
    dtypes = {name: p.dtype for name, p in m2.graph_module.named_parameters()}
    linear_weights = [n for n in dtypes if n.endswith("query.weight") or n.endswith("dense.weight")]
    norm_weights = [n for n in dtypes if "LayerNorm.weight" in n]
    assert len(linear_weights) >= 4 and len(norm_weights) >= 4
    assert {dtypes[n] for n in linear_weights} == {torch.bfloat16}
    assert {dtypes[n] for n in norm_weights} == {torch.float32}
    notes = m2.report.records[-1].notes
    assert notes["weight_bytes_after"] < 0.6 * notes["weight_bytes_before"]


def test_softmax_written_out_runs_in_float32():
    fixture = zoo.bert(attn_implementation="eager")
    m2 = ptool.transform(fixture.model, ["precision"], fixture.example_inputs)
    assert _dtypes_of(m2, aten.softmax) == {torch.float32}
    assert _dtypes_of(m2, aten.matmul) == {torch.bfloat16}
    assert _heldout_cosine(fixture, m2) >= 0.999


def test_roles_follow_the_op_rule():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    nodes = {
        "linear": graph.call_function(aten.linear.default, (x, x)),
        "softmax": graph.call_function(aten._softmax.default, (x, -1, False)),
        "gelu": graph.call_function(aten.gelu.default, (x,)),
        "to": graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.float32}),
    }
    assert {k: role_of(n) for k, n in nodes.items()} == {
        "linear": Role.LOW, "softmax": Role.FLOAT, "gelu": Role.FOLLOW, "to": Role.EXPLICIT}


def test_second_run_changes_nothing():
    fixture, m2 = _converted("llama", "precision:dtype=bf16")
    again = ptool.transform(m2, ["precision:dtype=bf16"], fixture.example_inputs)
    record = again.report.records[-1]
    assert record.rewritten == 0 and record.nodes_before == record.nodes_after
    assert record.fidelity.max_abs_error == 0


def test_fp16_saturates_float32_masks_instead_of_overflowing():
    fixture, m2 = _converted("llama", "precision:dtype=fp16")
    assert op_histogram(m2.graph_module)["aten.clamp"] > 0
    args, kwargs = fixture.heldout(2)
    with torch.no_grad():
        out = ptool.verify.flatten_outputs(m2(*args, **kwargs))
    assert all(torch.isfinite(o).all() for o in out if o.is_floating_point())


def test_exclude_and_keep_float_keep_sites_in_float32_with_the_reason():
    fixture = zoo.bert()
    m2 = ptool.transform(fixture.model, ["precision:exclude=*pooler*,keep_float=2"], fixture.example_inputs)
    skipped = m2.report.records[-1].skipped
    assert sum("exclude pattern '*pooler*'" in s.reason for s in skipped) == 1
    sensitive = [s for s in skipped if "most sensitive" in s.reason]
    assert len(sensitive) == 2 and all("relative output error" in s.reason for s in sensitive)
    assert len(_dtypes_of(m2, aten.linear)) == 2  # both dtypes now present


def test_bad_options_are_one_clear_error():
    with pytest.raises(PassError, match="dtype"):
        ptool.passes.registry.parse_pass("precision:dtype=int3")
    with pytest.raises(PassError, match="keep_float"):
        ptool.passes.registry.parse_pass("precision:keep_float=-1")


def test_composes_with_quantize_integer_matmuls_stay_float32_islands():
    fixture = zoo.bert()
    m2 = ptool.transform(fixture.model, ["quantize:activations=per-token", "precision"], fixture.example_inputs)
    hist = op_histogram(m2.graph_module)
    assert hist["ptool_quant.linear_token_int8"] > 0 and "aten.linear" not in hist
    assert _heldout_cosine(fixture, m2) >= 0.99


def test_composes_with_linear_attention():
    fixture = zoo.bert()
    m2 = ptool.transform(fixture.model, ["linear-attention:feature_map=elu", "precision"], fixture.example_inputs)
    args, kwargs = fixture.heldout(1)
    base = ptool.transform(fixture.model, ["linear-attention:feature_map=elu"], fixture.example_inputs)
    with torch.no_grad():
        assert ptool.verify.compare(base(*args, **kwargs), m2(*args, **kwargs)).cosine >= 0.999


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_fp16_lowers_and_agrees_with_torch(backend):
    if backend == "tvm":
        pytest.importorskip("tvm")
    fixture, m2 = _converted("bert", "precision:dtype=fp16")
    run = ptool.compile(m2, backend=backend, example_inputs=fixture.example_inputs)
    args, kwargs = fixture.heldout(1)
    with torch.no_grad():
        assert ptool.verify.compare(m2(*args, **kwargs), run(*args, **kwargs)).cosine >= 0.999


def test_a_second_run_with_float_sites_returns_their_weights_to_float32_exactly():
    fixture, m2 = _converted("bert", "precision:dtype=bf16")
    again = ptool.transform(m2, ["precision:dtype=bf16,keep_float=2"], fixture.example_inputs)
    record = again.report.records[-1]
    kept = [s.site.split(" ")[0] for s in record.skipped if "most sensitive" in s.reason]
    assert len(kept) == 2
    gm = again.graph_module
    for node in gm.graph.nodes:
        if node.name in kept:
            weight = node.args[1]
            assert gm.get_parameter(weight.target).dtype == torch.float32  # bf16 -> float32 is exact
            assert node.meta["val"].dtype == torch.float32
    assert record.fidelity.cosine >= 0.9999


@pytest.mark.parametrize(("model", "fold"), [("llama", "fold-affine"), ("vit", "merge-branches")])
def test_exact_folds_skip_weights_stored_in_bf16_with_the_reason(model, fold):
    fixture = getattr(zoo, model)()
    m2 = ptool.transform(fixture.model, ["precision", fold], fixture.example_inputs)
    record = m2.report.records[-1]
    assert record.rewritten == 0 and record.fidelity.max_abs_error == 0
    assert any("weight stored in bfloat16: folding into it would round it" in s.reason for s in record.skipped)
