"""repbn: LayerNorm -> RepBN (calibrated, optionally distilled) -> a folded per-channel affine.

Small plain-torch models check the statistics, the least-squares init, the exact fold into
Linears and the sites where it must stay a mul + add; a ViT trained on real digits checks the
task: accuracy on the held-out split, no LayerNorm left in the graph or in the exported ONNX.
"""

import math

import onnx
import pytest
import torch
from torch import nn

import ptool
from ptool.errors import PassError
from ptool.ir.graph import op_histogram
from ptool.options import build_pass, split_spec
from ptool.passes.repbn import RepBatchNorm
from tests.models import digits_vit as dv

C = 16  # channels of the small models
TOKENS = 5


def _ln_count(gm) -> int:
    return op_histogram(gm)["aten.layer_norm"]


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights, LayerNorm affine away from (1, 0) so a wrong fold cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(C, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(C, generator=gen) * 0.1)
    return model.eval()


def _tokens(seed: int, batch: int = 4) -> torch.Tensor:
    """(batch, tokens, C) with per-channel offsets and scales, so BN statistics are not (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.linspace(-2, 2, C)
    scale = torch.linspace(0.5, 3, C)
    return torch.randn(batch, TOKENS, C, generator=gen) * scale + offset


def _calibration(n: int = 6) -> list[tuple[torch.Tensor]]:
    return [(_tokens(100 + i),) for i in range(n)]


class _PreNorm(nn.Module):
    """LN feeding two Linears only (q/k-like): the RepBN affine folds into both."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.q = nn.Linear(C, 8)
        self.k = nn.Linear(C, 8, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return self.q(h) * self.k(h)


class _NormToRelu(nn.Module):
    """LN feeding a Linear and a ReLU: no exact fold, the affine stays as mul + add."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.fc = nn.Linear(C, 8)

    def forward(self, x):
        h = self.norm(x)
        return self.fc(h) + torch.relu(h).sum(-1, keepdim=True)


class _ClsHead(nn.Module):
    """LN -> pick token 0 -> Linear (ViT's head): the fold goes through the token pick."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(self.norm(x)[:, 0])


class _Identity(nn.Module):
    """LN straight to the output."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)

    def forward(self, x):
        return self.norm(x)


def _transform(model, passes, **kw):
    kw.setdefault("calibration", _calibration())
    return ptool.transform(model, passes, (_tokens(0),), **kw)


# ---------------------------------------------------------------------------------------------
# configuration and errors


def test_missing_calibration_is_a_pass_error_naming_the_pass():
    with pytest.raises(PassError, match="pass 'repbn' needs calibration data"):
        ptool.transform(_randomized(_PreNorm()), [RepBatchNorm()], (_tokens(0),))


@pytest.mark.parametrize("spec", ["repbn", "repbn:finetune_steps=20,lr=0.003,loss=cosine",
                                  "repbn:layers=0+2,init=identity,eta_init=0.5,fold_linear=false"])
def test_options_round_trip(spec):
    _, raw = split_spec(spec)
    p = build_pass(RepBatchNorm, raw)
    assert p.spec() == spec
    assert build_pass(RepBatchNorm, split_spec(p.spec())[1]) == p
    assert p.needs_calibration and not p.exact


@pytest.mark.parametrize("raw, message", [
    ({"finetune_steps": "-1"}, "finetune_steps must be >= 0"),
    ({"loss": "kl"}, "allowed: mse | cosine"),
    ({"init": "fitt"}, "did you mean 'fit'"),
    ({"decay_fraction": "0"}, "decay_fraction must be in"),
    ({"step": "3"}, "has no option 'step'"),
])
def test_bad_options_are_pass_errors(raw, message):
    with pytest.raises(PassError, match=message):
        build_pass(RepBatchNorm, raw)


def test_layer_index_out_of_range_is_a_pass_error():
    with pytest.raises(PassError, match=r"layers=3 but the graph has 1 LayerNorm\(s\) \(allowed indices: 0..0\)"):
        _transform(_randomized(_PreNorm()), [RepBatchNorm(layers=(3,))])


# ---------------------------------------------------------------------------------------------
# the maths


def test_statistics_are_moments_over_batch_and_tokens():
    """init=identity, eta=0: RepBN(x) = (x - mu) / sqrt(var + eps), mu/var over every calibration token."""
    calib = _calibration()
    m2 = _transform(_randomized(_Identity()), [RepBatchNorm(init="identity", eta_init=0.0, bn_eps=1e-3)],
                    calibration=calib)
    tokens = torch.cat([x for (x,) in calib]).double().reshape(-1, C)
    mu, var = tokens.mean(0), tokens.var(0, unbiased=False)
    x = _tokens(7)
    expected = (x.double() - mu) / torch.sqrt(var + 1e-3)
    torch.testing.assert_close(m2(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert m2.report["repbn"].notes["calibration_tokens"] == tokens.shape[0]


def test_fit_init_reproduces_layernorm_where_it_is_affine_on_the_data():
    """Tokens that are permutations of one vector share mean and variance, so LN(x) is exactly
    affine in x per channel: the least-squares init must then be exact, whatever eta_init is."""
    base = torch.linspace(-3, 5, C)

    def permuted(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.stack([base[torch.randperm(C, generator=gen)] for _ in range(4 * TOKENS)]).reshape(4, TOKENS, C)

    model = _randomized(_Identity())
    for eta in (1.0, 0.3):
        m2 = ptool.transform(model, [RepBatchNorm(eta_init=eta)], (permuted(0),),
                             calibration=[(permuted(s),) for s in range(1, 40)])
        x = permuted(99)
        fid = ptool.verify.compare(model(x), m2(x))
        assert fid.max_rel_error <= 1e-4, fid


def test_fold_into_linears_is_exact():
    """The same RepBN as a mul + add and folded into the Linears: same outputs, fewer ops."""
    model = _randomized(_PreNorm())
    folded = _transform(model, [RepBatchNorm()])
    unfolded = _transform(model, [RepBatchNorm(fold_linear=False)])
    x = _tokens(5)
    assert ptool.verify.compare(unfolded(x), folded(x)).max_rel_error <= 1e-5
    rec = folded.report["repbn"]
    assert rec.notes["folded_into_linears"] == 1 and rec.notes["linears_updated"] == 2
    assert op_histogram(folded.graph_module)["aten.mul"] == 1  # the model's own q * k
    assert op_histogram(unfolded.graph_module)["aten.mul"] == 2  # q * k and the RepBN scale
    assert unfolded.report["repbn"].notes["kept_as_mul_add"] == {"layer_norm (norm)": "fold_linear=false"}


def test_fold_goes_through_a_token_pick():
    m2 = _transform(_randomized(_ClsHead()), [RepBatchNorm()])
    notes = m2.report["repbn"].notes
    assert notes["folded_into_linears"] == 1 and notes["kept_as_mul_add"] == {}
    assert _ln_count(m2.graph_module) == 0


def test_non_linear_consumer_keeps_a_mul_add_and_says_why():
    m2 = _transform(_randomized(_NormToRelu()), [RepBatchNorm()])
    rec = m2.report["repbn"]
    assert rec.rewritten == 1 and _ln_count(m2.graph_module) == 0
    (reason,) = rec.notes["kept_as_mul_add"].values()
    assert "relu" in reason and "not a Linear" in reason
    hist = op_histogram(m2.graph_module)
    assert hist["aten.mul"] == 1 and hist["aten.add"] >= 2
    assert rec.fidelity is not None  # the manager measured the approximation
    # the stored scale and shift stay parameters: the result is still trainable
    assert any("repbn_scale" in n for n, _ in m2.graph_module.named_parameters())


def test_layers_selects_sites_and_skips_the_others_with_the_reason():
    class TwoNorms(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _PreNorm(), _PreNorm()
            self.mid = nn.Linear(8, C)

        def forward(self, x):
            return self.b(self.mid(self.a(x)))

    m2 = _transform(_randomized(TwoNorms()), [RepBatchNorm(layers=(1,))])
    rec = m2.report["repbn"]
    assert rec.rewritten == 1 and _ln_count(m2.graph_module) == 1
    (skip,) = rec.skipped
    assert "a.norm" in skip.site and "not selected (layers=1)" in skip.reason


def test_second_run_changes_nothing():
    p = RepBatchNorm()
    m2 = _transform(_randomized(_PreNorm()), [p, p])
    first, second = m2.report[0], m2.report[1]
    assert first.rewritten == 1
    assert second.rewritten == 0 and second.nodes_after == second.nodes_before


def test_finetune_lowers_the_distillation_loss_quietly(capsys):
    """The progressive fine-tune trains toward the original outputs; no bar when stderr is no TTY."""
    m2 = _transform(_randomized(_NormToRelu()), [RepBatchNorm(finetune_steps=40, lr=3e-3)])
    notes = m2.report["repbn"].notes
    assert notes["finetune_steps"] == 40
    assert notes["distill_mse_after"] < notes["distill_mse_before"]
    assert math.isfinite(notes["finetune_last_step_loss"])
    assert _ln_count(m2.graph_module) == 0
    assert all(p.grad is None for p in m2.graph_module.parameters())
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# acceptance: a ViT trained on real digits

FINETUNE = RepBatchNorm(finetune_steps=200, lr=3e-3)


@pytest.mark.slow
def test_digits_vit_keeps_its_accuracy_and_loses_every_layernorm(tmp_path):
    """Measured (seed 0, torch 2.13 CPU, 540 test images): original 97.22%; post-training repbn
    94.26% (-2.96 points; cosine 0.915 on the verification batches, outside the pass's 0.95
    contract, so the report says NO); with the 200-step progressive fine-tune 97.41% (+0.19
    points; cosine 0.980). The post-training figure is printed, not asserted: it is what
    fine-tuning is for."""
    trained = dv.digits_vit()
    data = trained.data
    assert trained.test_accuracy >= 0.95
    calibration = data.train_batches(64)
    kw = dict(calibration=calibration, dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1)}})
    with dv.single_thread():
        post = ptool.transform(trained.model, [RepBatchNorm()], trained.example_inputs, **kw)
        tuned = ptool.transform(trained.model, [FINETUNE], trained.example_inputs, **kw)
    acc_orig = trained.test_accuracy
    acc_post = dv.accuracy(post, data.x_test, data.y_test)
    acc_tuned = dv.accuracy(tuned, data.x_test, data.y_test)
    print(f"digits ViT accuracy: original {acc_orig:.4f}, repbn post-training {acc_post:.4f}, "
          f"repbn + {FINETUNE.finetune_steps}-step fine-tune {acc_tuned:.4f}")

    assert acc_orig - acc_tuned <= 0.01
    assert acc_tuned >= acc_post
    rec = tuned.report["repbn"]
    assert rec.rewritten == 5 and rec.notes["layernorms_replaced"] == 5
    assert rec.notes["folded_into_linears"] == 5  # q/k/v, the MLP, and the head through the CLS pick
    assert rec.notes["distill_mse_after"] < rec.notes["distill_mse_before"]
    assert rec.fidelity is not None and not rec.exact
    assert rec.within_contract, rec.fidelity
    assert post.report["repbn"].fidelity is not None

    for m2 in (post, tuned):
        assert _ln_count(m2.graph_module) == 0
    path = ptool.export_onnx(tuned, tmp_path / "vit_repbn.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "LayerNormalization" not in ops
    assert not ops & {"BatchNormalization", "ReduceMean"}  # no statistics computed at inference


def test_calibration_that_does_not_fit_the_graph_is_a_pass_error():
    # verify=False: otherwise the reference run on the same batch fails first, before the pass
    with pytest.raises(PassError, match="pass 'repbn': the graph cannot run calibration item 0"):
        _transform(_randomized(_PreNorm()), [RepBatchNorm()], calibration=[(torch.randn(4, TOKENS, C + 1),)],
                   verify=False)
