"""Shared fixtures (helpers live in tests/helpers.py).

Tests that need ``../shared/data`` (the ``shared_data`` fixture or the ``shared_data`` marker) skip with a
reason when it is missing, except in CI (``CI=true``), where a missing data folder fails them.
"""

import pytest

from tests.helpers import SHARED_DATA, missing_shared_data, shared_data_path

# The BPNN MD step runs native C++ triple kernels by default where a compiler is found (built in about a
# second, cached on disk): the tests run what users run. tests/bpnn/test_md_step.py checks the native
# kernels against the torch ones explicitly; EKF_PLUGIN_COMPILE=0 runs the whole suite on the torch kernels.


@pytest.fixture
def shared_data():
    """The ``shared_data_path`` helper as a fixture: ``shared_data("revpbe0-d3-cheng2019", "x.extxyz")``."""
    return shared_data_path


def pytest_collection_modifyitems(config, items):
    """Every test that asks for the ``shared_data`` fixture carries the ``shared_data`` marker."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)


def pytest_runtest_setup(item):
    if item.get_closest_marker("shared_data") is not None and not SHARED_DATA.is_dir():
        missing_shared_data(SHARED_DATA)
