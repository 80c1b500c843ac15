"""QSUR and outlier diagnostics: the closed form on known distributions, and what moves them."""

from __future__ import annotations

import math

import pytest
import torch

from ptool.passes.quant.diagnostics import activation_stats, outlier_stats, qsur
from ptool.passes.quant.hadamard import hadamard


def _gaussian(n: int = 4096, d: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_isotropic_centred_data_fills_the_grid():
    """N(0, I): the ellipsoid is the ball inscribed in the cube, the best case (per-dim QSUR ~ 1)."""
    assert qsur(_gaussian())["qsur"] > 0.9


def test_closed_form_matches_the_definition():
    """qsur = c * geomean(sqrt(eig)) / max_i(|mu_i| + c sqrt(S_ii)) and log_qsur = log V_d + d log(qsur / 2)."""
    x = _gaussian(d=8) * torch.linspace(0.5, 3.0, 8, dtype=torch.float64) + 0.3
    got = qsur(x, shrinkage=0.0)
    cov = torch.cov(x.T)
    c = math.sqrt(8)
    half_side = float((x.mean(0).abs() + c * torch.diagonal(cov).sqrt()).max())
    expected = c * float(torch.linalg.eigvalsh(cov).log().mean().mul(0.5).exp()) / half_side
    assert got["qsur"] == pytest.approx(expected, rel=1e-9)
    log_ball = 4 * math.log(math.pi) - math.lgamma(5)
    assert got["log_qsur"] == pytest.approx(log_ball + 8 * math.log(expected / 2), rel=1e-9)


def test_outlier_channel_lowers_qsur_and_a_hadamard_restores_it():
    x = _gaussian()
    x[:, 3] *= 30  # one outlier channel, as in LLM / BERT activations
    before = qsur(x)["qsur"]
    rotated = qsur(x @ hadamard(64))["qsur"]
    # the cube's half-side falls from 30 sigma to sqrt((63 + 30^2) / 64) ~ 3.9 sigma; the volume stays
    assert before < 0.05 and rotated > 5 * before


def test_qsur_is_scale_invariant_and_orthogonal_transforms_keep_the_volume():
    x = _gaussian(d=32) * torch.linspace(1, 4, 32, dtype=torch.float64)
    assert qsur(7.5 * x)["qsur"] == pytest.approx(qsur(x)["qsur"], rel=1e-9)
    # an orthogonal map changes only the cube: per-dim QSUR ratio equals the inverse ratio of half-sides
    c = math.sqrt(32)
    h = lambda z: float((z.mean(0).abs() + c * torch.cov(z.T).diagonal().sqrt()).max())  # noqa: E731
    q = hadamard(32)
    ratio = qsur(x @ q, shrinkage=0.0)["qsur"] / qsur(x, shrinkage=0.0)["qsur"]
    assert ratio == pytest.approx(h(x) / h(x @ q), rel=1e-6)


def test_singular_covariance_is_shrunk_not_minus_infinity():
    x = _gaussian(n=16, d=64)  # fewer tokens than channels
    value = qsur(x)
    assert 0 < value["qsur"] < 1 and math.isfinite(value["log_qsur"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        qsur(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"shrinkage must be in \[0, 1\)"):
        qsur(torch.randn(8, 8), shrinkage=1.0)


def test_activation_stats_has_qsur_and_outlier_stats():
    x = _gaussian(d=16)
    x[:, 0] *= 10
    stats = activation_stats(x)
    assert set(stats) == {"qsur", "log_qsur", "max_over_rms", "kurtosis", "channel_max_ratio"}
    assert stats["channel_max_ratio"] == pytest.approx(outlier_stats(x)["channel_max_ratio"])
    assert stats["channel_max_ratio"] > 5
