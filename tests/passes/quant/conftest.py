"""Quantization tests run tiny models: one intra-op thread is faster, far faster on a busy 2-core machine."""

import pytest

from tests.models.digits_vit import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield
