"""Conformance over the whole registry: every pass, every fixture model.

For each registered pass: its spec round-trips; a second run changes nothing (idempotence); on
every fixture model it keeps its numerics contract (exact passes within their tolerance on a
held-out batch too); and the transformed model still lowers to ONNX Runtime with matching outputs.
"""

import pytest
import torch

import ptool
from ptool.frontends.torch_export import capture
from ptool.passes.base import PassContext
from ptool.passes.registry import parse_pass, registry
from tests.models import zoo

PASSES = sorted(registry())
MODELS = ["bert", "vit", "gpt2", "llama", "resnet", "mobilenet_v2"]

#: How each pass that needs more than its defaults is configured here. Passes that need data get
#: calibration batches from the fixture; approximate passes are configured to reach their bound.
# precision: fp16, the format every backend runs as the graph says (ONNX Runtime's CPU provider has no
# bf16 arithmetic and runs bf16 graphs in float32, a bf16 rounding step away from torch; bf16 is covered
# in tests/passes/test_precision.py, tests/backends/test_onnx_bf16.py and tests/backends/test_tvm_precision.py)
CONFIGURED = {"repbn": "repbn:finetune_steps=60", "precision": "precision:dtype=fp16"}
# how far ONNX Runtime may sit from the torch module: 1e-4 relative, except where the graph itself
# computes in fp16 (11-bit mantissa): two runtimes rounding at different points differ by about a step
BACKEND_REL_ERROR = {"precision": 2.0 ** -10}
CALIBRATION_BATCHES = 4


def _run(name, fixture, passes):
    p = parse_pass(CONFIGURED.get(name, name))
    calibration = fixture.batches(CALIBRATION_BATCHES) if p.needs_calibration else None  # (args, kwargs) pairs
    return p, ptool.transform(fixture.model, [p] * passes, fixture.example_inputs,
                              example_kwargs=fixture.example_kwargs, calibration=calibration)


@pytest.mark.parametrize("name", PASSES)
def test_spec_round_trip(name):
    p = parse_pass(name)
    assert parse_pass(p.spec()) == p
    assert p.summary(), f"{name} has no one-line doc"
    assert p.family.value and p.numerics is not None


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", PASSES)
def test_idempotent_and_within_contract(name, model):
    fixture = zoo.FIXTURES[model]()
    p, m2 = _run(name, fixture, passes=2)
    first, second = m2.report[0], m2.report[1]
    assert second.rewritten == 0 and second.nodes_after == second.nodes_before, "second run changed the graph"
    assert first.within_contract, first.fidelity
    if p.exact:
        args, kwargs = fixture.inputs(9)
        with torch.no_grad():
            fid = ptool.verify.compare(fixture.model(*args, **kwargs), m2(*args, **kwargs))
        assert p.numerics.violation(fid) is None, fid


@pytest.mark.parametrize("name", PASSES)
def test_onnxruntime_agrees_after_the_pass(name, tmp_path):
    fixture = zoo.resnet() if name == "fold-bn" else zoo.bert()
    _, m2 = _run(name, fixture, passes=1)
    run = ptool.compile(m2, backend="onnxruntime")
    args, kwargs = fixture.inputs(3)
    with torch.no_grad():
        fid = ptool.verify.compare(m2(*args, **kwargs), run(*args, **kwargs))
    assert fid.max_rel_error <= BACKEND_REL_ERROR.get(name, 1e-4), fid


def test_passes_leave_graph_valid_and_metadata_fresh():
    fixture = zoo.mobilenet_v2()
    gm = capture(fixture.model, fixture.example_inputs, fixture.example_kwargs).graph_module
    for name in PASSES:
        if parse_pass(name).needs_calibration:
            continue  # covered above with data; this test strings the data-free passes together
        parse_pass(name).run(gm, PassContext())
        gm.graph.lint()
        gm.recompile()
    from ptool.ir.graph import refresh_meta

    refresh_meta(gm)
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
