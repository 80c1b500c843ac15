"""Fixture models built in code (no downloads); see :mod:`tests.models.zoo`."""

from tests.models.zoo import *  # noqa: F403 — the zoo's __all__ is the package's public surface
from tests.models.zoo import __all__  # noqa: F401
