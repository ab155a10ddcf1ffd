"""Shared fixtures (helpers live in tests/helpers.py).

Tests that need ``../shared/data`` (the ``shared_data`` fixture or the ``shared_data`` marker) skip with a
reason when it is missing, except in CI (``CI=true``), where a missing data folder fails them.
"""

import os

import pytest

from tests.helpers import SHARED_DATA, missing_shared_data, shared_data_path

# The BPNN MD step compiles its triple kernels with torch.compile by default (about a minute per
# process on a busy 2-core machine). Tests run the same kernels eagerly; EKF_PLUGIN_TEST_COMPILE=1
# adds the compiled check in tests/bpnn/test_md_step.py. Subprocesses (i-PI clients) inherit this.
os.environ.setdefault("EKF_PLUGIN_COMPILE", "0")


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
