"""X = J P for a symmetric float64 P kept in its upper triangle and a thin J (m ≥ 2 rows): a compiled kernel.

The EKF's force updates multiply P (n × n, n = 2827 for the study's water BPNN) by m = 10 Jacobian rows.
OpenBLAS's ``dsymm`` packs the triangle into full panels for a GEMM that is built for wide right-hand sides;
with m = 10 it reaches a third of the CPU's FMA rate. This kernel walks the stored triangle once, four rows
at a time, in column chunks that stay in L1: each element P_ij (j > i) adds P_ij J_kj to X_ki and P_ij J_ki
to X_kj for every row k of J, so P is read from memory once. AVX-512 where the compiler targets it
(``-march=native``), plain loops (auto-vectorised) elsewhere. Built by :mod:`ekf_plugin.native`; the
BLAS kernel falls back to ``dsymm`` where it cannot be built. Results equal ``dsymm``'s to round-off
(different summation order).

Shapes: P (n, n) row-major, upper triangle valid (the lower one is not read); J (m, n) row-major; X (m, n).
"""

from __future__ import annotations

import ctypes
import os
import warnings
from typing import List, Optional

import torch

__all__ = ["symm_thin", "available"]

_SOURCE = r"""
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// X (m, n) = J (m, n) P_sym with P (n, n) row-major, upper triangle valid.
extern "C" void symm_thin_f64(int64_t n, int64_t m, const double* __restrict P, const double* __restrict J,
                              double* __restrict X) {
  std::memset(X, 0, sizeof(double) * n * m);
  const int64_t CH = 256;  // column chunk: 4 rows of P (8 KB) and m chunks of J and X stay in L1
  int64_t i0 = 0;
  for (; i0 + 4 <= n; i0 += 4) {
    for (int r = 0; r < 4; ++r)  // the 4 x 4 diagonal block
      for (int c = r; c < 4; ++c) {
        const int64_t i = i0 + r, j = i0 + c;
        const double p = P[i * n + j];
        for (int64_t k = 0; k < m; ++k) {
          X[k * n + i] += p * J[k * n + j];
          if (c != r) X[k * n + j] += p * J[k * n + i];
        }
      }
    const double *p0 = P + i0 * n, *p1 = p0 + n, *p2 = p1 + n, *p3 = p2 + n;
    const int64_t js = i0 + 4;
    for (int64_t j0 = js; j0 < n; j0 += CH) {
      const int64_t j1 = j0 + CH < n ? j0 + CH : n;
      for (int64_t k = 0; k < m; ++k) {
        const double* __restrict Jk = J + k * n;
        double* __restrict Xk = X + k * n;
        const double b0 = Jk[i0], b1 = Jk[i0 + 1], b2 = Jk[i0 + 2], b3 = Jk[i0 + 3];
        double t0 = 0, t1 = 0, t2 = 0, t3 = 0;
        int64_t j = j0;
#if defined(__AVX512F__)
        const __m512d a0 = _mm512_set1_pd(b0), a1 = _mm512_set1_pd(b1), a2 = _mm512_set1_pd(b2), a3 = _mm512_set1_pd(b3);
        __m512d s0 = _mm512_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
        for (; j + 8 <= j1; j += 8) {
          const __m512d q0 = _mm512_loadu_pd(p0 + j), q1 = _mm512_loadu_pd(p1 + j);
          const __m512d q2 = _mm512_loadu_pd(p2 + j), q3 = _mm512_loadu_pd(p3 + j);
          const __m512d jj = _mm512_loadu_pd(Jk + j);
          __m512d x = _mm512_loadu_pd(Xk + j);
          s0 = _mm512_fmadd_pd(q0, jj, s0); s1 = _mm512_fmadd_pd(q1, jj, s1);
          s2 = _mm512_fmadd_pd(q2, jj, s2); s3 = _mm512_fmadd_pd(q3, jj, s3);
          x = _mm512_fmadd_pd(q0, a0, x); x = _mm512_fmadd_pd(q1, a1, x);
          x = _mm512_fmadd_pd(q2, a2, x); x = _mm512_fmadd_pd(q3, a3, x);
          _mm512_storeu_pd(Xk + j, x);
        }
        t0 = _mm512_reduce_add_pd(s0); t1 = _mm512_reduce_add_pd(s1);
        t2 = _mm512_reduce_add_pd(s2); t3 = _mm512_reduce_add_pd(s3);
#endif
        for (; j < j1; ++j) {
          const double jj = Jk[j];
          t0 += p0[j] * jj; t1 += p1[j] * jj; t2 += p2[j] * jj; t3 += p3[j] * jj;
          Xk[j] += p0[j] * b0 + p1[j] * b1 + p2[j] * b2 + p3[j] * b3;
        }
        Xk[i0] += t0; Xk[i0 + 1] += t1; Xk[i0 + 2] += t2; Xk[i0 + 3] += t3;
      }
    }
  }
  for (int64_t i = i0; i < n; ++i)  // the last n % 4 rows
    for (int64_t j = i; j < n; ++j) {
      const double p = P[i * n + j];
      for (int64_t k = 0; k < m; ++k) {
        X[k * n + i] += p * J[k * n + j];
        if (j != i) X[k * n + j] += p * J[k * n + i];
      }
    }
}
"""
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")
_WARNED: List[bool] = []
ENABLED = os.environ.get("EKF_PLUGIN_NATIVE_SYMM", "1") != "0"  # "0": always OpenBLAS dsymm


def _library():
    from ekf_plugin.native import native_library

    try:
        lib = native_library(_SOURCE, _FLAGS, name="ekf_symm_thin")
    except RuntimeError as exc:
        if not _WARNED:
            _WARNED.append(True)
            warnings.warn(f"native EKF kernel unavailable ({exc}); using OpenBLAS dsymm")
        return None
    fn = lib.symm_thin_f64
    fn.restype = None
    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn


def available() -> bool:
    """True when the kernel is enabled and builds on this machine."""
    return ENABLED and _library() is not None


def symm_thin(P: torch.Tensor, J: torch.Tensor) -> Optional[torch.Tensor]:
    """(m, n) = J P_sym for contiguous float64 CPU P (n, n) (upper triangle valid) and J (m, n); None when
    the kernel does not apply (dtype, device, layout) or cannot be built."""
    if not ENABLED or P.dtype != torch.float64 or J.dtype != torch.float64 or P.device.type != "cpu" \
            or J.device.type != "cpu" or not P.is_contiguous() or P.dim() != 2 or J.shape[-1] != P.shape[0]:
        return None
    fn = _library()
    if fn is None:
        return None
    J = J.contiguous()
    X = torch.empty_like(J)  # (m, n)
    fn(P.shape[0], J.shape[0], P.data_ptr(), J.data_ptr(), X.data_ptr())
    return X
