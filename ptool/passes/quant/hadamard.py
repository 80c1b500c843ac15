"""Orthogonal matrices for rotation transforms: normalized Hadamard matrices, with a seeded fallback.

A Hadamard matrix ``H`` (entries +-1, ``H H^T = n I``) scaled by ``1/sqrt(n)`` is orthogonal and
spreads every input channel evenly over all output channels, which is what flattens outlier
channels before per-token quantization (QuaRot, SpinQuant). Constructions, tried in order:

- **Sylvester** for ``n = 2^k``: ``H_2n = [[H, H], [H, -H]]``.
- **Paley I** for ``n = q + 1`` with ``q`` a prime, ``q = 3 (mod 4)`` (12, 20, 24, 32, 44, 48, ...),
  and **Paley II** for ``n = 2 (q + 1)`` with ``q`` a prime, ``q = 1 (mod 4)`` (12, 28, 36, 60, ...),
  each followed by Sylvester doublings: ``n = m * 2^k`` with ``m`` one of those orders. This
  covers MiniLM's 384 = 12 * 32, 1536 = 12 * 128 and head size 32, and the power-of-2 sizes of
  Llama/BERT/ViT/GPT-2 fixtures (hidden 32, head 8, MLP 64).
- Otherwise (e.g. ``n = 3 * 2^k`` below 12, or ``n`` with a large odd factor that is no Paley
  order) :func:`orthogonal` falls back to a **random orthogonal matrix** (QR of a seeded Gaussian,
  signs fixed so it is unique): orthogonal, so every transform stays exact, but it spreads
  outliers only statistically, not evenly. :func:`has_hadamard` says which one a size gets.

Matrices are built dense in float64 (a fast Walsh-Hadamard transform would cost O(n log n) per
token instead of O(n^2); ONNX has no such op, so a stored matrix is what lowers everywhere).
"""

from __future__ import annotations

import functools
import math

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)``: the quadratic character mod the prime ``q`` (0 on the diagonal)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, -1) - torch.arange(q).view(-1, 1)) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order ``q + 1`` (q prime, 3 mod 4): ``H = I + S`` with the skew conference matrix S."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order ``2 (q + 1)`` (q prime, 1 mod 4) from the symmetric conference matrix C."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


def _base(m: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order ``m`` from the constructions above, or None."""
    if m in (1, 2):
        return torch.tensor([[1.0]], dtype=torch.float64) if m == 1 else torch.tensor(
            [[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


@functools.lru_cache(maxsize=64)
def _hadamard_pm1(n: int) -> torch.Tensor | None:
    m, doublings = n, 0
    if n & (n - 1) == 0:  # a power of 2: pure Sylvester, the matrix a fast WHT computes
        m, doublings = 1, n.bit_length() - 1
    while True:
        base = _base(m)
        if base is not None:
            break
        if m % 2:
            return None
        m, doublings = m // 2, doublings + 1
    h = base
    for _ in range(doublings):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def has_hadamard(n: int) -> bool:
    """True if :func:`hadamard` can build a Hadamard matrix of order ``n``."""
    return n >= 1 and _hadamard_pm1(n) is not None


def hadamard(n: int) -> torch.Tensor:
    """The normalized ``n x n`` Hadamard matrix ``H / sqrt(n)`` (float64, orthogonal).

    Raises:
        ValueError: no construction here gives order ``n`` (use :func:`orthogonal`).
    """
    h = _hadamard_pm1(n) if n >= 1 else None
    if h is None:
        raise ValueError(f"no Hadamard construction for size {n} (sizes m * 2^k with m in 1, 2, or a "
                         "Paley order q+1 / 2(q+1), q prime); use orthogonal() for a random fallback")
    return h / math.sqrt(n)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded random orthogonal ``n x n`` matrix (float64): QR of a Gaussian, R's diagonal made positive."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).view(1, -1)


def orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """:func:`hadamard` of order ``n`` if there is one, else :func:`random_orthogonal` (float64)."""
    return hadamard(n) if has_hadamard(n) else random_orthogonal(n, seed)
