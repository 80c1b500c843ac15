"""The attention-swap mechanics: site selection, rewiring, conversion plumbing, errors."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import ptool
from ptool.errors import PassError
from ptool.passes.attention.kernel import AttentionKernel, SoftmaxKernel
from ptool.passes.attention.swap import AttentionSwap
from ptool.passes.base import Family
from tests.models import zoo
from tests.passes.attention.attention_forms import SwapForSoftmax


class _Tempered(AttentionKernel):
    """Softmax with a learnable per-head temperature starting at 0.5 (a kernel with something to learn)."""

    def __init__(self, shape):
        super().__init__(shape)
        self.log_t = torch.nn.Parameter(torch.full((shape.heads, 1, 1), -0.7))

    def attention_weights(self, q, k, mask=None):
        from ptool.passes.attention.kernel import softmax_weights

        return softmax_weights(q * self.log_t.exp(), k, mask, self.shape.scale, self.shape.causal)

    def forward(self, q, k, v, mask=None):
        return self.attention_weights(q, k, mask) @ v


@dataclass(frozen=True, kw_only=True)
class SwapForTempered(AttentionSwap):
    """Replace every site by a mistuned softmax that conversion must fix."""

    name: ClassVar[str] = "swap-for-tempered"
    family: ClassVar[Family] = Family.ATTENTION_LINEAR

    def build_kernel(self, site, position, selected):
        return _Tempered(site.shape())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2", "llama"])
def test_rewiring_is_exact(kind, impl):
    f = getattr(zoo, kind)(attn_implementation=impl)
    m2 = ptool.transform(f.model, [SwapForSoftmax()], f.example_inputs, example_kwargs=f.example_kwargs)
    assert m2.report[0].rewritten == 2
    assert sum(isinstance(m, SoftmaxKernel) for m in m2.modules()) == 2
    args, kwargs = f.heldout()
    with torch.no_grad():
        fid = ptool.verify.compare(f.model(*args, **kwargs), m2(*args, **kwargs))
    assert fid.max_rel_error <= 1e-5, fid


def test_layers_keep_softmax_elsewhere_and_say_so():
    f = zoo.bert()
    m2 = ptool.transform(f.model, [SwapForSoftmax(layers=(1,))], f.example_inputs)
    record = m2.report[0]
    assert record.rewritten == 1
    assert [s.reason for s in record.skipped] == ["kept softmax (layers=1)"]


def test_layers_out_of_range_is_a_clear_error():
    f = zoo.bert()
    with pytest.raises(PassError, match=r"layers=5 but the graph has 2 attention site\(s\)"):
        ptool.transform(f.model, [SwapForSoftmax(layers=(5,))], f.example_inputs)


def test_trainable_kernel_without_calibration_is_a_clear_error():
    f = zoo.bert()
    with pytest.raises(PassError, match="needs calibration data"):
        ptool.transform(f.model, [SwapForTempered()], f.example_inputs)


def test_transfer_and_distillation_recover_the_model():
    f = zoo.bert()
    calibration = f.batches(4)
    m_raw = ptool.transform(f.model, [SwapForTempered(transfer_steps=0)], f.example_inputs)
    m2 = ptool.transform(f.model, [SwapForTempered(transfer_steps=60, transfer_lr=0.05, distill_steps=20)],
                         f.example_inputs, calibration=calibration)
    notes = m2.report[0].notes
    before, after = notes["transfer_cosine_before"], notes["transfer_cosine_after"]
    assert set(before) == {0, 1}
    assert all(after[i] > before[i] for i in before) and min(after.values()) > 0.999
    assert notes["distill_mse_after"] <= notes["distill_mse_before"] + 1e-9  # already ~0 after transfer
    temps = [m.log_t.exp() for m in m2.modules() if isinstance(m, _Tempered)]
    assert all(torch.allclose(t, torch.ones_like(t), atol=0.05) for t in temps)  # learned back to 1
    args, kwargs = f.heldout()
    with torch.no_grad():
        ref = f.model(*args, **kwargs)
        raw = ptool.verify.compare(ref, m_raw(*args, **kwargs))
        fixed = ptool.verify.compare(ref, m2(*args, **kwargs))
    assert fixed.max_rel_error < raw.max_rel_error / 10


def test_converted_model_is_trainable():
    f = zoo.bert()
    m2 = ptool.transform(f.model, [SwapForTempered(transfer_steps=0)], f.example_inputs)
    out = m2(*f.example_inputs).last_hidden_state.sum()
    out.backward()
    assert all(m.log_t.grad is not None for m in m2.modules() if isinstance(m, _Tempered))
