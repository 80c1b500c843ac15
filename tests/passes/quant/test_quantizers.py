"""ptool.passes.quant.quantizers: the int4 clip search gives the same grids when done in cache-sized blocks."""

from __future__ import annotations

import pytest
import torch

from ptool.passes.quant import quantizers as qz


@pytest.mark.parametrize("hessian", [False, True])
def test_clip_search_in_row_blocks_equals_the_whole_search(monkeypatch, hessian):
    torch.manual_seed(0)
    x = torch.randn(300, 4, 32) * torch.rand(300, 4, 1) * 3
    blocks = None
    if hessian:
        a = torch.randn(4, 32, 32)
        blocks = a @ a.transpose(-1, -2)
    grid = qz.IntRange(4, signed=False)
    monkeypatch.setattr(qz, "_SEARCH_ELEMENTS", 1 << 30)  # one block
    whole = qz.asymmetric_qparams(x, grid, True, blocks)
    monkeypatch.setattr(qz, "_SEARCH_ELEMENTS", 7 * 4 * 32)  # blocks of 7 rows, the last one shorter
    blocked = qz.asymmetric_qparams(x, grid, True, blocks)
    assert whole[0].shape == (300, 4, 1)
    torch.testing.assert_close(blocked[0], whole[0], rtol=0, atol=0)
    torch.testing.assert_close(blocked[1], whole[1], rtol=0, atol=0)
    clipped = (whole[0] < qz.range_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), grid)[0]).sum()
    assert clipped > 0  # the search did shrink some ranges: the comparison covers the chosen factors
