"""Distribution diagnostics for quantization transforms: QSUR and outlier statistics (METHODS 4.2, 7.2).

**QSUR** (quantization space utilization rate, OSTQuant) is the share of the quantization grid's
volume that the data occupies. Model the ``d``-channel activations (rows = tokens) as a Gaussian
with mean ``mu`` and covariance ``S``; the data fill the ellipsoid
``E = {x : (x - mu)^T S^-1 (x - mu) <= c^2}`` with ``c^2 = d`` (the mean squared whitened radius of
a ``d``-dim Gaussian, so ``E`` holds a typical token). A symmetric grid with one scale for all
channels of a token (per-tensor or per-token quantization) is the origin-centred cube that must
cover ``E``: half-side ``h = max_i (|mu_i| + c sqrt(S_ii))``. Then

    QSUR = vol(E) / vol(cube) = V_d c^d prod_i sqrt(lambda_i) / (2 h)^d,

``lambda_i`` the eigenvalues of ``S`` and ``V_d`` the unit ball's volume. For any useful ``d`` this
is astronomically small, so the figure reported is the per-dimension ratio against the best case
(a centred ball inscribed in the cube, ``QSUR_max = V_d / 2^d``):

    qsur = (QSUR / QSUR_max)^(1/d) = c * geomean_i(sqrt(lambda_i)) / h   in (0, 1],

1 for isotropic centred data, small when a few channels (outliers) set the range. ``log_qsur``
is the natural log of the raw volume ratio. An orthogonal transform leaves ``prod lambda`` alone
and changes only ``h``: rotations raise QSUR by evening out the per-channel spread; scalings
change both.

With fewer tokens than channels ``S`` is singular, so it is shrunk towards
``shrinkage * trace(S)/d * I`` (default 1e-3); that term is rotation-invariant, so comparisons
before/after an orthogonal transform stay fair.
"""

from __future__ import annotations

import math

import torch

from ptool.passes.quant.quantizers import outlier_stats

__all__ = ["activation_stats", "outlier_stats", "qsur"]

SHRINKAGE = 1e-3


def qsur(x: torch.Tensor, *, shrinkage: float = SHRINKAGE) -> dict[str, float]:
    """QSUR of activations ``x`` (``(..., d)``; leading dims are tokens), see the module docstring.

    Returns:
        ``{"qsur": per-dimension ratio in (0, 1], "log_qsur": log of the raw volume ratio}``.

    Raises:
        ValueError: fewer than 2 tokens, or ``shrinkage`` not in [0, 1).
    """
    if not 0 <= shrinkage < 1:
        raise ValueError(f"shrinkage must be in [0, 1), got {shrinkage}")
    x = x.detach().double().reshape(-1, x.shape[-1])
    n, d = x.shape
    if n < 2:
        raise ValueError(f"QSUR needs at least 2 tokens, got {n}")
    mu = x.mean(0)
    centred = x - mu
    cov = centred.T @ centred / (n - 1)
    tr = float(torch.diagonal(cov).sum())
    if tr <= 0:
        return {"qsur": 0.0, "log_qsur": -math.inf}
    cov = (1 - shrinkage) * cov + shrinkage * tr / d * torch.eye(d, dtype=cov.dtype)
    # log det via Cholesky (the shrunk covariance is positive definite): sum of log eigenvalues
    logdet = 2 * float(torch.log(torch.diagonal(torch.linalg.cholesky(cov))).sum())
    c = math.sqrt(d)
    h = float((mu.abs() + c * torch.diagonal(cov).sqrt()).max())
    log_geo_axis = 0.5 * logdet / d  # log geomean of the semi-axes / c
    per_dim = math.exp(log_geo_axis) * c / h
    log_ball = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1)
    log_raw = log_ball + d * (math.log(per_dim) - math.log(2))
    return {"qsur": per_dim, "log_qsur": log_raw}


def activation_stats(x: torch.Tensor) -> dict[str, float]:
    """:func:`qsur` and :func:`~ptool.passes.quant.quantizers.outlier_stats` of ``x`` in one dict
    (the QSUR figures are NaN for a single token, which has no covariance)."""
    tokens = x.numel() // max(1, x.shape[-1])
    spread = qsur(x) if tokens >= 2 else {"qsur": math.nan, "log_qsur": math.nan}
    return {**spread, **outlier_stats(x)}
