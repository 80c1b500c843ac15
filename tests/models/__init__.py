"""Fixture models built in code (no downloads); see :mod:`tests.models.zoo`."""

from tests.models.zoo import (
    FIXTURES,
    Fixture,
    bert,
    bn_zoo,
    gpt2,
    llama,
    minilm,
    mobilenet_v2,
    randomize_batchnorm,
    randomize_norms,
    resnet,
    sentence_embedder,
    transformer_zoo,
    vit,
)

__all__ = [
    "FIXTURES",
    "Fixture",
    "bert",
    "bn_zoo",
    "gpt2",
    "llama",
    "minilm",
    "mobilenet_v2",
    "randomize_batchnorm",
    "randomize_norms",
    "resnet",
    "sentence_embedder",
    "transformer_zoo",
    "vit",
]
