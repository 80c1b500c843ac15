"""Fixtures shared by the quantization-transform tests (built once per test process)."""

from __future__ import annotations

import functools

import torch

import ptool
from tests.models import zoo


@functools.cache
def fixture(name: str):
    return zoo.minilm() if name == "minilm" else getattr(zoo, name)()


def heldout_rel(name: str, m2, seed: int = 7) -> float:
    """Max relative error of ``m2`` against the fixture's model on a held-out batch."""
    f = fixture(name)
    args, kwargs = f.inputs(seed)
    with torch.no_grad():
        return ptool.verify.compare(f.run((args, kwargs)), m2(*args, **kwargs)).max_rel_error
