"""Linear-attention kernels: softmax attention with ``exp(q . k * scale)`` replaced by ``phi(q) . phi(k)``.

Every kernel here computes, per head, with the shared core (:mod:`.linear_core`)::

    o_i = sum_j phi(q_i) . phi(k_j) v_j  /  sum_j phi(q_i) . phi(k_j)        (j <= i when causal)

in ``O(N m Dv)`` (non-causal: associativity; causal: chunks of ``chunk_size``) and, for causal
sites, one token at a time from a constant-size state ``(S, z)`` (:meth:`decode_step`). Padded keys
are removed by zeroing ``phi(k)`` (:func:`.kernel.key_keep`); a linear kernel can honour only
*key* masks: a mask that differs between queries beyond causality (e.g. sliding windows) is reduced
to "keys some query may see". Causal sites must have ``q_len == kv_len`` (prefill graphs).

The maps (``LINEAR_KERNELS`` key -> class):

* ``elu`` (:class:`EluKernel`): ``phi = elu + 1`` (Katharopoulos 2020). No parameters.
* ``relu`` (:class:`ReluKernel`): SLAB's simplified linear attention. ``phi = relu``, a learnable
  positional embedding added to ``k`` (``(1, 1, kv_len, D)``, zeros) and a depthwise-conv term on
  ``v`` added to the output: 5x5 over the ``(rows, cols)`` grid when the site has one (prefix/CLS
  tokens get none), else 5 taps along the tokens (left-padded for causal sites). The conv is shared
  across heads and initialised to zero, so the fresh kernel is plain ReLU linear attention; the
  conversion trains it. The conv needs ``q_len == kv_len`` and is left out otherwise.
* ``performer`` (:class:`PerformerKernel`): FAVOR+ positive orthogonal random features with a fixed
  seeded projection (a buffer), ``m = round(D ln D)`` by default; unbiased for the softmax kernel
  itself, so it is the one map that approximates a pretrained model's attention without training
  (with variance shrinking as ``m`` grows). Stabilisers: :class:`.feature_maps.PerformerFeatures`.
* ``hedgehog`` (:class:`HedgehogKernel`): Hedgehog / LoLCATs learnable per-head maps (untied for q
  and k), ``[softmax_f(x W), softmax_f(-x W)]``, ``m = 2 f``, starting at ``W = I``.
* ``transnormer`` (:class:`TransNormerKernel`): TransNormer's NormAttention - ``phi = elu + 1``,
  *no* denominator, then SimpleRMSNorm ``x / (rms(x) + eps)`` over the concatenated heads of each
  token and a learnable scalar gain (starts at 1: outputs of unit RMS, where softmax outputs are
  averages of values - distillation sets the scale). With ``local=True`` it is DiagAttention
  instead: softmax inside blocks of ``chunk_size`` tokens (block-diagonal, causal inside the block
  for causal sites), then the same norm; the pass chooses which layers get which.

Options: ``feature_dim`` (0 = the map's default) is used by performer (``m``) and hedgehog (``f``);
``seed`` by performer (projection) and hedgehog (init noise when ``f != D``); ``chunk_size`` by the
causal core and DiagAttention; ``local`` only by transnormer (LoLCATs' sliding-window hybrid is not
implemented). Others ignore options they do not use.

Limits: none of these is function-preserving on a pretrained softmax model.
Hedgehog (and elu/performer as baselines) convert by attention distillation
(:meth:`AttentionKernel.attention_weights` gives the rows); SLAB's SLA and TransNormer are
pretraining architectures with no published conversion recipe, so distillation here is our own.
TransNormer has no weights to distil (no row normalisation): :meth:`attention_weights` is ``None``,
and ReLU's weights leave out the conv term. Decoding: elu, performer, hedgehog and NormAttention
(causal sites); relu's positional embedding and conv term need the absolute position and the last
values, which the ``(S, z)`` state does not carry, and DiagAttention needs a block KV cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptool.passes.attention import linear_core as core
from ptool.passes.attention.feature_maps import HedgehogFeatures, PerformerFeatures, elu_plus_one
from ptool.passes.attention.kernel import AttentionKernel, SiteShape, allowed, key_keep

__all__ = [
    "EluKernel", "HedgehogKernel", "LINEAR_KERNELS", "LinearKernel", "PerformerKernel", "RecurrentDecoder",
    "ReluKernel", "TransNormerKernel",
]

_CONV_TAPS = 5


class LinearKernel(AttentionKernel):
    """Base of the feature-map kernels: ``features`` -> the linear core (see the module docstring).

    Args:
        shape: the site.
        feature_dim: feature count where the map has one (0: the map's default).
        chunk_size: chunk length of the causal form (and DiagAttention's block).
        seed: random seed where the map has one.
        local: the map's local term (TransNormer's DiagAttention; ignored by the others).

    Raises:
        ValueError: ``chunk_size < 1``, ``feature_dim < 0``, or a causal site with ``q_len != kv_len``.
    """

    normalize: bool = True
    """Divide by the row sum (False: TransNormer's NormAttention)."""

    def __init__(self, shape: SiteShape, *, feature_dim: int = 0, chunk_size: int = 64, seed: int = 0,
                 local: bool = False) -> None:
        super().__init__(shape)
        if chunk_size < 1 or feature_dim < 0:
            raise ValueError(f"need chunk_size >= 1 and feature_dim >= 0, got {chunk_size} and {feature_dim}")
        if shape.causal and shape.q_len != shape.kv_len:
            raise ValueError(f"a causal linear kernel needs q_len == kv_len, got {shape.q_len} and {shape.kv_len}")
        self.chunk_size = chunk_size

    def features(self, q: torch.Tensor, k: torch.Tensor,
                 keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi(q) (B, H, N, m), phi(k) (B, H, M, m))`` in float32; ``keep`` as from ``key_keep``."""
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = key_keep(mask, torch.float32)
        fq, fk = self.features(q, k, keep)
        out = core.linear_attention(fq, fk, v, causal=self.shape.causal, keep=keep, normalize=self.normalize,
                                    chunk=self.chunk_size)
        return self._finish(out.float(), v, keep).to(q.dtype)

    def _finish(self, out: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Terms added after the core (SLAB's conv, TransNormer's norm); float32 in and out."""
        return out

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The normalised ``(B, H, N, M)`` rows ``phi(q_i) . phi(k_j) / sum_j`` (zero for padded keys)."""
        keep = key_keep(mask, torch.float32)
        fq, fk = self.features(q, k, keep)
        return core.linear_weights(fq, fk, causal=self.shape.causal, keep=keep).to(q.dtype)

    @property
    def supports_decode(self) -> bool:
        """Whether :meth:`decode_step` works: causal sites of maps whose state is ``(S, z)`` alone."""
        return self.shape.causal

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """An empty decode state ``(S (batch, H, m, Dv), z (batch, H, m))``; float32 is what the core sums in."""
        self._check_decode()
        q = torch.zeros(1, self.shape.heads, 1, self.shape.head_dim, device=self._device())
        with torch.no_grad():
            m = self.features(q, q)[1].shape[-1]
        s, z = core.init_state(q.new_empty(batch, self.shape.heads, 0, m), self.shape.value_dim)
        return s.to(dtype), z.to(dtype)

    def decode_step(self, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                    state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One causal step: ``q_t, k_t`` ``(B, H, 1, D)``, ``v_t`` ``(B, H, 1, Dv)`` -> ``(o_t, state)``.

        Matches row ``t`` of :meth:`forward` on the prefix (no mask: skip padded tokens instead).

        Raises:
            NotImplementedError: the kernel cannot decode (see :attr:`supports_decode`).
        """
        self._check_decode()
        fq, fk = self.features(q_t, k_t)
        out, state = core.recurrent_step(fq, fk, v_t, state, normalize=self.normalize)
        return self._finish(out.float(), v_t, None).to(q_t.dtype), state

    def _check_decode(self) -> None:
        if not self.supports_decode:
            why = "a non-causal site" if not self.shape.causal else "this kernel's extra terms"
            raise NotImplementedError(f"{type(self).__name__} cannot decode step by step ({why}); "
                                      "decode is available for causal elu, performer, hedgehog and transnormer "
                                      "(local=False) kernels")

    def _device(self) -> torch.device:
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")


class EluKernel(LinearKernel):
    """``phi = elu + 1`` (Katharopoulos et al. 2020); parameter-free. ``feature_dim``, ``seed`` and
    ``local`` are ignored."""

    def features(self, q, k, keep=None):
        return elu_plus_one(q), elu_plus_one(k)


class ReluKernel(LinearKernel):
    """SLAB simplified linear attention: ``relu`` features, a positional embedding on ``k`` and a
    zero-initialised depthwise conv on ``v`` (module docstring). ``feature_dim``, ``seed`` and
    ``local`` are ignored; cannot decode.

    Raises:
        ValueError: a grid site whose ``kv_len`` is not ``prefix + rows * cols``.
    """

    def __init__(self, shape: SiteShape, *, feature_dim: int = 0, chunk_size: int = 64, seed: int = 0,
                 local: bool = False) -> None:
        super().__init__(shape, feature_dim=feature_dim, chunk_size=chunk_size, seed=seed, local=local)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, shape.kv_len, shape.head_dim))
        self.conv: nn.Module | None = None
        dv = shape.value_dim
        # Cross-attention (q_len != kv_len) gets no conv term: no value token belongs to a query.
        if shape.q_len == shape.kv_len and shape.grid is not None and not shape.causal:
            rows, cols = shape.grid
            if shape.prefix + rows * cols != shape.kv_len:
                raise ValueError(f"grid {rows}x{cols} + prefix {shape.prefix} != kv_len {shape.kv_len}")
            self.conv = nn.Conv2d(dv, dv, _CONV_TAPS, padding=_CONV_TAPS // 2, groups=dv)
        elif shape.q_len == shape.kv_len:  # causal sites use 1-D even on a grid: 2-D would see later rows
            self.conv = nn.Conv1d(dv, dv, _CONV_TAPS, groups=dv)
        if self.conv is not None:
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def features(self, q, k, keep=None):
        return F.relu(q.float()), F.relu(k.float() + self.pos_embed.float())

    def _finish(self, out, v, keep):
        if self.conv is None:
            return out
        v = v.float() if keep is None else v.float() * keep  # padded values must not leak through the conv
        b, h, n, dv = v.shape
        w, bias = self.conv.weight.float(), self.conv.bias.float()
        if isinstance(self.conv, nn.Conv2d):
            p = self.shape.prefix
            rows, cols = self.shape.grid
            grid = v[:, :, p:].reshape(b * h, rows, cols, dv).permute(0, 3, 1, 2)
            local = F.conv2d(grid, w, bias, padding=_CONV_TAPS // 2, groups=dv)
            local = local.permute(0, 2, 3, 1).reshape(b, h, rows * cols, dv)
            local = torch.cat([local.new_zeros(b, h, p, dv), local], dim=2)
        else:
            pad = (_CONV_TAPS - 1, 0) if self.shape.causal else (_CONV_TAPS // 2, _CONV_TAPS // 2)
            seq = F.pad(v.reshape(b * h, n, dv).transpose(1, 2), pad)
            local = F.conv1d(seq, w, bias, groups=dv).transpose(1, 2).reshape(b, h, n, dv)
        return out + local

    @property
    def supports_decode(self) -> bool:
        return False


class PerformerKernel(LinearKernel):
    """FAVOR+ (Choromanski et al. 2021): ``feature_dim`` = ``m`` random features (0: ``round(D ln D)``),
    ``seed`` seeds the projection; ``local`` is ignored. No trainable parameters."""

    def __init__(self, shape: SiteShape, *, feature_dim: int = 0, chunk_size: int = 64, seed: int = 0,
                 local: bool = False) -> None:
        super().__init__(shape, feature_dim=feature_dim, chunk_size=chunk_size, seed=seed, local=local)
        self.feature_map = PerformerFeatures(shape.head_dim, shape.scale, features=feature_dim, seed=seed,
                                             causal=shape.causal)

    def features(self, q, k, keep=None):
        return self.feature_map.query(q), self.feature_map.key(k, keep)


class HedgehogKernel(LinearKernel):
    """Hedgehog / LoLCATs: untied learnable maps for q and k, ``feature_dim`` = ``f`` per sign (0: ``D``),
    ``seed`` seeds the init noise when ``f != D``; ``local`` (LoLCATs' window) is not implemented."""

    def __init__(self, shape: SiteShape, *, feature_dim: int = 0, chunk_size: int = 64, seed: int = 0,
                 local: bool = False) -> None:
        super().__init__(shape, feature_dim=feature_dim, chunk_size=chunk_size, seed=seed, local=local)
        h, d = shape.heads, shape.head_dim
        self.q_map = HedgehogFeatures(h, d, shape.scale, features=feature_dim, seed=seed)
        self.k_map = HedgehogFeatures(h, d, shape.scale, features=feature_dim, seed=seed + 1)

    def features(self, q, k, keep=None):
        return self.q_map(q), self.k_map(k)


class TransNormerKernel(LinearKernel):
    """TransNormer: NormAttention, or DiagAttention with ``local=True`` (module docstring).

    ``chunk_size`` is the causal chunk and DiagAttention's block; ``feature_dim`` and ``seed`` are
    ignored. :meth:`attention_weights` is ``None``: the output is not a row-normalised sum of values.

    Raises:
        ValueError: DiagAttention on a site with ``q_len != kv_len``.
    """

    normalize = False

    def __init__(self, shape: SiteShape, *, feature_dim: int = 0, chunk_size: int = 64, seed: int = 0,
                 local: bool = False) -> None:
        super().__init__(shape, feature_dim=feature_dim, chunk_size=chunk_size, seed=seed, local=local)
        if local and shape.q_len != shape.kv_len:
            raise ValueError(f"DiagAttention needs q_len == kv_len, got {shape.q_len} and {shape.kv_len}")
        self.local = local
        self.gain = nn.Parameter(torch.ones(()))

    def features(self, q, k, keep=None):
        return elu_plus_one(q), elu_plus_one(k)

    def forward(self, q, k, v, mask=None):
        if not self.local:
            return super().forward(q, k, v, mask)
        out = _block_softmax_attention(q, k, v, mask, self.shape.scale, self.chunk_size, self.shape.causal)
        return self._finish(out, v, None).to(q.dtype)

    def _finish(self, out, v, keep):
        # over the concatenated heads of a token; the floor keeps sqrt's gradient finite on all-zero rows
        # (padded queries), which would otherwise turn every gradient upstream into NaN
        rms = out.pow(2).mean(dim=(1, 3), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny).sqrt()
        return out / (rms + core.DEFAULT_EPS) * self.gain.float()

    def attention_weights(self, q, k, mask=None):
        return None

    @property
    def supports_decode(self) -> bool:
        return self.shape.causal and not self.local

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {'DiagAttention' if self.local else 'NormAttention'}"


def _block_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                             scale: float, block: int, causal: bool) -> torch.Tensor:
    """Softmax attention inside consecutive blocks of ``block`` tokens (``N == M``), float32 out.

    Rows whose keys are all masked give 0 (a plain softmax would spread them over masked keys).
    """
    b, h, n, _ = q.shape
    c = max(1, min(block, n))
    nc = math.ceil(n / c)
    pad = nc * c - n
    qc, kc, vc = (F.pad(t.float(), (0, 0, 0, pad)).reshape(b, h, nc, c, t.shape[-1]) for t in (q, k, v))
    ok = (torch.arange(nc * c, device=q.device) < n).reshape(nc, 1, c)  # padding added here
    if causal:
        ok = ok & torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    user = allowed(mask)
    if user is not None:
        user = user.reshape((1,) * (4 - user.dim()) + tuple(user.shape)).float()
        user = user.expand(*user.shape[:-1], n)
        if user.shape[-2] == 1:  # one row for every query: only the keys' blocks matter
            user = F.pad(user, (0, pad)).reshape(*user.shape[:2], nc, 1, c)
        else:
            user = F.pad(user, (0, pad, 0, pad)).reshape(*user.shape[:2], nc, c, nc, c)
            user = torch.diagonal(user, dim1=2, dim2=4).permute(0, 1, 4, 2, 3)  # the diagonal blocks
        ok = ok & (user > 0)
    scores = (qc @ kc.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~ok, torch.finfo(scores.dtype).min)
    weights = scores.softmax(-1) * ok.any(-1, keepdim=True)
    return (weights @ vc).reshape(b, h, nc * c, -1)[:, :, :n]


class RecurrentDecoder(nn.Module):
    """One decode step of a causal kernel as its own graph: ``(q_t, k_t, v_t, S, z) -> (o_t, S, z)``.

    Exportable with static shapes (``torch.export`` / ONNX); the state starts at
    ``kernel.init_state(batch)``.

    Raises:
        NotImplementedError: the kernel cannot decode.
    """

    def __init__(self, kernel: LinearKernel) -> None:
        super().__init__()
        kernel._check_decode()
        self.kernel = kernel

    def forward(self, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, s: torch.Tensor,
                z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, (s, z) = self.kernel.decode_step(q_t, k_t, v_t, (s, z))
        return out, s, z


LINEAR_KERNELS: dict[str, type[LinearKernel]] = {
    "elu": EluKernel,
    "relu": ReluKernel,
    "performer": PerformerKernel,
    "hedgehog": HedgehogKernel,
    "transnormer": TransNormerKernel,
}
"""The feature maps by option value; every class takes ``(shape, *, feature_dim, chunk_size, seed, local)``."""
