"""Shared fixtures (helpers live in tests/helpers.py)."""

import pytest

from tests.helpers import shared_data_path


@pytest.fixture
def shared_data():
    """The ``shared_data_path`` helper as a fixture: ``shared_data("revpbe0-d3-cheng2019", "x.extxyz")``."""
    return shared_data_path
