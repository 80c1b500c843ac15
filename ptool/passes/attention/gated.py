"""Gated and delta-rule linear attention: GLA, DeltaNet and a RetNet-style decay as conversion targets.

Each kernel keeps a feature map of :mod:`.linear` (``phi``: hedgehog, elu or performer) and
replaces the normalized sum ``phi(q_i) . sum_j phi(k_j) v_j / (...)`` by a linear RNN over the
state ``S`` (``m x Dv`` per head), read as ``o_t = phi(q_t) S_t``, with **no denominator**:

* **GLA** (``mixer=gla``, Yang et al. 2024): ``S_t = Diag(alpha_t) S_{t-1} + phi(k_t)^T v_t``,
  a data-dependent diagonal decay ``alpha_t = sigmoid(k_t W1 W2 + b)^(1/16)`` per feature, from a
  rank-16 gate (computed as ``logsigmoid(.) / 16`` in log space). GLA computes the gate from the
  token's hidden state ``x_t``; a kernel sees only the site's q, k, v, so the gate reads the
  token's key ``k_t`` (per head, a linear function of ``x_t``).
* **RetNet** (``mixer=retnet``): ``S_t = gamma_h S_{t-1} + phi(k_t)^T v_t`` with RetNet's fixed
  per-head decay ``gamma_h = 1 - 2^(-5-h)`` (a buffer: not trained).
* **DeltaNet** (``mixer=delta``): the delta rule
  ``S_t = (I - beta_t k^_t^T k^_t) S_{t-1} + beta_t k^_t^T v_t`` on L2-normalised features
  ``k^ = phi(k)/|phi(k)|`` (and ``q^`` likewise), ``beta_t = sigmoid(k_t . w + b)`` per head.

All three end as GLA / RetNet / DeltaNet do: ``o = SiLU(q_t W_g + b_g) * LayerNorm(o_t)`` (a
per-head layer norm over ``Dv`` without affine, and an output gate - again from ``q_t``, the
token's own projection, in place of ``x_t``).

**Forms** (causal sites; ``N == M`` is required):

* *chunked* (:func:`gated_chunked`, :func:`delta_chunked`, what ``forward`` runs): chunks of ``C``
  tokens (GLA and DeltaNet: at most :data:`GLA_CHUNK`). GLA/RetNet: inside a chunk the masked
  ``C x C`` decayed scores (RetNet: ``gamma^(i-j)``; GLA: ``(q_i exp(b_i)) . (k_j exp(-b_j))`` with
  ``b`` the in-chunk cumulative log-decay, in float32's range thanks to :data:`GLA_LOG_DECAY_MIN`),
  across chunks the state at each chunk's start: RetNet from an ``nc x nc`` decay matrix (one
  MatMul), GLA by ``S <- exp(b_C) S + summary`` per chunk, unrolled over the ``N / C`` chunks
  (plain MatMul / CumSum / Exp, every exponent <= 0, static shapes, no Loop). DeltaNet: the WY /
  UT transform per chunk, ``T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta)``, ``W = T K``,
  ``U = T V``; ONNX has no triangular solve, so the unit lower-triangular inverse is built by
  blocks (:func:`_unit_lower_inverse`: ``log2 C`` rounds of batched MatMuls); the chunk-start states
  follow ``S <- S + K^T (U - W S)``, two small MatMuls per chunk, unrolled over the chunks. Then
  ``O = Q S_0 + tril(Q K^T) (U - W S_0)``.
* *quadratic* (:func:`gated_quadratic`, :func:`delta_quadratic`): the materialised ``N x N``
  matrix (DeltaNet's through ``torch.linalg.solve_triangular`` over the whole sequence) in
  float64 - the reference of the tests.
* *recurrent* (:meth:`GatedKernel.decode_step`, :class:`StateDecoder`): one token at a time from
  the constant-size state ``S`` ``(B, H, m, Dv)``.

**Non-causal sites** (encoders, ViTs) scan both ways with the same parameters: GLA / RetNet
``o = fwd + bwd - (phi(q_i) . phi(k_i)) v_i`` (RetNet's ``gamma^|i-j|``; the token itself once),
DeltaNet ``o = fwd + bwd`` (each direction's delta rule includes the token; the output norm
makes the sum an average). ``bwd`` is the causal form run on the reversed sequence; both scans
run as one call, the reversed sequence stacked on the batch. RetNet's fixed decay has a parallel
form, used up to :data:`PARALLEL_MAX_LEN` tokens: ``((phi(Q) phi(K)^T) * D) V`` with the decay
matrix ``D_ij = gamma^|i-j|`` (:func:`decay_parallel`), one ``N x N`` score matrix.

**Padding**: a padded key gets zero features, a zero log-decay (``alpha = 1``) and ``beta = 0``:
it neither writes to the state nor decays it, so it has no influence in either direction.

**Conversion**: none of the three has rows that multiply ``v`` (no normalisation, then the output
norm and gate), so :meth:`attention_weights` is ``None`` and the attention transfer trains every
parameter (feature maps, gates, decays, output gate) on the output term alone (LoLCATs' MSE);
:meth:`GatedKernel.fit_batches` first sets the output gate's bias so that each channel's RMS
matches the softmax output's on the calibration data. Then end-to-end distillation as for every
kernel. DeltaProduct's extra Householder steps and the ``beta in [0, 2]`` variant are not built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptool.passes.attention.kernel import AttentionKernel, SiteShape, key_keep, softmax_attention

__all__ = [
    "GATED_KERNELS", "GATED_FEATURE_MAPS", "DeltaKernel", "GLAKernel", "GatedKernel", "RetNetKernel", "StateDecoder",
    "decay_parallel", "delta_chunked", "delta_quadratic", "gated_chunked", "gated_quadratic",
]

GLA_RANK = 16
"""Rank of GLA's gate projection ``W1 W2``."""
GLA_TEMPERATURE = 16.0
"""``alpha = sigmoid(.)^(1/16)``: the log-gate is divided by this."""
GLA_CHUNK = 16
"""GLA's (and DeltaNet's) longest chunk: GLA's in-chunk scores factor ``exp(b_i - b_j)`` into
``exp(b_i) exp(-b_j)``, which must stay in float32's range; DeltaNet's in-chunk inverse is built
in ``log2 C`` rounds."""
GLA_LOG_DECAY_MIN = -5.0
"""GLA's per-token ``log alpha`` is clamped here (``alpha >= 0.0067``): 16 tokens then decay by at
most ``exp(-80)``, inside float32's range. It binds only where the gate's pre-activation is below
``-80`` (``log alpha = logsigmoid(.) / 16``)."""
GLA_GATE_BIAS = 4.0
"""Initial gate bias: ``alpha = sigmoid(4)^(1/16) ~ 0.9989`` (almost no decay: the start is the plain
feature-map kernel)."""
NORM_EPS = 1e-5
GATED_FEATURE_MAPS = ("elu", "performer", "hedgehog")
"""Feature maps a mixer can use: those whose ``features`` is a per-token map with no extra terms."""


# -- the forms -----------------------------------------------------------------------------------


PARALLEL_MAX_LEN = 512
"""RetNet on a non-causal site runs the parallel form (one ``N x N`` decayed score matrix) up to this
many tokens, the two chunked scans beyond."""


def _pad_to(x: torch.Tensor, total: int) -> torch.Tensor:
    n = x.shape[-2]
    return x if n == total else F.pad(x, (0, 0, 0, total - n))


def gated_chunked(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                  chunk: int) -> torch.Tensor:
    """Causal ``o_i = sum_{j<=i} (sum_d fq_id fk_jd exp(b_id - b_jd)) v_j`` by chunks (module docstring).

    Args:
        fq, fk: ``(B, H, N, m)`` float32 features; v: ``(B, H, N, Dv)``.
        log_decay: ``(B, H, N, m)`` (GLA, per feature) or ``(B, H, N, 1)`` (RetNet) ``log alpha_t <= 0``;
            ``b`` is its cumulative sum (``b_i - b_j`` = the log-decay applied to key ``j`` at query ``i``).
            Per feature, the in-chunk scores are ``(q_i exp(b_i)) . (k_j exp(-b_j))`` (one MatMul): the
            log-decay summed over one chunk must stay above ``-87`` (float32's ``exp`` range), which
            GLA's clamp (:data:`GLA_LOG_DECAY_MIN` per token over :data:`GLA_CHUNK` tokens) ensures.
        chunk: chunk length.

    Returns:
        ``(B, H, N, Dv)`` float32.
    """
    n = fq.shape[-2]
    c = max(1, min(chunk, n))
    total = -(-n // c) * c  # zero-padded tokens: no key, no decay
    fq, fk, v, log_decay = (_pad_to(t, total) for t in (fq, fk, v, log_decay))
    b, h, _, m = fq.shape
    nc, dv, gm = total // c, v.shape[-1], log_decay.shape[-1]
    qc, kc = fq.reshape(b, h, nc, c, m), fk.reshape(b, h, nc, c, m)
    vc, gc = v.reshape(b, h, nc, c, dv), log_decay.reshape(b, h, nc, c, gm)
    cum = gc.cumsum(3)  # (B, H, nc, C, gm) inclusive in-chunk log-decay
    last = cum[:, :, :, c - 1:c]  # (B, H, nc, 1, gm): the whole chunk's
    qe = qc * torch.exp(cum)  # queries with the decay since their chunk's start
    tri = torch.ones(c, c, dtype=fq.dtype, device=fq.device).tril()
    if gm == 1:  # one decay per head: the exact C x C decay matrix
        diff = (cum - cum.transpose(-1, -2)).clamp(max=0.0)  # (B, H, nc, C_i, C_j): b_i - b_j
        scores = (qc @ kc.transpose(-1, -2)) * torch.exp(diff) * tri
    else:  # per feature: exp(b_i - b_j) = exp(b_i) exp(-b_j), in range while the chunk's log-decay is >= -87
        scores = (qe @ (kc * torch.exp(-cum)).transpose(-1, -2)) * tri
    intra = scores @ vc
    summary = (kc * torch.exp(last - cum)).transpose(-1, -2) @ vc  # (B, H, nc, m, Dv): a chunk's state increment
    if gm == 1:  # state at the start of chunk c: sum_{p<c} exp(before_c - through_p) * summary_p, one MatMul
        through = last.squeeze(-2).cumsum(2)  # (B, H, nc, 1): log-decay through the end of each chunk
        before = through - last.squeeze(-2)  # ... up to each chunk's start
        strict = torch.ones(nc, nc, dtype=fq.dtype, device=fq.device).tril(-1)
        carry = torch.exp((before - through.transpose(-1, -2)).clamp(max=0.0)) * strict  # (B, H, nc_c, nc_p)
        states = (carry @ summary.reshape(b, h, nc, m * dv)).reshape(b, h, nc, m, dv)
    else:  # per feature: S_c = exp(last_{c-1}) S_{c-1} + summary_{c-1}, over the nc chunks (unrolled on export)
        decays, summaries = torch.exp(last).transpose(-1, -2).unbind(2), summary.unbind(2)  # (B, H, m, 1), ...
        state, starts = torch.zeros_like(summaries[0]), []
        for i in range(nc):
            starts.append(state)
            if i + 1 < nc:
                state = decays[i] * state + summaries[i]
        states = torch.stack(starts, dim=2)
    inter = qe @ states
    return (intra + inter).reshape(b, h, total, dv)[:, :, :n]


def decay_parallel(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """Both directions of a per-head decay at once: ``((fq fk^T) * D) v`` with the decay matrix
    ``D_ij = exp(b_i - b_j)`` for ``j <= i``, ``exp(b_{j-1} - b_{i-1})`` for ``j > i`` (``b`` the cumulative
    log-decay: RetNet's ``gamma^|i-j|``, padded keys decaying nothing), the token itself once.

    Args:
        fq, fk: ``(B, H, N, m)`` float32 features; v: ``(B, H, N, Dv)``.
        log_decay: ``(B, H, N, 1)`` ``log gamma_t <= 0``.

    Returns:
        ``(B, H, N, Dv)`` float32, what the forward plus the backward scan less the diagonal give.
    """
    cum = log_decay.cumsum(-2)  # (B, H, N, 1)
    prev = cum - log_decay
    n = fq.shape[-2]
    lower = torch.ones(n, n, dtype=torch.bool, device=fq.device).tril()
    expo = torch.where(lower, cum - cum.transpose(-1, -2), prev.transpose(-1, -2) - prev)
    return ((fq @ fk.transpose(-1, -2)) * torch.exp(expo.clamp(max=0.0))) @ v


def gated_quadratic(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                    causal: bool = True) -> torch.Tensor:
    """The gated kernel through its materialised ``(N, N)`` matrix in float64 (the tests' reference).

    Non-causal: ``j > i`` is decayed by ``sum_{s=i}^{j-1} log alpha_s`` (the reversed scan), and the
    diagonal counted once.
    """
    fq, fk, v, g = fq.double(), fk.double(), v.double(), log_decay.double()
    cum = g.cumsum(-2)
    n = fq.shape[-2]
    i = torch.arange(n).view(n, 1)
    j = torch.arange(n).view(1, n)
    fwd = cum.unsqueeze(-2) - cum.unsqueeze(-3)  # (B, H, N, N, gm): b_i - b_j
    prev = cum - g
    bwd = prev.unsqueeze(-3) - prev.unsqueeze(-2)  # b_{j-1} - b_{i-1}
    expo = torch.where((j <= i).unsqueeze(-1), fwd, bwd)
    a = (fq.unsqueeze(-2) * fk.unsqueeze(-3) * torch.exp(expo.clamp(max=0.0))).sum(-1)
    if causal:
        a = a * (j <= i)
    return a @ v


def _unit_lower_inverse(fk: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``(I + tril(diag(beta) K K^T, -1))^-1`` per chunk, ``(..., C, C)``, from ``fk`` ``(..., C, m)`` and
    ``beta`` ``(..., C, 1)``.

    Block by block (the recursive triangular inverse): with the inverses ``A^-1``, ``D^-1`` of the two
    diagonal halves of a block, ``[[A, 0], [B, D]]^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]]``, all blocks
    of one size in one batched MatMul, ``log2 C`` rounds (the chunk is zero-padded to a power of two:
    the padded rows are the identity's). Static shapes, no triangular-solve op (ONNX has none), exact
    up to float rounding.
    """
    c, m = fk.shape[-2], fk.shape[-1]
    size = 1 << max(0, (c - 1).bit_length())
    lead = fk.shape[:-2]
    if size != c:
        fk, beta = _pad_to(fk, size), _pad_to(beta, size)
    inv = torch.ones(*lead, size, 1, 1, dtype=fk.dtype, device=fk.device)  # the 1 x 1 diagonal blocks
    s = 1
    while s < size:
        nb = size // (2 * s)
        first, second = fk.reshape(*lead, nb, 2, s, m).unbind(-3)
        low = (second * beta.reshape(*lead, nb, 2, s, 1).unbind(-3)[1]) @ first.transpose(-1, -2)  # B
        a_inv, d_inv = inv.reshape(*lead, nb, 2, s, s).unbind(-3)
        top = torch.cat([a_inv, torch.zeros_like(a_inv)], dim=-1)
        bottom = torch.cat([-(d_inv @ low) @ a_inv, d_inv], dim=-1)
        inv = torch.cat([top, bottom], dim=-2)  # (..., nb, 2s, 2s)
        s *= 2
    return inv.reshape(*lead, size, size)[..., :c, :c]


def delta_chunked(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                  chunk: int) -> torch.Tensor:
    """Causal DeltaNet by chunks (the WY / UT transform, module docstring).

    Args:
        fq, fk: ``(B, H, N, m)`` L2-normalised features (padded keys zero); v: ``(B, H, N, Dv)``.
        beta: ``(B, H, N, 1)`` write strengths (0 for padded keys).
        chunk: chunk length ``C``.

    Returns:
        ``(B, H, N, Dv)`` float32.
    """
    n = fq.shape[-2]
    c = max(1, min(chunk, n))
    total = -(-n // c) * c
    fq, fk, v, beta = (_pad_to(t, total) for t in (fq, fk, v, beta))
    b, h, _, m = fq.shape
    nc, dv = total // c, v.shape[-1]
    qc, kc = fq.reshape(b, h, nc, c, m), fk.reshape(b, h, nc, c, m)
    vc, bc = v.reshape(b, h, nc, c, dv), beta.reshape(b, h, nc, c, 1)
    inverse = _unit_lower_inverse(kc, bc)  # (I + tril(diag(beta) K K^T, -1))^-1
    w, u = inverse @ (kc * bc), inverse @ (vc * bc)
    # chunk by chunk (unrolled on export): S_{c+1} = S_c + K_c^T (U_c - W_c S_c)
    keys_t, ws, us = kc.transpose(-1, -2).unbind(2), w.unbind(2), u.unbind(2)
    state = fq.new_zeros(b, h, m, dv)
    starts, fresh = [], []
    for i in range(nc):
        starts.append(state)
        fresh.append(us[i] - ws[i] @ state)  # what chunk c writes, net of what the state already predicts
        if i + 1 < nc:
            state = state + keys_t[i] @ fresh[-1]
    s0 = torch.stack(starts, dim=2)  # (B, H, nc, m, Dv)
    scores = (qc @ kc.transpose(-1, -2)) * torch.ones(c, c, dtype=fq.dtype, device=fq.device).tril()
    out = qc @ s0 + scores @ torch.stack(fresh, dim=2)
    return out.reshape(b, h, total, dv)[:, :, :n]


def delta_quadratic(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Causal DeltaNet through its ``(N, N)`` matrix ``tril(Q K^T) (I + tril(diag(beta) K K^T, -1))^-1 diag(beta)``,
    float64, with ``torch.linalg.solve_triangular`` over the whole sequence (the tests' reference)."""
    fq, fk, v, beta = fq.double(), fk.double(), v.double(), beta.double()
    n = fq.shape[-2]
    eye = torch.eye(n, dtype=torch.float64)
    system = eye + ((fk * beta) @ fk.transpose(-1, -2)).tril(-1)
    t = torch.linalg.solve_triangular(system, eye * beta.transpose(-1, -2), upper=False, unitriangular=True)
    return ((fq @ fk.transpose(-1, -2)).tril() @ t) @ v


def _reverse(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(-2,))


# -- the kernels ---------------------------------------------------------------------------------


class GatedKernel(AttentionKernel):
    """Base of the three mixers: feature map, the mixer's state update, output norm and gate.

    Args:
        shape: the site (``q_len == kv_len``: self-attention only).
        features: the feature-map kernel (:mod:`.linear`) whose ``features`` this mixer reads;
            its parameters (hedgehog's maps) are trained with the mixer's.
        chunk_size: chunk length of the chunked form.
        seed: seeds the gate's initial projection.

    Raises:
        ValueError: a cross-attention site, or ``chunk_size < 1``.
    """

    mixer: str = ""

    def __init__(self, shape: SiteShape, features: nn.Module, *, chunk_size: int = 64, seed: int = 0) -> None:
        super().__init__(shape)
        if shape.q_len != shape.kv_len:
            raise ValueError(f"{self.mixer} linear attention scans a sequence of tokens: it needs a self-attention "
                             f"site (q_len == kv_len), got {shape.q_len} queries and {shape.kv_len} keys")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.feature_map = features
        h, d, dv = shape.heads, shape.head_dim, shape.value_dim
        self.gate = nn.Parameter(torch.zeros(h, d, dv))
        self.gate_bias = nn.Parameter(torch.ones(h, dv))
        probe = torch.zeros(1, h, 1, d)
        with torch.no_grad():
            self.feature_width = features.features(probe, probe)[1].shape[-1]

    # what the mixers define
    def _features(self, q, k, keep):
        fq, fk = self.feature_map.features(q, k, keep)
        fk = fk.float()
        return fq.float(), fk if keep is None else fk * keep

    def _mix_causal(self, fq, fk, v, q, k, keep) -> torch.Tensor:
        raise NotImplementedError

    def _self_term(self, fq, fk, v, q, k, keep) -> torch.Tensor | None:
        """What the two scans of a non-causal site both count (subtracted once), or None."""
        return (fq * fk).sum(-1, keepdim=True) * v

    def _step(self, fq, fk, v, q, k, state) -> torch.Tensor:
        raise NotImplementedError

    # shared
    def _output(self, raw: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``SiLU(q W_g + b_g) * LayerNorm(raw)`` per head, float32."""
        normed = F.layer_norm(raw, (raw.shape[-1],), eps=NORM_EPS)
        pre = torch.einsum("bhnd,hdv->bhnv", q.float(), self.gate.float()) + self.gate_bias.float().unsqueeze(-2)
        return F.silu(pre) * normed

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
        """The state readout ``o_t`` before the output norm and gate ``(B, H, N, Dv)`` float32."""
        keep = key_keep(mask, torch.float32)
        fq, fk = self._features(q, k, keep)
        v32 = v.float() if keep is None else v.float() * keep
        q32, k32 = q.float(), k.float()
        if self.shape.causal:
            return self._mix_causal(fq, fk, v32, q32, k32, keep)
        return self._mix_both(fq, fk, v32, q32, k32, keep)

    def _mix_both(self, fq, fk, v, q, k, keep) -> torch.Tensor:
        """A non-causal site: the forward and the backward scan in one call (the reversed sequence stacked
        on the batch), the token itself counted once."""
        batch = fq.shape[0]
        if keep is not None:
            keep = keep.expand(batch, *keep.shape[1:])
        both = (None if x is None else torch.cat([x, _reverse(x)], dim=0) for x in (fq, fk, v, q, k, keep))
        scans = self._mix_causal(*both)
        out = scans[:batch] + _reverse(scans[batch:])
        twice = self._self_term(fq, fk, v, q, k, keep)
        return out if twice is None else out - twice

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._output(self.mix(q, k, v, mask), q).to(q.dtype)

    def attention_weights(self, q, k, mask=None) -> None:
        """None: no rows multiply ``v`` (no normalisation; the output norm and gate come after)."""
        return None

    def fit_batches(self, batches) -> None:
        """Set the output gate's bias so each channel's RMS is the softmax output's on ``batches``
        (``(q, k, v, mask)`` site batches); the layer norm's output has unit RMS per token."""
        with torch.no_grad():
            power = sum(softmax_attention(q.float(), k.float(), v.float(), mask, self.shape.scale,
                                          self.shape.causal).pow(2).mean(dim=(0, 2)) for q, k, v, mask in batches)
            target = (power / len(batches)).sqrt().clamp(min=1e-3)  # (H, Dv)
            lo, hi = torch.zeros_like(target), target + 4.0  # SiLU is increasing on [0, inf), SiLU(x) <= x + ...
            for _ in range(40):  # bisection: SiLU(x) = target
                mid = (lo + hi) / 2
                below = F.silu(mid) < target
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            self.gate_bias.copy_((lo + hi) / 2)

    # decoding
    @property
    def supports_decode(self) -> bool:
        return self.shape.causal

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An empty decode state ``S`` ``(batch, H, m, Dv)``."""
        self._check_decode()
        return torch.zeros(batch, self.shape.heads, self.feature_width, self.shape.value_dim, dtype=dtype,
                           device=self.gate.device)

    def decode_step(self, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                    state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One causal step: ``(B, H, 1, D)`` q/k, ``(B, H, 1, Dv)`` v, state -> ``(o_t, state)``.

        Raises:
            NotImplementedError: a non-causal site.
        """
        self._check_decode()
        fq, fk = self._features(q_t, k_t, None)
        raw, state = self._step(fq, fk, v_t.float(), q_t.float(), k_t.float(), state.float())
        return self._output(raw, q_t).to(q_t.dtype), state

    def _check_decode(self) -> None:
        if not self.supports_decode:
            raise NotImplementedError(f"{type(self).__name__} cannot decode step by step on a non-causal site "
                                      "(both scan directions need the whole sequence)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mixer={self.mixer}, features={self.feature_width}, chunk={self.chunk_size}"


class GLAKernel(GatedKernel):
    """GLA: a low-rank data-dependent diagonal decay per feature (module docstring)."""

    mixer = "gla"

    def __init__(self, shape: SiteShape, features: nn.Module, *, chunk_size: int = 64, seed: int = 0) -> None:
        super().__init__(shape, features, chunk_size=chunk_size, seed=seed)
        h, d, m = shape.heads, shape.head_dim, self.feature_width
        r = min(GLA_RANK, d)
        g = torch.Generator().manual_seed(seed)
        self.gate_down = nn.Parameter(torch.randn(h, d, r, generator=g) / math.sqrt(d))
        self.gate_up = nn.Parameter(torch.zeros(h, r, m))
        self.gate_up_bias = nn.Parameter(torch.full((h, m), GLA_GATE_BIAS))

    def log_decay(self, k: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """``log alpha_t`` ``(B, H, N, m)`` (0 at padded keys)."""
        low = torch.einsum("bhnd,hdr->bhnr", k.float(), self.gate_down.float())
        pre = torch.einsum("bhnr,hrm->bhnm", low, self.gate_up.float()) + self.gate_up_bias.float().unsqueeze(-2)
        g = (F.logsigmoid(pre) / GLA_TEMPERATURE).clamp(min=GLA_LOG_DECAY_MIN)
        return g if keep is None else g * keep

    def _mix_causal(self, fq, fk, v, q, k, keep):
        return gated_chunked(fq, fk, v, self.log_decay(k, keep), chunk=min(self.chunk_size, GLA_CHUNK))

    def _step(self, fq, fk, v, q, k, state):
        decay = torch.exp(self.log_decay(k, None)).transpose(-1, -2)  # (B, H, m, 1)
        state = decay * state + fk.transpose(-1, -2) @ v
        return fq @ state, state


class RetNetKernel(GatedKernel):
    """A fixed per-head decay ``gamma_h = 1 - 2^(-5-h)`` (RetNet's schedule; a buffer, not trained)."""

    mixer = "retnet"

    def __init__(self, shape: SiteShape, features: nn.Module, *, chunk_size: int = 64, seed: int = 0) -> None:
        super().__init__(shape, features, chunk_size=chunk_size, seed=seed)
        heads = torch.arange(shape.heads, dtype=torch.float64)
        self.register_buffer("log_gamma", torch.log1p(-torch.pow(2.0, -5.0 - heads)).float())

    def log_decay(self, k: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """``log gamma_h`` per token ``(B, H, N, 1)`` (0 at padded keys)."""
        g = torch.ones_like(k[..., :1], dtype=torch.float32) * self.log_gamma.view(1, -1, 1, 1)
        return g if keep is None else g * keep

    def _mix_causal(self, fq, fk, v, q, k, keep):
        return gated_chunked(fq, fk, v, self.log_decay(k, keep), chunk=self.chunk_size)

    def _mix_both(self, fq, fk, v, q, k, keep):
        if fq.shape[-2] > PARALLEL_MAX_LEN:
            return super()._mix_both(fq, fk, v, q, k, keep)
        return decay_parallel(fq, fk, v, self.log_decay(k, keep))

    def _step(self, fq, fk, v, q, k, state):
        state = torch.exp(self.log_gamma).view(1, -1, 1, 1) * state + fk.transpose(-1, -2) @ v
        return fq @ state, state


class DeltaKernel(GatedKernel):
    """DeltaNet's delta rule on L2-normalised features, ``beta_t = sigmoid(k_t . w + b)`` per head."""

    mixer = "delta"

    def __init__(self, shape: SiteShape, features: nn.Module, *, chunk_size: int = 64, seed: int = 0) -> None:
        super().__init__(shape, features, chunk_size=chunk_size, seed=seed)
        self.beta_weight = nn.Parameter(torch.zeros(shape.heads, shape.head_dim))
        self.beta_bias = nn.Parameter(torch.zeros(shape.heads))

    def _features(self, q, k, keep):
        fq, fk = self.feature_map.features(q, k, keep)
        fq, fk = F.normalize(fq.float(), dim=-1, eps=1e-6), F.normalize(fk.float(), dim=-1, eps=1e-6)
        return fq, fk if keep is None else fk * keep

    def beta(self, k: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Write strengths ``(B, H, N, 1)`` in ``(0, 1)`` (0 at padded keys)."""
        pre = (k.float() * self.beta_weight.float().unsqueeze(-2)).sum(-1, keepdim=True)
        b = torch.sigmoid(pre + self.beta_bias.float().view(1, -1, 1, 1))
        return b if keep is None else b * keep

    def _mix_causal(self, fq, fk, v, q, k, keep):
        return delta_chunked(fq, fk, v, self.beta(k, keep), chunk=min(self.chunk_size, GLA_CHUNK))

    def _self_term(self, fq, fk, v, q, k, keep):
        return None

    def _step(self, fq, fk, v, q, k, state):
        beta = self.beta(k, None)
        state = state + fk.transpose(-1, -2) @ (beta * (v - fk @ state))
        return fq @ state, state


class StateDecoder(nn.Module):
    """One decode step of a gated kernel as its own graph: ``(q_t, k_t, v_t, S) -> (o_t, S)``.

    Exportable with static shapes; the state starts at ``kernel.init_state(batch)``.

    Raises:
        NotImplementedError: the kernel cannot decode (a non-causal site).
    """

    def __init__(self, kernel: GatedKernel) -> None:
        super().__init__()
        kernel._check_decode()
        self.kernel = kernel

    def forward(self, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernel.decode_step(q_t, k_t, v_t, s)


GATED_KERNELS: dict[str, type[GatedKernel]] = {"gla": GLAKernel, "delta": DeltaKernel, "retnet": RetNetKernel}
"""The mixers by option value; every class takes ``(shape, features, *, chunk_size, seed)``."""
