"""ekf_plugin.native: a kernel that does not build gives None and one warning; one that builds is loaded once."""

from __future__ import annotations

import ctypes
import warnings

import pytest

from ekf_plugin import native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")


def test_a_kernel_that_does_not_build_gives_none_and_warns_once(tmp_path, monkeypatch):
    monkeypatch.setenv("EKF_PLUGIN_CACHE", str(tmp_path))
    broken = 'extern "C" int f() { return not_declared; }'
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert native.optional_library(broken, native.DEFAULT_FLAGS, "test_broken", "test kernel") is None
        assert native.optional_library(broken, native.DEFAULT_FLAGS, "test_broken", "test kernel") is None
    messages = [str(w.message) for w in seen]
    assert len(messages) == 1 and messages[0].startswith("test kernel unavailable") and "torch path" in messages[0]


def test_a_kernel_that_builds_is_loaded_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EKF_PLUGIN_CACHE", str(tmp_path))
    source = 'extern "C" long twice(long x) { return 2 * x + 0 * 12345; }'
    lib = native.optional_library(source, native.DEFAULT_FLAGS, "test_twice", "test kernel")
    lib.twice.restype, lib.twice.argtypes = ctypes.c_long, [ctypes.c_long]
    assert lib.twice(21) == 42
    assert native.optional_library(source, native.DEFAULT_FLAGS, "test_twice", "test kernel") is lib
    assert list(tmp_path.glob("test_twice_*.so")), "the library is cached on disk"
