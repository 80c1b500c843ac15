"""LoLCATs' sliding-window hybrid: blockwise forward == its dense rows; limits behave as the maths says."""

import pytest
import torch

import ptool
from ptool.passes.attention.hybrid import SlidingWindowHybrid
from ptool.passes.attention.kernel import SiteShape, softmax_attention
from ptool.passes.attention.linear import EluKernel, HedgehogKernel, TransNormerKernel
from tests.models import zoo

B, H, N, D = 2, 3, 37, 8


def _qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, N, D, generator=g) for _ in range(3))


def _mask():
    m = torch.ones(B, 1, 1, N, dtype=torch.bool)
    m[1, ..., 30:] = False
    return m


@pytest.mark.parametrize("window", [4, 9, 100])
@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_forward_equals_dense_rows(causal, window):
    q, k, v = _qkv()
    kernel = SlidingWindowHybrid(HedgehogKernel(SiteShape.of(q, k, v, causal=causal), chunk_size=8), window)
    with torch.no_grad():
        kernel.window_logit.normal_(generator=torch.Generator().manual_seed(1))
        out, rows = kernel(q, k, v, _mask()), kernel.attention_weights(q, k, _mask())
    torch.testing.assert_close(out, rows @ v, atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.sum(-1)[0], torch.ones(H, N), atol=1e-5, rtol=0)
    assert (rows[1, ..., 30:] == 0).all()  # padded keys get nothing
    if causal:
        assert (rows.triu(1) == 0).all()


def test_a_window_covering_everything_with_full_weight_is_softmax():
    q, k, v = _qkv()
    kernel = SlidingWindowHybrid(EluKernel(SiteShape.of(q, k, v)), window=2 * N)
    with torch.no_grad():
        kernel.window_logit.fill_(30.0)  # f = 1: the linear part has no weight
        out = kernel(q, k, v, _mask())
    torch.testing.assert_close(out, softmax_attention(q, k, v, _mask(), D ** -0.5), atol=1e-5, rtol=0)


def test_unnormalized_kernels_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="normalized feature-map kernel"):
        SlidingWindowHybrid(TransNormerKernel(SiteShape.of(q, k, v)), 8)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_hybrid_lowers_to_onnxruntime(kind):
    f = getattr(zoo, kind)()
    m2 = ptool.transform(f.model, ["linear-attention:feature_map=hedgehog,window=4,chunk_size=4,transfer_steps=0"],
                         f.example_inputs, example_kwargs=f.example_kwargs)
    assert sum(isinstance(m, SlidingWindowHybrid) for m in m2.modules()) == 2
    run = ptool.compile(m2, backend="onnxruntime")
    args, kwargs = f.heldout()
    with torch.no_grad():
        fid = ptool.verify.compare(m2(*args, **kwargs), run(*args, **kwargs))
    assert fid.max_rel_error <= 1e-4, fid
