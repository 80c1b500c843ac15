"""Small seeded models for the backend tests (built in code; no downloads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

MAX_REL_ERROR = 1e-4
"""Backends compute the same function as eager torch in float32: rounding only."""


@dataclass
class Case:
    """A model and one call of it."""

    name: str
    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def reference(self) -> Any:
        with torch.no_grad():
            return self.model(*self.args, **self.kwargs)


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm2d + ReLU, pooled, then Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


class Structured(nn.Module):
    """Returns a dict holding a tensor, a nested tuple and a plain int; takes a nested input."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor], *, scale: float = 1.0) -> dict:
        y = self.proj(x) * scale
        return {"logits": y, "aux": (torch.relu(y) + pair[0], pair[1].sum()), "count": 3}


def make_cnn() -> Case:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():  # a fresh BatchNorm is the identity; give it real statistics
        model.bn.running_mean.uniform_(-1.0, 1.0)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return Case("cnn", model, (torch.randn(2, 3, 16, 16),))


def make_bert() -> Case:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config).eval()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[1, 8:] = 0  # right padding: the mask matters
    return Case("bert", model, (ids,), {"attention_mask": mask})


def make_structured() -> Case:
    torch.manual_seed(0)
    return Case(
        "structured",
        Structured().eval(),
        (torch.randn(2, 4), (torch.randn(2, 3), torch.randn(5))),
        {"scale": 2.0},
    )


def exported_module(case: Case) -> Case:
    """The same model as ``torch.export.export(...).module()`` (what ptool's frontend produces)."""
    with torch.no_grad():
        gm = torch.export.export(case.model, case.args, case.kwargs, strict=False).module()
    return Case(case.name + "-exported", gm, case.args, case.kwargs)


@pytest.fixture(scope="session")
def cnn() -> Case:
    return make_cnn()


@pytest.fixture(scope="session")
def bert() -> Case:
    return make_bert()


@pytest.fixture(scope="session")
def structured() -> Case:
    return make_structured()


@pytest.fixture(scope="session")
def bert_exported(bert: Case) -> Case:
    return exported_module(bert)


@pytest.fixture(scope="session")
def cnn_exported(cnn: Case) -> Case:
    return exported_module(cnn)
