"""LoRA adapters around replaced attention sites, and the layer-wise distillation term."""

from __future__ import annotations

import pytest
import torch

import ptool
from ptool.passes.attention import adapters
from ptool.passes.attention.swap import sites_of
from tests.models import zoo
from tests.passes.attention.test_swap import SwapForTempered, _Tempered


def _captured_bert():
    f = zoo.bert()
    gm = ptool.transform(f.model, [], f.example_inputs).graph_module
    return f, gm


def _projections(gm, call) -> list[torch.fx.Node]:
    linears = []
    for site in sites_of(gm, call):
        for node in (site.q, site.k if site.k is not None else site.k_transposed, site.v):
            linears.append(adapters.input_projection(node))
        linears.append(adapters.output_projection(site.output))
    return linears


def test_projections_are_the_q_k_v_o_weights_of_each_layer():
    f, gm = _captured_bert()
    linears = _projections(gm, (tuple(f.example_inputs), {}))
    names = [n.args[1].target for n in linears]
    assert len(names) == 8 and None not in linears  # 2 layers x q, k, v, o
    for layer in (0, 1):
        assert [s.split(f"layer.{layer}.")[1] for s in names[4 * layer:4 * layer + 4]] == [
            "attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
            "attention.output.dense.weight"]


def test_adapters_start_as_identity_and_merge_into_the_weights():
    f, gm = _captured_bert()
    args = tuple(f.example_inputs)
    with torch.no_grad():
        want = gm(*args)[0].clone()
    weights_before = {k: v.clone() for k, v in gm.named_parameters()}
    attached = adapters.attach_adapters(gm, _projections(gm, (args, {})), rank=4, seed=0)
    assert len(attached) == 8
    with torch.no_grad():
        assert torch.equal(gm(*args)[0], want)  # up = 0: exactly the original model
        for a in attached:  # now move every adapter
            gm.get_submodule(a.name).up.normal_(std=0.05)
        adapted = gm(*args)[0].clone()
    assert not torch.allclose(adapted, want, atol=1e-3)
    adapters.merge_adapters(gm, attached)
    assert not any(n.op == "call_module" and n.target.startswith("ptool_lora") for n in gm.graph.nodes)
    assert {k for k, _ in gm.named_parameters()} == set(weights_before)  # no adapter parameter left
    with torch.no_grad():
        torch.testing.assert_close(gm(*args)[0], adapted, atol=1e-5, rtol=1e-5)  # merged = adapted
    changed = {k for k, v in gm.named_parameters() if not torch.equal(v, weights_before[k])}
    assert changed == {a.weight.target for a in attached}


def test_adapter_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank"):
        adapters.LowRankAdapter(4, 4, 0)
    with pytest.raises(ValueError, match="distill_rank"):
        SwapForTempered(distill_rank=0)


def test_lora_distillation_trains_exactly_the_kernels_and_the_projection_weights():
    f = zoo.bert()
    original = {k: v.clone() for k, v in f.model.named_parameters()}
    # a step size that lowers the loss here (larger ones raise it, and the distillation is reverted)
    m2 = ptool.transform(f.model, [SwapForTempered(transfer_steps=0, distill_steps=10, distill_lr=1e-4,
                                                   distill_params="lora", distill_rank=2)],
                         f.example_inputs, calibration=f.batches(2))
    notes = m2.report[0].notes
    assert notes["lora_adapters"] == 8 and "lora_projections_not_found" not in notes
    assert notes["distill_mse_after"] < notes["distill_mse_before"] and "distill_reverted" not in notes
    params = {k.removeprefix("graph_module."): v for k, v in m2.named_parameters()}
    assert not any("lora" in k for k in params)  # merged away
    kernels = {k for k in params if k.endswith("log_t")}
    assert len(kernels) == 2
    changed = set()
    for k, v in params.items():
        if k in kernels:
            continue
        # the graph's parameters keep the HF module paths
        assert k in original, k
        if not torch.equal(v, original[k]):
            changed.add(k)
    expected = {f"encoder.layer.{i}.attention.{p}.weight" for i in (0, 1)
                for p in ("self.query", "self.key", "self.value", "output.dense")}
    assert changed == {k for k in expected if k in original} and len(changed) == 8
    for k in changed:  # a rank-2 update
        assert torch.linalg.matrix_rank(params[k] - original[k], atol=1e-6) <= 2
    assert all(not torch.equal(m.log_t, torch.full_like(m.log_t, -0.7)) for m in m2.modules()
               if isinstance(m, _Tempered))


def test_site_weight_adds_the_layerwise_term_and_it_is_reduced():
    f = zoo.bert()
    calibration = f.batches(2)
    m2 = ptool.transform(f.model, [SwapForTempered(transfer_steps=0, distill_steps=40, distill_lr=0.05,
                                                   distill_site_weight=1.0)],
                         f.example_inputs, calibration=calibration)
    notes = m2.report[0].notes
    assert notes["distill_site_mse_after"] < notes["distill_site_mse_before"] / 10
    assert notes["distill_mse_after"] <= notes["distill_mse_before"] + 1e-9
    without = ptool.transform(f.model, [SwapForTempered(transfer_steps=0, distill_steps=40, distill_lr=0.05)],
                              f.example_inputs, calibration=calibration).report[0].notes
    assert "distill_site_mse_before" not in without  # the term is off by default


def test_kernel_only_distillation_of_sea_is_skipped_and_says_why():
    f = zoo.bert()
    m2 = ptool.transform(f.model, ["sparse-attention:method=sea,transfer_steps=2,distill_steps=3"],
                         f.example_inputs, calibration=f.batches(2))
    notes = m2.report[0].notes
    assert "distill_params=lora" in notes["distill_skipped"] and "distill_mse_after" not in notes
    m3 = ptool.transform(f.model, ["sparse-attention:method=sea,transfer_steps=2,distill_steps=3,distill_params=lora"],
                         f.example_inputs, calibration=f.batches(2))
    notes = m3.report[0].notes
    assert notes["lora_adapters"] == 8 and "distill_mse_after" in notes and "distill_skipped" not in notes


def test_a_distillation_that_raises_its_own_loss_is_reverted():
    f = zoo.bert()
    calibration = f.batches(2)
    swapped = ptool.transform(f.model, [SwapForTempered(transfer_steps=0, distill_steps=0)], f.example_inputs,
                              calibration=calibration)
    m2 = ptool.transform(f.model, [SwapForTempered(transfer_steps=0, distill_steps=6, distill_lr=30.0,
                                                   distill_params="lora", distill_rank=2)],
                         f.example_inputs, calibration=calibration)
    notes = m2.report[0].notes
    assert "rose from" in notes["distill_reverted"] and "distill_lr" in notes["distill_reverted"]
    assert not notes["distill_mse_after"] <= notes["distill_mse_before"]  # as trained, before the revert
    with torch.no_grad():  # the model before the distillation, exactly
        torch.testing.assert_close(m2(*f.example_inputs), swapped(*f.example_inputs), atol=0, rtol=0)
