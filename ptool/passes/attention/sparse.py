"""Sparse softmax-attention kernels: each query attends, with an exact softmax, to a subset of keys.

Every kernel here computes ``softmax(q k_S^T * scale) v_S`` over a per-query key set ``S(i)`` and
differs only in how ``S(i)`` is chosen:

* ``topk`` - the ``k_count`` keys with the largest exact scores (DRSformer's TKSA on tokens);
* ``sea`` - the ``k_count`` keys with the largest *estimated* scores (SEA-style: a cheap learned
  low-rank estimator, fitted in closed form on calibration data, picks the keys; the exact
  softmax runs on the gathered keys only);
* ``window`` - a band ``|i - j| <= window // 2`` (causal: ``i - window < j <= i``);
* ``block-diag`` - non-overlapping blocks of ``block_size`` tokens (TransNormer's DiagAttention
  with a softmax inside each block, causal inside blocks on causal sites);
* ``axial`` - on a ``rows x cols`` token grid: the prefix tokens (ViT's CLS), the query's row and
  its column, in one joint softmax.

Invariants every kernel keeps (and the tests check): keys the mask forbids and, on causal sites,
future keys never get weight - padding and causality are applied even when ``S(i)`` would include
them; a query with no visible key in ``S(i)`` returns 0 (the dense reference would average every
value there, which is meaningless for a padded row); additive masks are read as masks (entries
``<= MASKED`` are masked), as :func:`kernel.softmax_weights` does. With ``S(i)`` = every key each
kernel *is* softmax attention: ``topk``/``sea`` with ``k >= M``, ``window >= 2 M``,
``block_size >= M``.

Cost: ``window``, ``block-diag`` and ``axial`` never form the ``N x M`` scores (``O(N w D)``,
``O(N block D)``, ``O(N (R + C + P) D)``); ``sea``'s exact part is ``O(N k D)`` but its estimator
is still an ``N x M`` map, of rank ``r`` (``lowrank``: ``r / D`` of the exact scores' cost, a quarter by
default for ``D >= 32``) or ``2 * feature_dim`` (``features``); ``topk`` materializes the full exact scores -
it is a quality device, no FLOP saving without a sparse kernel. Queries are aligned to the *last*
``N`` keys when ``M > N`` (as :func:`kernel.causal_allowed` does); ``M < N`` is refused where
positions matter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptool.passes.attention.kernel import AttentionKernel, SiteShape, allowed, causal_allowed, key_keep, score_bias


class ConfiguredKernel(AttentionKernel):
    """An :class:`AttentionKernel` with the options every sparse/other kernel accepts.

    Each kernel documents which options it reads; the others are accepted and ignored so one
    pass configuration can build any kernel.

    Args:
        shape: the site.
        k: keys kept per query (``topk``, ``sea``): ``0 < k < 1`` is a fraction of the key length
            ``M`` (``max(1, ceil(k * M))``), a whole number ``k >= 1`` an absolute count (clamped
            to ``M``; so ``k=1`` keeps one key, not all).
        window: band width (``window``).
        block_size: tokens per block (``block-diag``).
        feature_dim: estimator projection width (``sea``; 0 = its default).
        seed: seed of any random initialization (``sea``).

    Raises:
        ValueError: an option out of range.
    """

    def __init__(self, shape: SiteShape, *, k: float = 0.25, window: int = 64, block_size: int = 64,
                 feature_dim: int = 0, seed: int = 0) -> None:
        super().__init__(shape)
        if not (k > 0 and (k < 1 or float(k).is_integer())):
            raise ValueError(f"k must be a fraction in (0, 1) or a whole count >= 1, got {k}")
        for name, value, low in (("window", window, 1), ("block_size", block_size, 1), ("feature_dim", feature_dim, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        self.k, self.window, self.block_size = float(k), int(window), int(block_size)
        self.feature_dim, self.seed = int(feature_dim), int(seed)

    def k_count(self, m: int) -> int:
        """Keys kept per query for ``m`` keys."""
        return max(1, math.ceil(self.k * m)) if self.k < 1 else min(int(self.k), m)


def mask4d(mask: torch.Tensor | None, m: int) -> torch.Tensor | None:
    """``mask`` as a 4-D boolean "may attend" mask ``(B|1, H|1, N|1, M)``, or ``None``."""
    ok = allowed(mask)
    if ok is None:
        return None
    ok = ok.reshape((1,) * (4 - ok.dim()) + tuple(ok.shape)) if ok.dim() < 4 else ok
    return ok.expand(*ok.shape[:-1], m) if ok.shape[-1] == 1 else ok


def visible(mask: torch.Tensor | None, n: int, m: int, causal: bool, device: torch.device) -> torch.Tensor | None:
    """The dense boolean visibility ``(B|1, H|1, N|1, M)``: the mask and, if ``causal``, causality."""
    ok = mask4d(mask, m)
    if causal:
        c = causal_allowed(n, m, device).reshape(1, 1, n, m)
        ok = c if ok is None else ok & c
    return ok


def masked_softmax(scores: torch.Tensor, ok: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim restricted to ``ok``; rows with nothing visible are 0."""
    if ok is None:
        return scores.softmax(-1)
    w = scores.masked_fill(~ok, torch.finfo(scores.dtype).min).softmax(-1)
    return w * ok.to(w.dtype)  # exact no-op on rows with a visible key; zeroes empty rows


def _gather_mask(ok4: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``ok4[..., rows, cols]`` for in-range index tables (broadcast), read in ``O(|table|)``."""
    bm, hm, nm, m = ok4.shape
    if nm == 1:  # a padding mask: the same row for every query
        idx, shape = cols, cols.shape
    else:
        idx = rows * m + cols
        shape = idx.shape
    flat = ok4.reshape(bm, hm, nm * m)
    return flat.index_select(-1, idx.reshape(-1)).reshape(bm, hm, *shape)


def _dense_structured(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool,
                      pattern: torch.Tensor) -> torch.Tensor:
    """Dense ``(B, H, N, M)`` softmax rows restricted to a static ``(N, M)`` pattern (quadratic)."""
    ok = visible(mask, q.shape[-2], k.shape[-2], causal, q.device)
    ok = pattern if ok is None else ok & pattern
    return masked_softmax((q.float() @ k.float().transpose(-1, -2)) * scale, ok)


def _checked_tail(tail: str) -> str:
    if tail not in ("mean", "drop"):
        raise ValueError(f"tail must be 'mean' or 'drop', got {tail!r}")
    return tail


_TIE_BREAK = 1e-4
"""Largest offset used to order exactly tied keys (earlier first) before a top-k."""


def _tie_broken(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` minus a tiny ramp over keys, so exact ties (a zero query at a padded position
    makes every score equal) select the same keys on every backend; the margin is far above
    float rounding and far below any score difference that matters."""
    m = scores.shape[-1]
    return scores - torch.arange(m, device=scores.device, dtype=scores.dtype) * (_TIE_BREAK / m)


class TopKAttention(ConfiguredKernel):
    """Per query, the softmax mass of the ``k_count`` allowed keys with the largest scores.

    Reads ``k`` and ``tail``. A fractional ``k`` is a share of the keys each query may see (25%
    of a 20-token sentence padded to 128 is 5 keys, not 32): ``TopK`` takes ``ceil(k * M)``
    candidates and ranks beyond ``ceil(k * visible)`` are dropped, so shapes stay static. Masked
    (and future) keys are never selected.

    ``tail`` says what happens to the softmax mass outside the top-k:

    * ``drop`` - renormalize over the kept keys (DRSformer's TKSA);
    * ``mean`` (default) - keep the exact tail mass ``1 - sum(top-k probabilities)`` and spend it
      on the mean of the tail's values: ``o = sum_topk p_j v_j + (1 - sum_topk p_j) mean_tail(v)``.
      The row stays a distribution, the dominant keys keep their exact weight, and the many small
      weights are replaced by their average - on all-MiniLM-L6-v2 at k = 25% this lifts the
      embedding cosine from 0.97 to 0.99 (BENCHMARKS.md).

    The ``N x M`` scores are materialized (TopK + ScatterElements + Softmax in ONNX): a quality
    device, no FLOP saving without a sparse kernel. An additive mask's bias part
    (:func:`~ptool.passes.attention.kernel.score_bias`) is added to the scores before the selection.
    """

    takes_bias = True

    def __init__(self, shape: SiteShape, *, tail: str = "mean", **options) -> None:
        super().__init__(shape, **options)
        self.tail = _checked_tail(tail)

    def _selection(self, q, k, mask):
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.shape.scale
        bias = score_bias(mask)
        scores = scores if bias is None else scores + bias.float()
        ok = visible(mask, q.shape[-2], k.shape[-2], self.shape.causal, q.device)
        filled = scores if ok is None else scores.masked_fill(~ok, torch.finfo(scores.dtype).min)
        count = self.k_count(k.shape[-2])
        idx = _tie_broken(filled).topk(count, dim=-1).indices
        ranks = torch.ones(count, dtype=scores.dtype, device=q.device)
        if self.k < 1 and ok is not None:  # per-query share of the visible keys
            limit = torch.ceil(self.k * ok.to(scores.dtype).sum(-1, keepdim=True)).clamp_min(1)
            ranks = (torch.arange(count, device=q.device).to(scores.dtype) < limit).to(scores.dtype)
        keep = torch.zeros_like(scores).scatter(-1, idx, ranks.expand(idx.shape)) > 0
        return scores, ok, keep if ok is None else keep & ok

    def attention_weights(self, q, k, mask=None):
        scores, ok, keep = self._selection(q, k, mask)
        if self.tail == "drop":
            return masked_softmax(scores, keep)
        full = masked_softmax(scores, ok)
        top = full * keep.to(full.dtype)
        tail = (ok if ok is not None else torch.ones_like(keep)) & ~keep
        tail = tail.to(full.dtype)
        mass = (1 - top.sum(-1, keepdim=True)).clamp_min(0) * (full.sum(-1, keepdim=True) > 0).to(full.dtype)
        return top + mass * tail / tail.sum(-1, keepdim=True).clamp_min(1)

    def forward(self, q, k, v, mask=None):
        return (self.attention_weights(q, k, mask) @ v.float()).to(q.dtype)


class SEAAttention(ConfiguredKernel):
    """SEA-style sparse attention: a learned estimator picks the keys, exact softmax on them only.

    1. Estimator: cheap approximate attention scores ``(B, H, N, M)``, one of

       * ``lowrank`` (default): a rank-``r`` bilinear form, ``s_ij = (q_i A_h) . (k_j B_h) * scale``
         with ``A_h``, ``B_h`` ``(D, r)`` per head, ``r = feature_dim`` or by default
         ``max(min(D, 8), D // 4)``: ``r / D`` of the exact scores' multiply-adds (a quarter for
         ``D >= 32``). :meth:`fit_batches` initializes it in closed form on calibration data: with
         ``C_q = E[q q^T]``, ``C_k = E[k k^T]`` over the real tokens, ``A B^T`` is the rank-``r``
         ``M`` minimising ``E[(q^T (I - M) k)^2]`` - ``C_q^{1/2} M C_k^{1/2}`` is the truncated
         SVD of ``C_q^{1/2} C_k^{1/2}`` (the whitened Eckart-Young solution; Loki's key-PCA
         is the special case ``C_q = I``). The KL distillation below then refines the ranking;
       * ``features``: a linear attention in a learned low-dim space (closer to SEA's Performer
         estimator): ``u = (x sqrt(scale)) W`` with ``W`` ``(D, m)`` per head (separate for q and
         k, both starting at the same seeded semi-orthogonal matrix), ``phi(x) = [softmax(u),
         softmax(-u)]`` (Hedgehog's map, ``2m`` features), scores ``log(phi(q) phi(k)^T)``;
         ``m = feature_dim`` or ``max(8, D // 4)`` - ``2m / D`` of the exact scores (half, for
         ``D >= 32``). On all-MiniLM-L6-v2 it picks worse keys than ``lowrank`` at twice its
         cost (BENCHMARKS.md).
    2. Per query, the ``k_count`` visible keys with the largest estimate (masked / future keys are
       filled with ``finfo.min`` first).
    3. The selected keys and values are gathered (``torch.gather`` -> ``(B, H, N, k, D)``) and the
       exact softmax runs over them: ``O(N k D)``, no dense ``N x M`` mask.

    Top-k selection is not differentiable with respect to the estimator, so ``forward`` trains
    only what feeds the exact part (q, k, v upstream); the estimator learns through
    :meth:`estimate_logits` and :func:`estimator_kl` (SEA's ``KL(teacher || softmax(estimate))``).

    Limits (honest): the estimate is still an ``N x M`` map - of rank ``r`` (``2m``) rather than
    ``D``. Real SEA compresses it to a fixed width ``T_M`` with an MLP+CNN decoder and interpolates
    the selected columns back (memory linear in ``N``); that decoder and the CSR kernels are out of
    scope.

    Reads ``k``, ``feature_dim``, ``seed``, ``tail``, ``estimator``.
    """

    # The estimator's parameters get no gradient through ``forward`` (top-k is a step function),
    # so attention transfer trains them on the row KL alone and skips the output term.
    output_trains_parameters = False

    def __init__(self, shape: SiteShape, *, tail: str = "mean", estimator: str = "lowrank", **options) -> None:
        super().__init__(shape, **options)
        self.tail = _checked_tail(tail)
        if estimator not in ("lowrank", "features"):
            raise ValueError(f"estimator must be 'lowrank' or 'features', got {estimator!r}")
        self.estimator = estimator
        d = shape.head_dim
        if estimator == "lowrank":
            r = min(d, self.feature_dim or max(min(d, 8), d // 4))
            init = torch.eye(d, r).expand(shape.heads, d, r).clone()  # the first r coordinates until fit
        else:
            m = self.feature_dim or max(8, d // 4)
            gen = torch.Generator().manual_seed(self.seed)
            a = torch.randn(max(d, m), max(d, m), generator=gen)
            basis = torch.linalg.qr(a).Q[:d, :m] * math.sqrt(max(d, m))  # orthogonal columns, unit-ish rows
            init = basis.expand(shape.heads, d, m).clone()
        self.proj_q = nn.Parameter(init.clone())
        self.proj_k = nn.Parameter(init)

    def _features(self, x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        u = (x.float() * math.sqrt(self.shape.scale)) @ proj
        return torch.cat([u.softmax(-1), (-u).softmax(-1)], dim=-1)

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The estimator's unnormalized log-scores ``(B, H, N, M)`` (softmax over keys = its rows)."""
        if self.estimator == "lowrank":
            return ((q.float() @ self.proj_q) @ (k.float() @ self.proj_k).transpose(-1, -2)) * self.shape.scale
        e = self._features(q, self.proj_q) @ self._features(k, self.proj_k).transpose(-1, -2)
        return torch.log(e.clamp_min(torch.finfo(e.dtype).tiny))

    @staticmethod
    def _log_rows(scores: torch.Tensor, ok: torch.Tensor | None) -> torch.Tensor:
        if ok is not None:
            scores = scores.masked_fill(~ok, torch.finfo(scores.dtype).min)
        return scores.log_softmax(-1)

    def estimate_logits(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The estimator's log attention rows ``(B, H, N, M)`` (log-softmax normalized, masked
        entries ``finfo.min``): differentiable w.r.t. the estimator, for :func:`estimator_kl`."""
        return self._log_rows(self._scores(q, k), visible(mask, q.shape[-2], k.shape[-2], self.shape.causal, q.device))

    def fit_batches(self, batches) -> None:
        """``lowrank``: the closed-form initialization (class docstring) from calibration
        ``(q, k, v, mask)`` batches of this site, over their real (unpadded) tokens; ``features``:
        nothing. Called by attention transfer before training."""
        if self.estimator != "lowrank":
            return
        d, r = self.shape.head_dim, self.proj_q.shape[-1]
        cq = torch.zeros(self.shape.heads, d, d, dtype=torch.float64)
        ck = torch.zeros_like(cq)
        nq = nk = 0
        for q, k, _, mask in batches:
            keep = key_keep(mask, torch.float64)  # (B, 1|H, M, 1) or None
            qd, kd = q.detach().double(), k.detach().double()
            kw = kd if keep is None else kd * keep
            qw = qd * keep if keep is not None and q.shape[-2] == k.shape[-2] else qd  # self-attention: same tokens
            cq += torch.einsum("bhnd,bhne->hde", qw, qd)
            ck += torch.einsum("bhnd,bhne->hde", kw, kd)
            nk += float(kd.shape[0] * kd.shape[2]) if keep is None else float(keep.expand(kd.shape[0], 1, -1, 1).sum())
            nq += float(qd.shape[0] * qd.shape[2]) if qw is qd else float(keep.expand(qd.shape[0], 1, -1, 1).sum())
        if not (nq and nk):
            return
        with torch.no_grad():
            for h in range(self.shape.heads):
                root_q, inv_q = _sqrt_and_inverse(cq[h] / nq)
                root_k, inv_k = _sqrt_and_inverse(ck[h] / nk)
                u, s, vh = torch.linalg.svd(root_q @ root_k)
                self.proj_q[h] = (inv_q @ u[:, :r] * s[:r].sqrt()).float()
                self.proj_k[h] = (inv_k @ vh[:r].T * s[:r].sqrt()).float()

    def _select(self, q, k, mask):
        """Selected keys: indices ``(B, H, N, kc)``, which of them count (visible and within the
        per-query share) as float, exact scores ``(B, H, N, kc)``, the visibility, the estimate."""
        b, h, n, _ = q.shape
        m = k.shape[-2]
        kc = self.k_count(m)
        ok = visible(mask, n, m, self.shape.causal, q.device)
        with torch.no_grad():
            rows = self._log_rows(self._scores(q, k), ok)
            idx = _tie_broken(rows).topk(kc, dim=-1).indices
            est = rows.exp()
        use = torch.ones(kc, device=q.device)
        if ok is not None:
            use = torch.gather(ok.expand(b, h, n, m), -1, idx).float()
            if self.k < 1:  # a fractional k is a share of each query's visible keys
                limit = torch.ceil(self.k * ok.float().sum(-1, keepdim=True)).clamp_min(1)
                use = use * (torch.arange(kc, device=q.device).float() < limit).float()
        k_sel = _gather_rows(k.float(), idx)  # (B, H, N, kc, D)
        scores = (q.float().unsqueeze(-2) @ k_sel.transpose(-1, -2)).squeeze(-2) * self.shape.scale
        return idx, use.expand(scores.shape), scores, ok, est

    def _parts(self, q, k, mask):
        """(exact weights on the selected keys, estimated tail mass (B, H, N, 1) or None, ...)."""
        idx, use, scores, ok, est = self._select(q, k, mask)
        w = masked_softmax(scores, use > 0)
        if self.tail == "drop":
            return idx, use, w, None, ok
        if ok is not None:  # the estimator's guess of where the mass is, over the visible keys
            est = est * ok.float()
        est = est / est.sum(-1, keepdim=True).clamp_min(torch.finfo(est.dtype).tiny)
        tail = (1 - (torch.gather(est, -1, idx) * use).sum(-1, keepdim=True)).clamp(0, 1)
        tail = tail * (use.sum(-1, keepdim=True) > 0).float()
        return idx, use, w, tail, ok

    def attention_weights(self, q, k, mask=None):
        """The dense ``(B, H, N, M)`` rows (the sparse softmax scattered back): quadratic."""
        idx, use, w, tail, ok = self._parts(q, k, mask)
        m = k.shape[-2]
        top = torch.zeros(*w.shape[:-1], m, dtype=w.dtype, device=w.device).scatter(-1, idx, w * use)
        if tail is None:
            return top
        picked = torch.zeros_like(top).scatter(-1, idx, use) > 0
        rest = (ok.expand_as(top) if ok is not None else torch.ones_like(picked)) & ~picked
        rest = rest.float()
        return (1 - tail) * top + tail * rest / rest.sum(-1, keepdim=True).clamp_min(1)

    def forward(self, q, k, v, mask=None):
        idx, use, w, tail, ok = self._parts(q, k, mask)
        v_sel = _gather_rows(v.float(), idx)
        out = (w.unsqueeze(-2) @ v_sel).squeeze(-2)
        if tail is not None:  # the estimated tail mass goes to the mean of the unselected visible values
            vis = ok.float() if ok is not None else torch.ones(1, 1, q.shape[-2], k.shape[-2], device=q.device)
            vis_sum = vis @ v.float()
            sel_sum = ((use.unsqueeze(-2)) @ v_sel).squeeze(-2)
            count = (vis.sum(-1, keepdim=True) - use.sum(-1, keepdim=True)).clamp_min(1)
            out = (1 - tail) * out + tail * (vis_sum - sel_sum) / count
        return out.to(q.dtype)


def _sqrt_and_inverse(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C^{1/2}, C^{-1/2})`` of a symmetric PSD matrix, eigenvalues floored at ``1e-6 max``
    (a direction the data never uses gets a large but finite inverse)."""
    e, u = torch.linalg.eigh(c)
    e = e.clamp_min(float(e.max().clamp_min(1e-30)) * 1e-6)
    return (u * e.sqrt()) @ u.T, (u * e.rsqrt()) @ u.T


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, h, idx[b, h, n, s]]``: ``(B, H, M, D)`` x ``(B, H, N, S)`` -> ``(B, H, N, S, D)``."""
    b, h, n, s = idx.shape
    flat = idx.reshape(b, h, n * s, 1).expand(b, h, n * s, x.shape[-1])
    return torch.gather(x, 2, flat).reshape(b, h, n, s, x.shape[-1])


def estimator_kl(teacher: torch.Tensor, estimate_logits: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || softmax(estimate))`` averaged over rows: SEA's estimator distillation loss.

    Args:
        teacher: softmax rows ``(B, H, N, M)`` (e.g. :func:`kernel.softmax_weights`).
        estimate_logits: :meth:`SEAAttention.estimate_logits` on the same q, k, mask.
    """
    t = teacher.float()
    terms = t * (torch.log(t.clamp_min(torch.finfo(t.dtype).tiny)) - estimate_logits)
    return torch.where(t > 0, terms, 0.0).sum() / t[..., 0].numel()  # 0 log 0 = 0 on masked keys


class _LocalAttention(ConfiguredKernel):
    """Blocks of ``c`` queries attend to key blocks ``b + lo .. b + hi`` (an unfold via pad,
    reshape and cat), masked to a relative-offset rule: ``O(N (hi - lo + 1) c D)``."""

    def _plan(self, m: int) -> tuple[int, int, int]:
        """(block length c, lo, hi) for ``m`` keys."""
        raise NotImplementedError

    def _rel_ok(self, d: torch.Tensor) -> torch.Tensor:
        """Which query-minus-key position offsets ``d`` are in the pattern."""
        raise NotImplementedError

    def _check_lengths(self, n: int, m: int) -> None:
        if m < n:
            raise ValueError(f"site {self.shape.layer}: {type(self).__name__} needs at least as many keys as "
                             f"queries (queries align to the last keys), got N={n}, M={m}")

    def _same_block(self, i: torch.Tensor, j: torch.Tensor, m: int) -> torch.Tensor:
        """Whether positions ``i`` and ``j`` share a block (only block-diag restricts this)."""
        return torch.ones((), dtype=torch.bool, device=i.device)

    def _pattern(self, n: int, m: int, device) -> torch.Tensor:
        i = torch.arange(n, device=device).unsqueeze(-1) + (m - n)
        j = torch.arange(m, device=device)
        return self._rel_ok(i - j) & self._same_block(i, j, m)

    def attention_weights(self, q, k, mask=None):
        """Dense ``(B, H, N, M)`` rows of the same pattern (quadratic; tests and distillation)."""
        n, m = q.shape[-2], k.shape[-2]
        self._check_lengths(n, m)
        return _dense_structured(q, k, mask, self.shape.scale, self.shape.causal, self._pattern(n, m, q.device))

    def forward(self, q, k, v, mask=None):
        b, h, n, _ = q.shape
        m = k.shape[-2]
        self._check_lengths(n, m)
        c, lo, hi = self._plan(m)
        off, nb = m - n, -(-m // c)
        total, span = nb * c, (hi - lo + 1) * c
        qb = F.pad(q.float(), (0, 0, off, total - m)).reshape(b, h, nb, c, -1)  # queries at key positions
        kw, vw = (_windows(t.float(), c, nb, lo, hi) for t in (k, v))  # (B, H, nb, span, .)
        scores = (qb @ kw.transpose(-1, -2)) * self.shape.scale  # (B, H, nb, c, span)
        i = torch.arange(total, device=q.device).reshape(nb, c, 1)
        j = (torch.arange(nb, device=q.device) * c).reshape(nb, 1, 1) + lo * c + torch.arange(span, device=q.device)
        ok = (j >= 0) & (j < m) & self._rel_ok(i - j)  # keys of other blocks are never gathered
        ok4 = mask4d(mask, m)
        if ok4 is not None:
            rows = (i - off).clamp(0, max(n - 1, 0)) if ok4.shape[-2] > 1 else i
            ok = ok & _gather_mask(ok4, rows, j.clamp(0, m - 1))
        out = masked_softmax(scores, ok) @ vw
        return out.reshape(b, h, total, -1)[:, :, off:off + n].to(q.dtype)


def _windows(x: torch.Tensor, c: int, nb: int, lo: int, hi: int) -> torch.Tensor:
    """Key blocks ``b + lo .. b + hi`` of ``x`` ``(B, H, M, D)`` side by side: ``(B, H, nb, span, D)``."""
    b, h, m, d = x.shape
    padded = F.pad(x, (0, 0, -lo * c, nb * c - m + hi * c)).reshape(b, h, nb + hi - lo, c, d)
    return torch.cat([padded[:, :, o - lo:o - lo + nb] for o in range(lo, hi + 1)], dim=3)


class WindowAttention(_LocalAttention):
    """Sliding-window softmax: query ``i`` sees keys ``|i - j| <= window // 2`` (causal sites:
    ``i - window < j <= i``, i.e. ``window`` keys including itself).

    Computed blockwise: blocks of ``window // 2`` queries attend to their own and both neighbouring
    key blocks (causal: blocks of ``window - 1`` queries, their own and the previous block), keys
    outside the band masked - ``O(N window D)``, exact w.r.t. the dense banded softmax.
    Reads ``window``.
    """

    def _plan(self, m):
        if self.shape.causal:
            return max(1, min(self.window - 1, m)), -1, 0
        return max(1, min(self.window // 2, m)), -1, 1

    def _rel_ok(self, d):
        if self.shape.causal:
            return (d >= 0) & (d < self.window)
        return d.abs() <= self.window // 2


class BlockDiagAttention(_LocalAttention):
    """Softmax inside non-overlapping blocks of ``block_size`` key positions (causal inside blocks
    on causal sites): TransNormer's DiagAttention (T2, no adjacent block). ``M`` is padded to a
    multiple of the block; ``O(N block_size D)``. Reads ``block_size``.
    """

    def _plan(self, m):
        return max(1, min(self.block_size, m)), 0, 0

    def _rel_ok(self, d):
        return d >= 0 if self.shape.causal else torch.ones_like(d, dtype=torch.bool)

    def _same_block(self, i, j, m):
        c = max(1, min(self.block_size, m))
        return torch.div(i, c, rounding_mode="floor") == torch.div(j, c, rounding_mode="floor")


class AxialAttention(ConfiguredKernel):
    """Axial attention on a ``rows x cols`` token grid after ``prefix`` tokens (ViT: CLS + patches).

    A grid token ``(r, c)`` attends, in **one joint softmax**, to the prefix tokens, the tokens of
    row ``r`` and those of column ``c`` (itself once). One softmax rather than two summed per-axis
    outputs keeps each row a distribution over its ``P + R + C - 1`` keys, so the kernel stays a
    convex combination of values like the softmax it replaces. Prefix tokens attend to every key
    (dense; there are few). Cost ``O(N (P + R + C) D + P N D)``. Reads no option.

    Raises:
        ValueError: the site has no 2-D grid (``SiteShape.grid`` is None), or the token counts do
            not match ``prefix + rows * cols`` (self-attention only).
    """

    def __init__(self, shape: SiteShape, **options) -> None:
        super().__init__(shape, **options)
        if shape.grid is None:
            raise ValueError(f"site {shape.layer}: axial attention needs a 2-D token grid (SiteShape.grid), "
                             f"this site is a 1-D sequence of {shape.q_len} tokens")
        self._check(shape.q_len, shape.kv_len)

    def _check(self, n: int, m: int) -> None:
        (rows, cols), p = self.shape.grid, self.shape.prefix
        if not n == m == p + rows * cols:
            raise ValueError(f"site {self.shape.layer}: axial attention needs N == M == prefix + rows * cols "
                             f"= {p} + {rows} * {cols}, got N={n}, M={m}")

    def _keys(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query positions (R, C, 1), key positions (R, C, P + C + R), static ok (R, C, P + C + R))."""
        (rows, cols), p = self.shape.grid, self.shape.prefix
        r = torch.arange(rows, device=device).reshape(rows, 1, 1)
        c = torch.arange(cols, device=device).reshape(1, cols, 1)
        i = p + r * cols + c
        pre = torch.arange(p, device=device).reshape(1, 1, p).expand(rows, cols, p)
        row_keys = (p + r * cols + torch.arange(cols, device=device)).expand(rows, cols, cols)
        t = torch.arange(rows, device=device)
        col_keys = (p + t * cols + c).expand(rows, cols, rows)
        j = torch.cat([pre, row_keys, col_keys], dim=-1)
        not_self = (t != r).expand(rows, cols, rows)  # column slot t == r is the query, already in its row
        ok = torch.cat([torch.ones(rows, cols, p + cols, dtype=torch.bool, device=device), not_self], dim=-1)
        return i, j, ok

    def _pattern(self, n: int, device) -> torch.Tensor:
        i, j, ok = self._keys(device)
        s = j.shape[-1]
        grid = torch.zeros(i.numel(), n, device=device).scatter_add(1, j.reshape(-1, s), ok.reshape(-1, s).float())
        prefix = torch.ones(self.shape.prefix, n, dtype=torch.bool, device=device)
        return torch.cat([prefix, grid > 0], dim=0)

    def attention_weights(self, q, k, mask=None):
        """Dense ``(B, H, N, N)`` rows of the axial pattern (quadratic; tests and distillation)."""
        self._check(q.shape[-2], k.shape[-2])
        return _dense_structured(q, k, mask, self.shape.scale, self.shape.causal, self._pattern(q.shape[-2], q.device))

    def forward(self, q, k, v, mask=None):
        b, h, n, _ = q.shape
        self._check(n, k.shape[-2])
        (rows, cols), p = self.shape.grid, self.shape.prefix
        dtype, q, k, v = q.dtype, q.float(), k.float(), v.float()
        qg, kg, vg = (t[:, :, p:].reshape(b, h, rows, cols, t.shape[-1]) for t in (q, k, v))
        parts = [qg @ kg.transpose(-1, -2)]  # (B, H, R, C, C): same row
        parts.append((qg.transpose(2, 3) @ kg.transpose(2, 3).transpose(-1, -2)).transpose(2, 3))  # same column
        if p:  # grid queries x prefix keys
            pre_scores = qg.reshape(b, h, rows * cols, -1) @ k[:, :, :p].transpose(-1, -2)
            parts.insert(0, pre_scores.reshape(b, h, rows, cols, p))
        scores = torch.cat(parts, dim=-1) * self.shape.scale  # (B, H, R, C, P + C + R)
        i, j, ok = self._keys(q.device)
        if self.shape.causal:
            ok = ok & (j <= i)
        ok4 = mask4d(mask, n)
        if ok4 is not None:
            ok = ok & _gather_mask(ok4, i, j)
        w = masked_softmax(scores, ok)
        w_pre, w_row, w_col = w.split([p, cols, rows], dim=-1)
        out = w_row @ vg + (w_col.transpose(2, 3) @ vg.transpose(2, 3)).transpose(2, 3)
        out = out.reshape(b, h, rows * cols, -1)
        if p:  # prefix queries attend densely to every key
            out = out + w_pre.reshape(b, h, rows * cols, p) @ v[:, :, :p]
            pre_ok = visible(mask, n, n, self.shape.causal, q.device)
            pre_ok = None if pre_ok is None else pre_ok[:, :, :p] if pre_ok.shape[-2] > 1 else pre_ok
            pre = masked_softmax((q[:, :, :p] @ k.transpose(-1, -2)) * self.shape.scale, pre_ok) @ v
            out = torch.cat([pre, out], dim=2)
        return out.to(dtype)


SPARSE_KERNELS: dict[str, type[ConfiguredKernel]] = {
    "topk": TopKAttention,
    "sea": SEAAttention,
    "window": WindowAttention,
    "block-diag": BlockDiagAttention,
    "axial": AxialAttention,
}
"""The sparse kernels by their option name."""
