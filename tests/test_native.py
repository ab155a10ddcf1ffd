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
static void apply(const T* x, T* e, T* m, int64_t n) {  /* n a multiple of the lanes */
  typedef typename VT<T>::v V;
  for (int64_t i = 0; i < n; i += VT<T>::L) {
    V v;
    for (int k = 0; k < VT<T>::L; ++k) v[k] = x[i + k];
    const V a = expv<T>(v), b = expm1v<T>(v);
    for (int k = 0; k < VT<T>::L; ++k) { e[i + k] = a[k]; m[i + k] = b[k]; }
  }
}
extern "C" void exp_f64(const double* x, double* e, double* m, int64_t n) { apply<double>(x, e, m, n); }
extern "C" void exp_f32(const float* x, float* e, float* m, int64_t n) { apply<float>(x, e, m, n); }
"""


@pytest.mark.parametrize("flags", ["plain", "fast-math"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_vector_exp_and_expm1_match_torch(tmp_path, monkeypatch, flags, dtype):
    """VECTOR_MATH's expv (the feature-column kernel's, built with -ffast-math, where a rounding by adding and
    subtracting a large constant would be folded away) and expm1v (the network-row kernel's tanh, built without)
    to a few ulp plus exp's conditioning."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("EKF_PLUGIN_CACHE", str(tmp_path))
    extra = ("-O3", "-march=native", "-ffast-math") if flags == "fast-math" else ("-O2", "-march=native")
    lib = native.optional_library(_VECTOR_MATH_TEST, ("-fPIC", "-shared", *extra), f"test_vmath_{flags}", "test kernel")
    dt = getattr(torch, dtype)
    x = torch.cat([torch.linspace(-80.0, 80.0, 4096, dtype=torch.float64), torch.linspace(-1e-3, 1e-3, 1024, dtype=torch.float64)]).to(dt)
    e, m = torch.empty_like(x), torch.empty_like(x)
    fn = lib.exp_f64 if dtype == "float64" else lib.exp_f32
    fn(*(ctypes.c_void_p(t.data_ptr()) for t in (x, e, m)), ctypes.c_int64(x.numel()))
    ref_e, ref_m = torch.exp(x.double()), torch.expm1(x.double())
    # within a few ulp plus exp's own conditioning (|x| ulp: what an input rounding costs; -ffast-math may fold
    # the two-part ln 2 of the argument reduction into one constant)
    eps = torch.finfo(dt).eps
    bound = eps * (4 + x.double().abs())
    assert bool(((e.double() - ref_e).abs() <= bound * ref_e).all())
    if flags == "plain":  # expm1v: for builds without reassociation (the network-row kernel's tanh)
        small = x.abs() < 40  # its 2^n must stay in range
        assert bool(((m.double() - ref_m).abs() <= bound * ref_m.abs())[small].all())
        assert bool(((m.double() - ref_m).abs() <= 4 * eps * ref_m.abs())[x.abs() < 1e-3].all())  # relative, near 0
    under = torch.tensor([-1e4, -800.0, -120.0, -90.0] * 4, dtype=dt)  # below the range: tiny, never NaN or negative
    eu, mu = torch.empty_like(under), torch.empty_like(under)
    fn(*(ctypes.c_void_p(t.data_ptr()) for t in (under, eu, mu)), ctypes.c_int64(16))
    floor = 2.0 ** -(125 if dtype == "float32" else 1021)  # 2^-(bias - 2): where the argument is clamped
    assert bool(((eu >= 0) & (eu.double() <= torch.clamp(torch.exp(under.double()) * (1 + 1e-6), min=floor * (1 + 1e-5)))).all())
