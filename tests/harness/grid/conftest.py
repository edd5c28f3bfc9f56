"""Fixtures of the grid tests."""

from __future__ import annotations

import pytest

from harness.plugins import isolated_registries


@pytest.fixture
def clean_registries():
    """The registries as they are before the test, again after it: plugins a grid loads leave nothing."""
    with isolated_registries():
        yield
