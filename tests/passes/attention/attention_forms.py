"""Small seeded modules that write softmax attention the ways vision models do (no timm needed).

Each reproduces the graph of one family as ``torch.export`` sees it:

* :class:`SwinBlocks` - Swin's window attention: windows cut from a (cyclically shifted) token grid,
  ``q * scale @ k^T``, a relative-position bias gathered from a table, and in the shifted block
  the scores viewed to ``(B/nW, nW, H, N, N)``, the ``0 / -100`` shift mask added, viewed back;
* :class:`MaxVitAttention` - MaxViT's 5-D ``(B, windows, H, N, D)`` tensors and ``einsum`` products
  (also the TF port's ``...nhd,...mhd->...hnm`` spelling, heads after tokens);
* :class:`BmmAttention` - ``bmm`` on ``(B * H, N, D)``;
* :class:`TalkingHeads` - CaiT: a linear over the heads before and after the softmax;
* :class:`ChannelAttention` - XCiT: softmax over the ``D x D`` map of L2-normalized ``q^T k``
  times a learned per-head temperature, applied to ``v``;
* :class:`FactorizedAttention` - CoaT: ``k.softmax(dim=-2)``, ``k^T v``, ``q (k^T v)``.

Every factory returns ``(model, (example_input,))`` so ``ptool inspect module:function`` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ptool.passes.attention.kernel import SoftmaxKernel
from ptool.passes.attention.swap import AttentionSwap
from ptool.passes.base import Family


@dataclass(frozen=True, kw_only=True)
class SwapForSoftmax(AttentionSwap):
    """Replace every site by exact softmax (its bias included): the rewiring and the canonical form
    must not change the model."""

    name: ClassVar[str] = "swap-for-softmax"
    family: ClassVar[Family] = Family.ATTENTION_LINEAR

    def build_kernel(self, site, position, selected):
        return SoftmaxKernel(site.shape())

DIM, HEADS = 16, 2


def _qkv(linear: nn.Linear, x: torch.Tensor, heads: int, order: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    *lead, c = x.shape
    return linear(x).reshape(*lead, 3, heads, c // heads).permute(order).unbind(0)


class SwinWindowAttention(nn.Module):
    """timm's ``WindowAttention``: relative-position bias, optional shift mask through 5-D views."""

    def __init__(self, window: int, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.n = window * window
        self.scale = (DIM // HEADS) ** -0.5
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, HEADS))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B * nW, N, C)
        b_, n, c = x.shape
        q, k, v = _qkv(self.qkv, x, HEADS, (2, 0, 3, 1, 4))
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if self.attn_mask is not None:
            nw = self.attn_mask.shape[0]
            attn = attn.view(-1, nw, HEADS, n, n) + self.attn_mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, HEADS, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


def _shift_mask(side: int, window: int, shift: int) -> torch.Tensor:
    """Swin's shifted-window mask ``(nW, N, N)``: -100 between tokens of different image regions."""
    img = torch.zeros(1, side, side, 1)
    cnt = 0
    for h in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for w in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, h, w, :] = cnt
            cnt += 1
    windows = _partition(img, window).squeeze(-1)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _partition(x: torch.Tensor, window: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


class SwinBlock(nn.Module):
    def __init__(self, side: int, window: int, shift: int) -> None:
        super().__init__()
        self.side, self.window, self.shift = side, window, shift
        self.norm = nn.LayerNorm(DIM)
        self.attn = SwinWindowAttention(window, _shift_mask(side, window, shift) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, side * side, C)
        b, _, c = x.shape
        h = self.norm(x).view(b, self.side, self.side, c)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        w = self.window
        out = self.attn(_partition(h, w)).view(b, self.side // w, self.side // w, w, w, c)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, self.side, self.side, c)
        if self.shift:
            out = torch.roll(out, shifts=(self.shift, self.shift), dims=(1, 2))
        return x + out.reshape(b, -1, c)


class SwinBlocks(nn.Module):
    """Two Swin blocks on an 8x8 grid of 4x4 windows: plain, then shifted by 2."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(SwinBlock(8, 4, 0), SwinBlock(8, 4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class MaxVitAttention(nn.Module):
    """MaxViT block/grid attention on ``(B, windows, N, C)`` with 5-D einsums.

    Args:
        tf_layout: the TF port's ``...nhd,...mhd->...hnm`` (heads after tokens) instead of
            ``bwhid,bwhjd->bwhij``.
        bias: add a learned relative-position bias ``(H, N, N)`` to the scores.
    """

    def __init__(self, tokens: int = 16, tf_layout: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.tf_layout = tf_layout
        self.scale = (DIM // HEADS) ** -0.5
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.rel_bias = nn.Parameter(torch.randn(HEADS, tokens, tokens)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, W, N, C)
        b, w, n, c = x.shape
        if self.tf_layout:  # q, k, v (B, W, N, H, D)
            q, k, v = _qkv(self.qkv, x, HEADS, (3, 0, 1, 2, 4, 5))
            sim = torch.einsum("...nhd,...mhd->...hnm", q, k) * self.scale
        else:  # q, k, v (B, W, H, N, D)
            q, k, v = _qkv(self.qkv, x, HEADS, (3, 0, 1, 4, 2, 5))
            sim = torch.einsum("bwhid,bwhjd->bwhij", q, k) * self.scale
        if self.rel_bias is not None:
            sim = sim + self.rel_bias
        attn = sim.softmax(dim=-1)
        if self.tf_layout:
            out = torch.einsum("...hnm,...mhd->...nhd", attn, v).reshape(b, w, n, c)
        else:
            out = torch.einsum("bwhij,bwhjd->bwhid", attn, v).transpose(2, 3).reshape(b, w, n, c)
        return self.proj(out)


class BmmAttention(nn.Module):
    """``bmm`` on heads folded into the batch, the scale dividing the scores."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (B, H, N, D)
        b, h, n, d = q.shape
        q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))
        attn = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / d ** 0.5, dim=-1)
        return torch.bmm(attn, v).view(b, h, n, d)


class TalkingHeads(nn.Module):
    """CaiT's talking-heads attention: ``proj_l`` mixes heads before the softmax, ``proj_w`` after."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = (DIM // HEADS) ** -0.5
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.proj_l, self.proj_w = nn.Linear(HEADS, HEADS), nn.Linear(HEADS, HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = _qkv(self.qkv, x, HEADS, (2, 0, 3, 1, 4))
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ChannelAttention(nn.Module):
    """XCiT's cross-covariance attention over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.temperature = nn.Parameter(torch.ones(HEADS, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = _qkv(self.qkv, x, HEADS, (2, 0, 3, 4, 1))  # (B, H, D, N)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, n, c))


class FactorizedAttention(nn.Module):
    """CoaT's factorized attention (``einsum=True``: CoaT's own einsum spelling)."""

    def __init__(self, einsum: bool = False) -> None:
        super().__init__()
        self.einsum = einsum
        self.scale = (DIM // HEADS) ** -0.5
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = _qkv(self.qkv, x, HEADS, (2, 0, 3, 1, 4))
        k_softmax = k.softmax(dim=-2)
        if self.einsum:
            kv = torch.einsum("bhnk,bhnv->bhkv", k_softmax, v)
            out = torch.einsum("bhnk,bhkv->bhnv", q, kv)
        else:
            out = q @ (k_softmax.transpose(-1, -2) @ v)
        return self.proj((self.scale * out).transpose(1, 2).reshape(b, n, c))


def _seeded(cls, *args, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args, **kwargs).eval()


def swin():
    return _seeded(SwinBlocks), (torch.randn(2, 64, DIM),)


def maxvit():
    return _seeded(MaxVitAttention), (torch.randn(2, 3, 16, DIM),)


def maxvit_tf():
    return _seeded(MaxVitAttention, tf_layout=True, bias=True), (torch.randn(2, 3, 16, DIM),)


def bmm():
    torch.manual_seed(0)
    return BmmAttention().eval(), tuple(torch.randn(2, HEADS, 12, 8) for _ in range(3))


def cait():
    return _seeded(TalkingHeads), (torch.randn(2, 16, DIM),)


def xcit():
    return _seeded(ChannelAttention), (torch.randn(2, 24, DIM),)


def coat():
    return _seeded(FactorizedAttention), (torch.randn(2, 16, DIM),)


def coat_einsum():
    return _seeded(FactorizedAttention, einsum=True), (torch.randn(2, 16, DIM),)


class AllForms(nn.Module):
    """One model with every form above, in sequence on ``(B, 64, C)`` tokens (what inspect is run on)."""

    def __init__(self) -> None:
        super().__init__()
        self.swin = SwinBlocks()
        self.maxvit = MaxVitAttention()
        self.cait, self.xcit, self.coat = TalkingHeads(), ChannelAttention(), FactorizedAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        x = self.swin(x)
        x = x + self.maxvit(x.view(b, 4, n // 4, c)).reshape(b, n, c)
        return x + self.cait(x) + self.xcit(x) + self.coat(x)


def all_forms():
    return _seeded(AllForms), (torch.randn(2, 64, DIM),)
