"""The suite's own rules: shared-data tests skip locally but fail in CI when ../shared/data is missing."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO

TESTS = ["tests/test_data.py::test_extxyz_converted_to_angstrom_and_ev",  # shared_data_path helper
         "tests/test_data.py::test_water_datamodule_prepares_database"]


def _pytest(tmp_path, ci: str):
    env = {**os.environ, "EKF_PLUGIN_SHARED_DATA": str(tmp_path / "nowhere"), "CI": ci}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", *TESTS],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_missing_shared_data_skips_locally_and_fails_in_ci(tmp_path):
    local = _pytest(tmp_path, "")
    assert local.returncode == 0, local.stdout[-2000:]
    assert "2 skipped" in local.stdout
    ci = _pytest(tmp_path, "true")
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "2 failed" in ci.stdout and "CI=true but the shared data" in ci.stdout
