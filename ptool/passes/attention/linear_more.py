"""InLine, Flowformer and EcoFormer: three more linear-time replacements for softmax attention.

Each kernel follows the contract of :mod:`ptool.passes.attention.kernel` (q ``(B, H, N, D)``,
k ``(B, H, M, D)``, v ``(B, H, M, Dv)``, mask None / bool / additive). Padded keys are removed by
zeroing them (:func:`~ptool.passes.attention.kernel.key_keep`); ``N'`` below is the number of kept
keys (per batch row, and for causal sites per position: the kept keys ``j <= i``). Causal sites
need ``N == M`` and use prefix sums over ``(N, D)`` vectors plus the chunked causal form of
:mod:`~ptool.passes.attention.linear_core` for the ``D x Dv`` state; nothing is ``N x M`` in
``forward`` and nothing is ``(N, D, Dv)``. Sums are float32.

**InLine** (injective linear attention, identity kernel, ``s`` = the site's scale):
``w_ij = (s q_i.k_j - s q_i.kbar + 1) / N'`` with ``kbar`` the mean kept key. This is the paper's
``phi(q_i).phi(k_j) - (1/N') sum_s phi(q_i).phi(k_s) + 1/N'`` with ``s/N'`` folded into ``phi`` as
the reference code (``models/inline_deit.py``) does. Rows sum to 1 exactly and may be negative.
Linear time: ``o_i = (s q_i^T sum_j k_j v_j^T + (1 - s q_i.kbar) sum_j v_j) / N'``.
``local=True`` adds a depthwise conv on V (3x3 over the site's token grid, prefix/CLS tokens get
none; kernel 3 on 1-D sequences, left-padded when causal). It is zero-initialised, so the kernel
starts as pure InLine; the paper predicts the conv kernel per sample from the mean token, which is
out of scope here (a static, trainable kernel instead).

**Flowformer** (``phi = sigmoid``, ``eps = 1e-6``, eps placed as in ``Flow_Attention.py``):
incoming ``I_i = 1/(phi(q_i).sum_j phi(k_j))``, outgoing ``O_j = 1/(phi(k_j).sum_i phi(q_i))``,
conserved ``Ihat_i = phi(q_i).sum_j phi(k_j) O_j``, ``Ohat_j = clamp(phi(k_j).sum_i phi(q_i) I_i,
-1, 1)``, allocation ``a_i = sigmoid(Ihat_i N_q/N')``, competition ``c_j = softmax_j(Ohat) N'``,
``o_i = a_i [phi(q_i) I_i]^T sum_j phi(k_j) c_j v_j``. Padded keys leave every key sum and the
competition softmax (written ``exp / sum exp``: ``|Ohat| <= 1`` needs no max shift). In
self-attention (``N == M``) a padded key is a padded token, so it also leaves the query sums
(``N_q`` is then ``N'``); a cross-attention site of equal lengths would be treated the same way
(the mask cannot tell them apart). Causal: the sums become prefix sums, flows are rescaled by the
position count (``N'_i``, i.e. ``i + 1`` without padding) and competition is
``exp(Ohat_j) / sum_{t<=j} exp(Ohat_t) * N'_j``, as in ``Flow_Attention_Causal``.

**EcoFormer** (kernelized hashing, b bits): both q and k go through one hash per head -
L2-normalise, Gaussian kernel ``exp(-|x - a_t|^2 / (2 sigma))`` against m = 25 anchors, subtract
the kernel mean, project with ``A (H, b, m)``, ``h = sign`` (never 0) with a straight-through
gradient (tanh's, zero outside ``[-1, 1]``), so ``A`` is trainable. For codes in ``{-1, 1}^b``
``h.h' + b = 2 (b - Hamming(h, h')) >= 0``; with the (b + 1)-dim features ``phi_q = [h_q, b]`` and
``phi_k = [h_k, 1]`` (``[h, sqrt(b)]`` on both sides is the same product, but sqrt(b) rounds)
``phi_q.phi_k = h_q.h_k + b`` exactly, so it is a normalized linear attention. (The EcoFormer repo
offsets by ``b + 1``; we keep the exact Hamming similarity.) :meth:`EcoFormerKernel.fit` is a
simplified kernel-supervised-hashing fit on one calibration batch. EcoFormer also needs its model
to be finetuned with a *shared* q/k projection first; ptool does not do that, it hashes the
separate q and k with the same function.

Limits: all three are pretraining architectures (trained from scratch in their papers); converting a trained softmax
model can only distil them, and only InLine's local conv and EcoFormer's ``A`` have parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptool.passes.attention.kernel import (
    AttentionKernel,
    SiteShape,
    allowed,
    causal_allowed,
    key_keep,
    softmax_weights,
)
from ptool.passes.attention.linear_core import DEFAULT_EPS, linear_attention, linear_weights

__all__ = ["LINEAR_MORE_KERNELS", "EcoFormerKernel", "FlowformerKernel", "InLineKernel"]

FLOW_EPS = 1e-6
HASH_ANCHORS = 25
HASH_BITS = 16


class _ChunkedKernel(AttentionKernel):
    """What the three kernels share: option checks and the causal chunk length."""

    def __init__(self, shape: SiteShape, *, feature_dim: int, chunk_size: int) -> None:
        super().__init__(shape)
        if feature_dim < 0:
            raise ValueError(f"feature_dim must be >= 0 (0 = the method's default), got {feature_dim}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size


def _keep(mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor:
    """``(B|1, 1|H, M, 1)`` float32 0/1 factor of kept keys (all ones without a mask)."""
    keep = key_keep(mask, torch.float32)
    return torch.ones(1, 1, k.shape[-2], 1, device=k.device) if keep is None else keep


def _query_keep(keep: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Kept queries: in self-attention (``N == M``) the kept keys' tokens, else every query."""
    if q.shape[-2] == k.shape[-2]:
        return keep
    return torch.ones(1, 1, q.shape[-2], 1, device=q.device)


def _counts(keep: torch.Tensor, causal: bool) -> torch.Tensor:
    """``N'`` - kept keys per row (``(..., 1, 1)``) or per position (``(..., N, 1)``), at least 1."""
    n = keep.cumsum(-2) if causal else keep.sum(-2, keepdim=True)
    return n.clamp(min=1.0)


def _sums(x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Sums over the sequence: prefix sums when causal."""
    return x.cumsum(-2) if causal else x.sum(-2, keepdim=True)


def _causal_keys(a: torch.Tensor) -> torch.Tensor:
    n, m = a.shape[-2:]
    return causal_allowed(n, m, a.device)


class InLineKernel(_ChunkedKernel):
    """InLine injective linear attention with an optional local depthwise-conv branch.

    Args:
        shape: the site.
        feature_dim: ignored (the kernel is the identity on ``D`` features).
        chunk_size: chunk length of the causal form.
        seed: ignored (the only parameters, the local conv, start at zero).
        local: add the zero-initialised depthwise conv on V (self-attention sites only).

    Raises:
        ValueError: bad options; ``local`` on a cross-attention site; a grid that does not cover
            the keys after the prefix.
    """

    def __init__(self, shape: SiteShape, *, feature_dim: int = 0, chunk_size: int = 64, seed: int = 0,
                 local: bool = False) -> None:
        super().__init__(shape, feature_dim=feature_dim, chunk_size=chunk_size)
        self.local = local
        self.local_weight: nn.Parameter | None = None
        if local:
            if shape.q_len != shape.kv_len:
                raise ValueError(f"local=True needs a self-attention site (q_len == kv_len), got "
                                 f"{shape.q_len} queries and {shape.kv_len} keys")
            channels = shape.heads * shape.value_dim
            if self._grid is not None:
                rows, cols = self._grid
                if shape.prefix + rows * cols != shape.kv_len:
                    raise ValueError(f"grid {self._grid} with prefix {shape.prefix} covers "
                                     f"{shape.prefix + rows * cols} tokens, the site has {shape.kv_len}")
                self.local_weight = nn.Parameter(torch.zeros(channels, 1, 3, 3))
            else:
                self.local_weight = nn.Parameter(torch.zeros(channels, 1, 3))

    @property
    def _grid(self) -> tuple[int, int] | None:
        # A causal site reads its tokens as a sequence: a 3x3 conv would see the future.
        return None if self.shape.causal else self.shape.grid

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        causal, s = self.shape.causal, self.shape.scale
        keep = _keep(mask, k)
        q32, k32, v32 = q.float(), k.float() * keep, v.float() * keep
        qkv = linear_attention(q32, k32, v32, causal=causal, normalize=False, chunk=self.chunk_size)
        count = _counts(keep, causal)
        q_kbar = (q32 * _sums(k32, causal)).sum(-1, keepdim=True) / count
        out = (s * qkv + (1.0 - s * q_kbar) * _sums(v32, causal)) / count
        if self.local_weight is not None:
            out = out + self._local(v32)
        return out.to(q.dtype)

    def _local(self, v: torch.Tensor) -> torch.Tensor:
        """Depthwise conv of (padding-zeroed) v over the tokens, per head and channel."""
        b, h, m, dv = v.shape
        x = v.permute(0, 1, 3, 2).reshape(b, h * dv, m)
        w = self.local_weight.float()
        if self._grid is not None:
            rows, cols = self._grid
            p = self.shape.prefix
            y = F.conv2d(x[..., p:].reshape(b, h * dv, rows, cols), w, padding=1, groups=h * dv)
            y = F.pad(y.reshape(b, h * dv, rows * cols), (p, 0))  # prefix tokens get no local term
        elif self.shape.causal:
            y = F.conv1d(F.pad(x, (2, 0)), w, groups=h * dv)
        else:
            y = F.conv1d(x, w, padding=1, groups=h * dv)
        return y.reshape(b, h, dv, m).permute(0, 1, 3, 2)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
        """The InLine rows ``(B, H, N, M)`` (sum to 1, may be negative); the local branch is not a row."""
        keep = _keep(mask, k)
        a = self.shape.scale * (q.float() @ k.float().transpose(-1, -2))
        ok = keep.transpose(-1, -2).expand(*a.shape[:-2], 1, a.shape[-1])
        if self.shape.causal:
            ok = ok * _causal_keys(a)
        count = ok.sum(-1, keepdim=True).clamp(min=1.0)
        mean = (a * ok).sum(-1, keepdim=True) / count
        return ((a - mean + 1.0) / count * ok).to(q.dtype)


class FlowformerKernel(_ChunkedKernel):
    """Flowformer flow-conservation attention (non-causal and causal); no parameters.

    Args:
        shape: the site.
        feature_dim: ignored (``phi = sigmoid`` on ``D`` features).
        chunk_size: chunk length of the causal form.
        seed, local: ignored.

    Raises:
        ValueError: bad options.
    """

    def __init__(self, shape: SiteShape, *, feature_dim: int = 0, chunk_size: int = 64, seed: int = 0,
                 local: bool = False) -> None:
        super().__init__(shape, feature_dim=feature_dim, chunk_size=chunk_size)
        self.eps = FLOW_EPS

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        causal, eps = self.shape.causal, self.eps
        keep = _keep(mask, k)
        qkeep = _query_keep(keep, q, k)
        fq, fk = torch.sigmoid(q.float()), torch.sigmoid(k.float())
        fq_in, fk_in = fq * qkeep, fk * keep  # what enters the sums
        n_k = _counts(keep, causal)  # causal: the position count ("normal" in the reference code)

        def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return ((a + eps) * (b + eps)).sum(-1, keepdim=True)

        incoming = 1.0 / dot(fq, _sums(fk_in, causal))
        outgoing = 1.0 / dot(fk, _sums(fq_in, causal))
        if causal:
            sink = dot(fq, _sums(fk_in * outgoing * n_k, causal)) / n_k
            source = (dot(fk, _sums(fq_in * incoming * n_k, causal)) / n_k).clamp(-1.0, 1.0)
            allocation = torch.sigmoid(sink)
            e = torch.exp(source) * keep
            # padded j: e_j = 0 over a denominator made >= 1, so c_j = 0 (and no 0/0 before a kept key)
            competition = e / (e.cumsum(-2) + (1.0 - keep)) * n_k
        else:
            sink = dot(fq, _sums(fk_in * outgoing, causal))
            source = dot(fk, _sums(fq_in * incoming, causal)).clamp(-1.0, 1.0)
            allocation = torch.sigmoid(sink * (qkeep.sum(-2, keepdim=True) / n_k))
            e = torch.exp(source) * keep  # softmax over kept keys; |source| <= 1, no max shift needed
            competition = e / e.sum(-2, keepdim=True).clamp(min=eps) * n_k
        out = linear_attention(fq * incoming, fk, v.float() * competition, causal=causal, keep=keep,
                               normalize=False, chunk=self.chunk_size)
        return (out * allocation).to(q.dtype)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """None: the competition reweights values and the allocation gates rows, so no row of weights."""
        return None


class EcoFormerKernel(_ChunkedKernel):
    """EcoFormer hashed attention: binary codes of q and k, Hamming similarity as a linear kernel.

    Args:
        shape: the site.
        feature_dim: code bits ``b`` (0 = 16); features are ``b + 1`` wide.
        chunk_size: chunk length of the causal form.
        seed: seeds the anchors, the projection ``A`` and :meth:`fit`.
        local: ignored.

    Raises:
        ValueError: bad options.
    """

    def __init__(self, shape: SiteShape, *, feature_dim: int = 0, chunk_size: int = 64, seed: int = 0,
                 local: bool = False) -> None:
        super().__init__(shape, feature_dim=feature_dim, chunk_size=chunk_size)
        self.seed = seed
        self.bits = feature_dim or HASH_BITS
        heads, d, m = shape.heads, shape.head_dim, HASH_ANCHORS
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("anchors", F.normalize(torch.randn(heads, m, d, generator=g), dim=-1))
        # sigma = mean squared distance; 2 is its value for independent random unit vectors
        self.register_buffer("sigma", torch.full((heads, 1, 1), 2.0))
        sample = F.normalize(torch.randn(1, heads, 256, d, generator=g), dim=-1)  # the kernel mean of random tokens
        self.register_buffer("center", self._kernel(sample).mean(dim=(0, 2)).unsqueeze(1))  # (H, 1, m)
        self.proj = nn.Parameter(torch.randn(heads, self.bits, m, generator=g))

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Gaussian kernel ``(B, H, N, m)`` of L2-normalised tokens against the anchors, uncentred."""
        x = F.normalize(x.float(), dim=-1)
        a = self.anchors
        d2 = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ a.transpose(-1, -2)) + (a * a).sum(-1).unsqueeze(-2)
        return torch.exp(-d2 / (2.0 * self.sigma))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return (self._kernel(x) - self.center) @ self.proj.transpose(-1, -2)  # (B, H, N, b)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """``{-1, 1}`` codes ``(B, H, N, b)`` of q or k; the gradient is tanh's inside ``[-1, 1]``, else 0."""
        y = self._project(x)
        hard = torch.where(y >= 0, 1.0, -1.0)  # never 0, so backends cannot disagree on sign(0)
        if not torch.is_grad_enabled():
            return hard
        soft = torch.where(y.abs() <= 1.0, torch.tanh(y), torch.zeros_like(y))
        return hard + (soft - soft.detach())  # exactly ``hard`` forward, ``d soft`` backward

    def query_features(self, q: torch.Tensor) -> torch.Tensor:
        """``[h_q, b]`` ``(B, H, N, b + 1)``; with :meth:`key_features` the product is ``h_q.h_k + b``."""
        return F.pad(self.codes(q), (0, 1), value=float(self.bits))

    def key_features(self, k: torch.Tensor) -> torch.Tensor:
        """``[h_k, 1]`` ``(B, H, M, b + 1)`` (the offset sits on the query side: exact in floats)."""
        return F.pad(self.codes(k), (0, 1), value=1.0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        out = linear_attention(self.query_features(q), self.key_features(k), v.float(), causal=self.shape.causal,
                               keep=key_keep(mask, torch.float32), chunk=self.chunk_size)
        return out.to(q.dtype)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized Hamming-similarity rows ``(B, H, N, M)``."""
        w = linear_weights(self.query_features(q), self.key_features(k), causal=self.shape.causal,
                           keep=key_keep(mask, torch.float32), eps=DEFAULT_EPS)
        return w.to(q.dtype)

    def fit(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, *, steps: int = 100,
            lr: float = 0.2, top: int = 10) -> float:
        """Fit the hash to one calibration batch (simplified kernel-supervised hashing).

        Anchors become ``m`` kept key tokens sampled per head, ``sigma`` their mean squared distance
        to the kept keys, ``center`` the mean kernel of kept keys and queries. Targets per query:
        +1 for its ``top`` highest softmax keys, -1 for its ``top`` lowest (allowed keys only;
        rows with fewer than ``2 top`` keys label their keys +1 first). ``A`` then minimises
        ``mean((r_q.r_k / b - target)^2)`` over the labelled pairs with the relaxation
        ``r = 2 sigmoid(y) - 1``, by Adam for ``steps`` steps from its current value. EcoFormer
        fits greedily bit by bit with SGD; this optimises all bits jointly. Last, each bit's row of
        ``A`` is rescaled so the mean ``|y|`` over the kept keys is 0.5: codes are invariant to a
        positive scale, and the straight-through window ``[-1, 1]`` then still covers most tokens
        (after the fit ``|y|`` is mostly > 1, which would stop every later gradient).

        Args:
            q, k: a calibration batch ``(B, H, N, D)`` / ``(B, H, M, D)`` of the site.
            mask: the site's mask for that batch.
            steps, lr, top: optimiser steps, Adam learning rate, labels per side.

        Returns:
            The final relaxed loss.
        """
        g = torch.Generator().manual_seed(self.seed)
        q, k = q.detach().float(), k.detach().float()
        keep = _keep(mask, k).expand(k.shape[0], k.shape[1], -1, -1)[..., 0] > 0  # (B, H, M)
        qkeep = _query_keep(keep.unsqueeze(-1).float(), q, k).expand(q.shape[0], q.shape[1], -1, -1)
        kn = F.normalize(k, dim=-1)
        with torch.no_grad():
            anchors = []
            for h in range(self.shape.heads):
                pool = kn[:, h][keep[:, h]]
                if len(pool) == 0:
                    raise ValueError("fit needs at least one unmasked key")
                if len(pool) >= HASH_ANCHORS:
                    idx = torch.randperm(len(pool), generator=g)[:HASH_ANCHORS]
                else:
                    idx = torch.randint(len(pool), (HASH_ANCHORS,), generator=g)
                anchors.append(pool[idx])
            self.anchors.copy_(torch.stack(anchors))
            a = self.anchors
            d2 = 2.0 - 2.0 * (kn @ a.transpose(-1, -2))  # unit vectors: |x - a|^2 = 2 - 2 x.a
            kf = keep.unsqueeze(-1).float()
            self.sigma.copy_(((d2 * kf).sum((0, 2, 3)) / (kf.sum((0, 2, 3)) * HASH_ANCHORS)).view(-1, 1, 1))
            kq, kk = self._kernel(q), self._kernel(k)
            total = (kq * qkeep).sum((0, 2)) + (kk * kf).sum((0, 2))
            self.center.copy_((total / (qkeep.sum((0, 2)) + kf.sum((0, 2)))).unsqueeze(1))
            target = self._targets(q, k, mask, top) * qkeep
            kq, kk = kq - self.center, kk - self.center
        labelled = target != 0
        opt = torch.optim.Adam([self.proj], lr=lr)
        loss = torch.zeros(())
        with torch.enable_grad():
            for _ in range(steps):
                rq = 2 * torch.sigmoid(kq @ self.proj.transpose(-1, -2)) - 1
                rk = 2 * torch.sigmoid(kk @ self.proj.transpose(-1, -2)) - 1
                sim = rq @ rk.transpose(-1, -2) / self.bits
                loss = ((sim - target)[labelled] ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            y = (kk @ self.proj.transpose(-1, -2)).abs()  # (B, H, M, b)
            mean_abs = (y * kf).sum((0, 2)) / kf.sum((0, 2))  # (H, b)
            self.proj.mul_((0.5 / mean_abs.clamp(min=1e-12)).unsqueeze(-1))
        return float(loss.detach())

    def _targets(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, top: int) -> torch.Tensor:
        """+1 for each query's ``top`` strongest allowed keys, -1 for its ``top`` weakest, else 0."""
        w = softmax_weights(q, k, mask, self.shape.scale, self.shape.causal).float()
        ok = allowed(mask)
        ok = torch.ones_like(w, dtype=torch.bool) if ok is None else ok.expand_as(w)
        if self.shape.causal:
            ok = ok & _causal_keys(w)
        n = min(top, w.shape[-1])
        target = torch.zeros_like(w)
        target.scatter_(-1, w.masked_fill(~ok, 2.0).topk(n, largest=False).indices, -1.0)
        target.scatter_(-1, w.masked_fill(~ok, -1.0).topk(n).indices, 1.0)
        return target * ok


LINEAR_MORE_KERNELS: dict[str, type[AttentionKernel]] = {
    "inline": InLineKernel,
    "flow": FlowformerKernel,
    "hash": EcoFormerKernel,
}
"""The three maps of this module by option name (the pass merges them with ``LINEAR_KERNELS``)."""
