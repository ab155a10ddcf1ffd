"""Small C/C++ kernels built with the system compiler on first use and called through ``ctypes``.

The plugin's compiled kernels (the BPNN MD step's triple loops, the feature columns of force labels, the
EKF's thin symmetric product) are plain C++ functions over raw pointers: no torch headers, so a build takes
about a second, not the minute of ``torch.utils.cpp_extension``. :func:`native_library` compiles a source
once per machine and caches the shared library on disk; every caller has a torch fallback, so a machine
without a compiler runs the same code paths, slower.

Cache: ``$EKF_PLUGIN_CACHE`` (default ``~/.cache/ekf_plugin``), one file per hash of the source, the flags,
the compiler and the CPU (its model name and feature flags, so a library built with ``-march=native`` is
never loaded on another CPU). Builds write to a temporary file and ``os.replace`` it, so concurrent
processes leave one complete library.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional, Sequence

__all__ = ["native_library", "optional_library", "compiler", "DEFAULT_FLAGS", "VECTOR_MATH"]

DEFAULT_FLAGS = ("-O2", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off")
# C++ text shared by the kernels that compute on 64-byte vectors (GCC/Clang vector extensions: one AVX-512
# register, or two AVX2 ones where the CPU has no AVX-512): the vector types and expm1 of a vector, to a few ulp
# plus exp's own conditioning (|y| ulp; tests/test_native.py). expm1v's relative accuracy near 0 needs a build
# without reassociation (no -ffast-math: the network-row kernel); the rounding to an integer goes through a
# conversion, not an add-and-subtract that reassociation would fold away.
VECTOR_MATH = r"""
template <typename T> struct VT;
template <> struct VT<float> {
  typedef float v __attribute__((vector_size(64)));
  typedef int32_t vi __attribute__((vector_size(64)));
  static constexpr int L = 16;  // lanes
  static constexpr int mant = 23, bias = 127;
};
template <> struct VT<double> {
  typedef double v __attribute__((vector_size(64)));
  typedef int64_t vi __attribute__((vector_size(64)));
  static constexpr int L = 8;
  static constexpr int mant = 52, bias = 1023;
};

/* expm1 of a vector, |y| below the exponent range: y = n ln2 + r with n the nearest integer and |r| <= ln2/2
   (ln2 split in two: n * hi is exact), expm1(r) = r p(r) by its Taylor series (degree 8 float32, 14 float64:
   p = 1 + r/2 (1 + r/3 (...))), expm1(y) = 2^n expm1(r) + (2^n - 1), exact in n = 0 (so tanh near 0 keeps its
   relative accuracy). */
template <typename T>
inline typename VT<T>::v expm1v(typename VT<T>::v y) {
  typedef typename VT<T>::v V;
  typedef typename VT<T>::vi VI;
  const V t = y * T(1.4426950408889634);
  const VI ni = __builtin_convertvector(t + (t < T(0) ? V{} - T(0.5) : V{} + T(0.5)), VI);  // round to nearest
  const V n = __builtin_convertvector(ni, V);
  V r = y - n * T(0.693145751953125);
  r = r - n * T(1.428606820309417232e-06);
  constexpr int deg = sizeof(T) == 4 ? 8 : 14;
  V p = V{} + T(1);
#pragma GCC unroll 16
  for (int k = deg; k >= 2; --k) p = p * (r * (T(1) / T(k))) + T(1);
  const V two_n = (V)((ni + VT<T>::bias) << VT<T>::mant);
  return two_n * (p * r) + (two_n - T(1));
}
"""

_LIBS: Dict[str, Any] = {}  # key -> loaded library, or the error message of a failed build
_LOADED: Dict[Any, Any] = {}  # (source, flags, name) -> loaded library: the per-call lookup
_WARNED: set = set()  # names whose failed build :func:`optional_library` has warned about


def compiler() -> Optional[str]:
    """The C++ compiler to use: ``$CXX``, ``c++`` or ``g++`` on PATH, or None."""
    for c in (os.environ.get("CXX", ""), "c++", "g++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _cpu_signature() -> str:
    """Model name and feature flags of this CPU (Linux), else the platform's machine string."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags"))][:2]
        return platform.machine() + "|" + "|".join(lines)
    except OSError:
        return platform.machine() + "|" + platform.processor()


def native_library(source: str, flags: Sequence[str] = DEFAULT_FLAGS, name: str = "kernel"):
    """``source`` built into a shared library (a ``ctypes.CDLL``) on first use, then loaded from the cache.

    Raises ``RuntimeError`` (with the compiler's message) when it cannot be built; the failure is remembered
    for the process, so callers may ask again cheaply.
    """
    fast = _LOADED.get((source, tuple(flags), name))  # no PATH search, /proc/cpuinfo read or hash per call
    if fast is not None:
        return fast
    import hashlib
    import platform

    cxx = compiler()
    key = hashlib.sha256("\0".join([source, *flags, str(cxx), _cpu_signature(), platform.system()]).encode()).hexdigest()[:20]
    got = _LIBS.get(key)
    if isinstance(got, str):
        raise RuntimeError(got)
    if got is not None:
        return got
    import ctypes
    import subprocess
    import tempfile

    try:
        if cxx is None:
            raise RuntimeError("no C++ compiler ($CXX, c++ or g++) on PATH")
        root = os.environ.get("EKF_PLUGIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ekf_plugin")
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, f"{name}_{key}.so")
        if not os.path.exists(path):
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                src = os.path.join(tmp, "k.cpp")
                with open(src, "w") as f:
                    f.write(source)
                out = os.path.join(tmp, "k.so")
                run = subprocess.run([cxx, *flags, src, "-o", out], capture_output=True, text=True, timeout=600)
                if run.returncode != 0:
                    raise RuntimeError(f"{cxx} failed: {run.stderr[-800:]}")
                os.replace(out, path)  # atomic: concurrent builders leave one complete file
        lib = ctypes.CDLL(path)
    except Exception as exc:
        _LIBS[key] = f"{type(exc).__name__}: {exc}"
        raise RuntimeError(_LIBS[key]) from None
    _LIBS[key] = lib
    _LOADED[(source, tuple(flags), name)] = lib
    return lib


def optional_library(source: str, flags: Sequence[str], name: str, what: str):
    """:func:`native_library`, or None where it cannot be built: then one warning per ``name`` for the process
    (``what`` says which kernel, e.g. "native feature-column kernel"), and the caller takes its torch path."""
    try:
        return native_library(source, flags, name=name)
    except RuntimeError as exc:
        if name not in _WARNED:
            _WARNED.add(name)
            import warnings

            warnings.warn(f"{what} unavailable ({exc}); using the torch path")
        return None
