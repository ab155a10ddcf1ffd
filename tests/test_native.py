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



_VECTOR_MATH_TEST = r"""
#include <cstdint>
""" + native.VECTOR_MATH + r"""
template <typename T>
static void apply(const T* x, T* m, int64_t n) {  /* n a multiple of the lanes */
  typedef typename VT<T>::v V;
  for (int64_t i = 0; i < n; i += VT<T>::L) {
    V v;
    for (int k = 0; k < VT<T>::L; ++k) v[k] = x[i + k];
    const V b = expm1v<T>(v);
    for (int k = 0; k < VT<T>::L; ++k) m[i + k] = b[k];
  }
}
extern "C" void expm1_f64(const double* x, double* m, int64_t n) { apply<double>(x, m, n); }
extern "C" void expm1_f32(const float* x, float* m, int64_t n) { apply<float>(x, m, n); }
"""


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_vector_expm1_matches_torch(tmp_path, monkeypatch, dtype):
    """VECTOR_MATH's expm1v (the network-row kernel's tanh) to a few ulp plus exp's conditioning, and relative
    to a few ulp near 0, where tanh needs it."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("EKF_PLUGIN_CACHE", str(tmp_path))
    lib = native.optional_library(_VECTOR_MATH_TEST, ("-O2", "-march=native", "-fPIC", "-shared"), "test_vmath",
                                  "test kernel")
    dt = getattr(torch, dtype)
    x = torch.cat([torch.linspace(-40.0, 40.0, 4096, dtype=torch.float64),
                   torch.linspace(-1e-3, 1e-3, 1024, dtype=torch.float64)]).to(dt)
    m = torch.empty_like(x)
    (lib.expm1_f64 if dtype == "float64" else lib.expm1_f32)(
        ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(m.data_ptr()), ctypes.c_int64(x.numel()))
    ref = torch.expm1(x.double())
    eps = torch.finfo(dt).eps
    err = (m.double() - ref).abs()
    assert bool((err <= eps * (4 + x.double().abs()) * ref.abs()).all())  # |x| ulp: what an input rounding costs
    assert bool((err <= 4 * eps * ref.abs())[x.abs() < 1e-3].all())  # relative, near 0
