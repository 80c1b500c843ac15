"""Named pass pipelines, as plain data (specs the registry parses).

Kept free of imports so the CLI can show them without loading torch.
"""

from __future__ import annotations

#: The exact pipeline ``ptool convert`` / ``bench`` / ``demo`` run when no passes are given:
#: cleanup, then BatchNorm folding. Every pass in it is exact (or float-rounding close), so the
#: converted model computes the same function as the original.
DEFAULT_PIPELINE: tuple[str, ...] = ("dce", "cse", "constant-fold", "fold-bn")


def default_pipeline() -> list[str]:
    """A fresh list of :data:`DEFAULT_PIPELINE` specs (safe to extend)."""
    return list(DEFAULT_PIPELINE)
