"""A compiled filter kernel for thin updates of large blocked P (``kernel="native"``, CPU, one thread).

The two passes over a P block with m Jacobian rows (X = P Jᵀ, then P ← (P − Vᵀ V)/λ) are what an EKF
update costs: for the study's water BPNN (n = 2827, float64) and for a reduced-row update of a GNN once P has
~10⁵ weights (m = 5, 20–40 blocks of 5120). For such thin products the symmetric BLAS routines are far from
their bounds: OpenBLAS ``ssymm`` with m = 5 packs P and runs its GEMM micro-kernel at N = 5, about as slow as
five separate ``ssymv`` (each one a full read of the triangle). This kernel reads the upper triangle of P
once per pass:

* X = P Jᵀ for m ≤ 2 rows: eight rows of P at a time (each element of J and X is loaded once per eight rows;
  memory bound: m = 1 at ~25 GB/s). From m = 3 on, that loop is limited by its loads of P from L1 (m = 10:
  23 GFLOP/s), so the product goes by panels of 24 rows (in L2), register-blocked tiles along the rows and
  down the columns of a panel, up to eight labels per pass (the C++ comment at ``xt_blocked``): n = 2827,
  float64, one core: m = 10 in 4.6–5.3 against 7.0 ms, m = 5 in 2.8 against 4.1 ms; 35–42 GFLOP/s of the
  47 that MKL's square GEMM reaches on this CPU. The rectangle product of a sharded P (:func:`rect_xt`) uses
  the same panels.
* P −= Vᵀ V: four rows of P and four of V at a time, applying the fading-memory factor 1/λ in the same pass,
  so the separate P /= λ pass over the whole square disappears
  (:attr:`~ekf_plugin.optim.kernels.FilterKernel.fused_scale`).
* The small algebra of an update of one block (:func:`gain`): X corrected for the deferred rows and noise, A,
  its Cholesky factor, V = L⁻¹ Xᵀ in place, the safety checks and the weight step in one call, where the torch
  algebra spends ~40 small operations (~0.7 ms per update of the study's BPNN right after a pass over P). Here
  the columns go by vector lanes: one pass corrects X for the deferred rows, one computes V with its checks and
  Δw (m = 10, n = 2827, float64, warm: 0.09 ms, 0.20 ms with 16 deferred rows). :class:`~ekf_plugin.optim.EKF` uses it for one block on the CPU (``EKF_PLUGIN_NATIVE_GAIN=0``: never).

Same storage as :class:`~ekf_plugin.optim.kernels.BlasKernel` (row-major blocks, upper triangle valid), so the
two kernels and their checkpoints are interchangeable. Results equal the dense algebra to round-off; the
summation order differs from BLAS's, so runs agree with each other bitwise only with the same kernel.

The C++ source below is built by :func:`ekf_plugin.native.native_library` (``-O3 -march=native``, about a
second, cached per CPU). Without a compiler, :func:`load` returns None and ``select_kernel("native", ...)``
falls back to the BLAS kernel with a warning. The BLAS kernel itself uses this module's X = P Jᵀ
(:func:`thin_xt`) on one thread, where it beats ``?symv``/``?symm``; it keeps ``?syrk`` for P −= VᵀV
(43 GFLOP/s with the 32 deferred rows of :class:`~ekf_plugin.optim.EKF`, twice this kernel's four-row loop).
One thread (the target of the reduced-row benchmarks); with ``torch.get_num_threads() > 1`` the BLAS
kernel may be faster.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence, Tuple

import torch

from ekf_plugin.optim.kernels import BlasKernel

__all__ = ["NativeKernel", "load", "rect_xt", "gain", "SOURCE"]

SOURCE = r"""
#define restrict __restrict
#define CH 512  /* column chunk: the rows of P in flight (16 KB of eight rows in float32) stay in L1
                   while each row of J, X or V passes */
#define MAXM 64
/* Eight rows p0 (leading dimension ld) of a row-major matrix, columns [c0, c1), against m labels: for each
   label k, acc[k][r] += sum_j p_r[j] B_k[j] and C_k[j] += sum_r p_r[j] a_k[r], with B_k = B + k ldb,
   C_k = C + k ldb and a_k = A + k lda (eight values). Column chunks of CH: each element of B_k and C_k is
   loaded once per eight rows (half the cache traffic of four rows). The off-diagonal part of X = P J^T,
   where a row block of P's upper triangle serves both its own rows and (by symmetry) its columns. */
template <typename T>
static inline void rows8(const T *restrict p0, long ld, const T *restrict A, long lda, const T *restrict B,
                         T *restrict C, long ldb, long c0, long c1, long m, T acc[][8]) {
  const T *restrict p1 = p0 + ld, *restrict p2 = p1 + ld, *restrict p3 = p2 + ld, *restrict p4 = p3 + ld;
  const T *restrict p5 = p4 + ld, *restrict p6 = p5 + ld, *restrict p7 = p6 + ld;
  for (long c = c0; c < c1; c += CH) {
    const long ce = c + CH < c1 ? c + CH : c1;
    for (long k = 0; k < m; ++k) {
      const T *restrict Bk = B + k * ldb; T *restrict Ck = C + k * ldb;
      const T *ak = A + k * lda;
      const T j0 = ak[0], j1 = ak[1], j2 = ak[2], j3 = ak[3], j4 = ak[4], j5 = ak[5], j6 = ak[6], j7 = ak[7];
      T a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
      _Pragma("omp simd reduction(+:a0,a1,a2,a3,a4,a5,a6,a7)")
      for (long j = c; j < ce; ++j) {
        const T bk = Bk[j];
        a0 += p0[j] * bk; a1 += p1[j] * bk; a2 += p2[j] * bk; a3 += p3[j] * bk;
        a4 += p4[j] * bk; a5 += p5[j] * bk; a6 += p6[j] * bk; a7 += p7[j] * bk;
        Ck[j] += ((p0[j] * j0 + p1[j] * j1) + (p2[j] * j2 + p3[j] * j3))
               + ((p4[j] * j4 + p5[j] * j5) + (p6[j] * j6 + p7[j] * j7));
      }
      T *r = acc[k];
      r[0] += a0; r[1] += a1; r[2] += a2; r[3] += a3; r[4] += a4; r[5] += a5; r[6] += a6; r[7] += a7;
    }
  }
}

/* X (m, n) = (P J^T)^T for P (n, n) row-major and symmetric, of which only the upper triangle (j >= i) is
   read; J (m, n), m <= MAXM. Eight rows of P at a time (rows8 right of their diagonal block). */
template <typename T>
static void xt(const T *restrict P, const T *restrict J, T *restrict X, long n, long m) {
  enum { R = 8 };
  for (long k = 0; k < m * n; ++k) X[k] = 0;
  long i = 0;
  for (; i + R <= n; i += R) {
    const T *rows[R];
    for (int r = 0; r < R; ++r) rows[r] = P + (i + r) * n;
    T acc[MAXM][R];
    for (long k = 0; k < m; ++k) {  /* the R x R diagonal block, from its upper triangle */
      const T *Jk = J + k * n;
      for (int r = 0; r < R; ++r) {
        T a = 0;
        for (int c = 0; c < R; ++c) a += (c >= r ? rows[r][i + c] : rows[c][i + r]) * Jk[i + c];
        acc[k][r] = a;
      }
    }
    rows8<T>(rows[0], n, J + i, n, J, X, n, i + R, n, m, acc);
    for (long k = 0; k < m; ++k)
      for (int r = 0; r < R; ++r) X[k * n + i + r] += acc[k][r];
  }
  for (; i < n; ++i) {  /* the last n % 8 rows */
    const T *restrict row = P + i * n;
    for (long k = 0; k < m; ++k) {
      const T *restrict Jk = J + k * n; T *restrict Xk = X + k * n;
      const T ji = Jk[i]; T a = row[i] * ji;
      for (long j = i + 1; j < n; ++j) { a += row[j] * Jk[j]; Xk[j] += row[j] * ji; }
      Xk[i] += a;
    }
  }
}

/* P <- s (P - V^T V) on the upper triangle of P (n, n); V (m4, n) with m4 a multiple of 4 (zero rows
   padded). Four rows of P and four rows of V at a time, in column chunks; s applied with the last four. */
template <typename T>
static void sg(T *restrict P, const T *restrict V, long n, long m4, T s) {
  long i = 0;
  for (; i + 4 <= n; i += 4) {
    T *restrict r0 = P + i * n, *restrict r1 = r0 + n, *restrict r2 = r1 + n, *restrict r3 = r2 + n;
    T *rows[4] = {r0, r1, r2, r3};
    for (long k = 0; k < m4; k += 4) {  /* the 4 x 4 diagonal triangle */
      const T *v0 = V + k * n, *v1 = v0 + n, *v2 = v1 + n, *v3 = v2 + n;
      const T sc = (k + 4 >= m4) ? s : (T)1;
      for (int r = 0; r < 4; ++r)
        for (long j = i + r; j < i + 4; ++j)
          rows[r][j] = sc * (rows[r][j] - (v0[i + r] * v0[j] + v1[i + r] * v1[j] + v2[i + r] * v2[j] + v3[i + r] * v3[j]));
    }
    for (long c = i + 4; c < n; c += CH) {
      const long ce = c + CH < n ? c + CH : n;
      for (long k = 0; k < m4; k += 4) {
        const T *restrict v0 = V + k * n, *restrict v1 = v0 + n, *restrict v2 = v1 + n, *restrict v3 = v2 + n;
        const T sc = (k + 4 >= m4) ? s : (T)1;
        const T a00 = v0[i], a01 = v1[i], a02 = v2[i], a03 = v3[i];
        const T a10 = v0[i + 1], a11 = v1[i + 1], a12 = v2[i + 1], a13 = v3[i + 1];
        const T a20 = v0[i + 2], a21 = v1[i + 2], a22 = v2[i + 2], a23 = v3[i + 2];
        const T a30 = v0[i + 3], a31 = v1[i + 3], a32 = v2[i + 3], a33 = v3[i + 3];
        _Pragma("omp simd")
        for (long j = c; j < ce; ++j) {
          const T w0 = v0[j], w1 = v1[j], w2 = v2[j], w3 = v3[j];
          r0[j] = sc * (r0[j] - (a00 * w0 + a01 * w1 + a02 * w2 + a03 * w3));
          r1[j] = sc * (r1[j] - (a10 * w0 + a11 * w1 + a12 * w2 + a13 * w3));
          r2[j] = sc * (r2[j] - (a20 * w0 + a21 * w1 + a22 * w2 + a23 * w3));
          r3[j] = sc * (r3[j] - (a30 * w0 + a31 * w1 + a32 * w2 + a33 * w3));
        }
      }
    }
  }
  for (; i < n; ++i) {  /* the last n % 4 rows */
    T *restrict row = P + i * n;
    for (long j = i; j < n; ++j) {
      T a = 0;
      for (long k = 0; k < m4; ++k) a += V[k * n + i] * V[k * n + j];
      row[j] = s * (row[j] - a);
    }
  }
}

/* The rectangle R (h, w) right of a process's diagonal block in the sharded filter (row-major, leading
   dimension w): X1 (m, h) += (R Jr^T)^T and X2 (m, w) += Jl R for Jl (m, h), Jr (m, w), reading R once
   (two GEMM calls read R twice, and MKL's skinny GEMM on AMD CPUs runs at a third of OpenBLAS's speed). */
template <typename T>
static void rxt(const T *restrict Rm, const T *restrict Jl, const T *restrict Jr, T *restrict X1, T *restrict X2,
                long h, long w, long m) {
  enum { R = 8 };
  long i = 0;
  for (; i + R <= h; i += R) {
    T acc[MAXM][R];
    for (long k = 0; k < m; ++k)
      for (int r = 0; r < R; ++r) acc[k][r] = 0;
    rows8<T>(Rm + i * w, w, Jl + i, h, Jr, X2, w, 0, w, m, acc);
    for (long k = 0; k < m; ++k)
      for (int r = 0; r < R; ++r) X1[k * h + i + r] += acc[k][r];
  }
  for (; i < h; ++i) {  /* the last h % 8 rows */
    const T *restrict row = Rm + i * w;
    for (long k = 0; k < m; ++k) {
      const T *restrict Jk = Jr + k * w; T *restrict Xk = X2 + k * w;
      const T ji = Jl[k * h + i]; T a = 0;
      for (long j = 0; j < w; ++j) { a += row[j] * Jk[j]; Xk[j] += row[j] * ji; }
      X1[k * h + i] += a;
    }
  }
}

/* ---- Blocked X = P J^T for m >= 3 labels (BLOCKED_MIN_M): the same product at GEMM speed. ----
   rows8 above loads its eight rows of P once per label from L1; from m = 3 on the product is limited by
   those loads, not by memory (n = 2827, m = 10: 23 GFLOP/s). Here a panel of BI rows of the upper triangle
   (BI x n, in L2) is passed per group of up to KBMAX labels by two register-blocked tiles: along its rows
   (dot: X[k, i] += sum_j J[k, j] P[i, j], KB labels x 3 rows of accumulators) and down its columns (axpy:
   X[k, j] += sum_i J[k, i] P[i, j], KB labels x 2 vectors), every operand loaded once into a register
   (the empty asm statements keep the compiler from folding a load into each FMA). The first group's
   row pass streams the panel from memory and prefetches PF elements ahead along each row. n = 2827, m = 10,
   float64, one core: 4.6-5.3 ms against 7.0 ms for rows8 (m = 5: 2.8 against 4.1 ms). */
#define BI 24    /* rows of a panel: 24 rows of 2827 float64 = 540 KB, in L2 */
#define BJ 4096  /* column chunk of a panel */
#define PF 256   /* prefetch distance along a row (elements) */
#if defined(__AVX512F__)
#define KBMAX 8  /* 32 vector registers: the dot tile's KB x 3 accumulators, 3 rows and one J vector */
#else
#define KBMAX 4
#endif
#if defined(__AVX512F__)  /* "v": any of the 32 vector registers, 64-byte ones included */
#define IN_REGISTER(x) __asm__("" : "+v"(x))
#elif defined(__AVX__)  /* a 32-byte vector fits one register (without AVX it is two: no constraint for it) */
#define IN_REGISTER(x) __asm__("" : "+x"(x))
#else
#define IN_REGISTER(x) ((void)0)
#endif

template <typename T> struct Vec { typedef T type __attribute__((vector_size(32), aligned(sizeof(T)), may_alias)); };
/* The panel product's vectors (axpy_tile, dot_rows): 64 bytes for float64 where AVX-512 has them, 32 bytes otherwise
   (float32 at m = 5 was 7-13 % slower with 64-byte vectors on this project's CPU). X = P J^T, n = 2827, float64,
   m = 10, one core, against 32-byte vectors in the same runs: 4.08-4.16 against 4.35-4.39 ms (and 4.37-4.52 against
   4.75-5.09 in earlier runs); with the "v" constraint float32 (n = 4000, m = 5) 2.37 against 2.43-2.45 ms. */
template <typename T> struct PVec { typedef typename Vec<T>::type type; };
#if defined(__AVX512F__)
template <> struct PVec<double> { typedef double type __attribute__((vector_size(64), aligned(8), may_alias)); };
#endif

/* C (KB, w; ldc) += A (KB, h; lda) B (h, w; ldb): KB labels x 2 vectors of columns per tile, down the h rows. */
template <typename T, int KB>
static inline void axpy_tile(const T *restrict A, long lda, const T *restrict B, long ldb, T *restrict C, long ldc,
                             long h, long w) {
  typedef typename PVec<T>::type v;
  enum { L = sizeof(v) / sizeof(T), CW = 2 * L };
  long c = 0;
  for (; c + CW <= w; c += CW) {
    v acc[KB][2];
    for (int k = 0; k < KB; ++k) { acc[k][0] = (v){}; acc[k][1] = (v){}; }
    for (long r = 0; r < h; ++r) {
      v b0 = *(const v *)(B + r * ldb + c), b1 = *(const v *)(B + r * ldb + c + L);
      IN_REGISTER(b0); IN_REGISTER(b1);
      for (int k = 0; k < KB; ++k) {
        const T a = A[k * lda + r];
        acc[k][0] += a * b0; acc[k][1] += a * b1;
      }
    }
    for (int k = 0; k < KB; ++k) {
      v *o0 = (v *)(C + k * ldc + c), *o1 = (v *)(C + k * ldc + c + L);
      *o0 += acc[k][0]; *o1 += acc[k][1];
    }
  }
  for (; c < w; ++c)
    for (int k = 0; k < KB; ++k) {
      T s = 0;
      for (long r = 0; r < h; ++r) s += A[k * lda + r] * B[r * ldb + c];
      C[k * ldc + c] += s;
    }
}

/* C[k, i0 + r] += sum_j A[k, j] B[i0 + r, j] for R rows, j < w; prefetch pf elements ahead (0: none). */
template <typename T, int KB, int R>
static inline void dot_rows(const T *restrict A, long lda, const T *restrict B, long ldb, T *restrict C, long ldc,
                            long i0, long w, long pf) {
  typedef typename PVec<T>::type v;
  enum { L = sizeof(v) / sizeof(T) };
  const long wv = w - w % L;
  v acc[KB][R];
  for (int k = 0; k < KB; ++k)
    for (int r = 0; r < R; ++r) acc[k][r] = (v){};
  for (long j = 0; j < wv; j += L) {
    if (pf && (j * (long)sizeof(T)) % 64 == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(B + (i0 + r) * ldb + j + pf, 0, 2);
    v b[R];
    for (int r = 0; r < R; ++r) { b[r] = *(const v *)(B + (i0 + r) * ldb + j); IN_REGISTER(b[r]); }
    for (int k = 0; k < KB; ++k) {
      v a = *(const v *)(A + k * lda + j);
      IN_REGISTER(a);
      for (int r = 0; r < R; ++r) acc[k][r] += a * b[r];
    }
  }
  for (int k = 0; k < KB; ++k)
    for (int r = 0; r < R; ++r) {
      T s = 0;
      for (int l = 0; l < L; ++l) s += acc[k][r][l];
      for (long j = wv; j < w; ++j) s += A[k * lda + j] * B[(i0 + r) * ldb + j];
      C[k * ldc + i0 + r] += s;
    }
}

/* One chunk (h, w; ldb) of a panel for KB labels: X1 (KB, h; ld1) += (B Jr^T)^T, X2 (KB, w; ld2) += Jl B. */
template <typename T, int KB>
static void chunk_kb(const T *B, long ldb, const T *Jl, long ldl, const T *Jr, long ldr, T *X1, long ld1, T *X2,
                     long ld2, long h, long w, long pf) {
  long i = 0;  /* along the rows first: the first group streams the chunk from memory */
  for (; i + 3 <= h; i += 3) dot_rows<T, KB, 3>(Jr, ldr, B, ldb, X1, ld1, i, w, pf);
  if (h - i == 2) dot_rows<T, KB, 2>(Jr, ldr, B, ldb, X1, ld1, i, w, pf);
  if (h - i == 1) dot_rows<T, KB, 1>(Jr, ldr, B, ldb, X1, ld1, i, w, pf);
  axpy_tile<T, KB>(Jl, ldl, B, ldb, X2, ld2, h, w);  /* then down the columns, from L2 */
}

template <typename T>
static void chunk(int kb, const T *B, long ldb, const T *Jl, long ldl, const T *Jr, long ldr, T *X1, long ld1,
                  T *X2, long ld2, long h, long w, long pf) {
  switch (kb) {
#define CHUNK(K) case K: chunk_kb<T, K>(B, ldb, Jl, ldl, Jr, ldr, X1, ld1, X2, ld2, h, w, pf); break;
    CHUNK(1) CHUNK(2) CHUNK(3) CHUNK(4)
#if KBMAX > 4
    CHUNK(5) CHUNK(6) CHUNK(7) CHUNK(8)
#endif
#undef CHUNK
  }
}

/* A panel R (h <= BI rows, w; ldb) of m labels: X1 (m, h; ld1) += (R Jr^T)^T and X2 (m, w; ld2) += Jl R for
   Jl (m, h; ldl), Jr (m, w; ldr); labels in balanced groups of <= KBMAX, column chunks of BJ outermost. */
template <typename T>
static void panel(const T *R, long ldb, const T *Jl, long ldl, const T *Jr, long ldr, T *X1, long ld1, T *X2,
                  long ld2, long h, long w, long m) {
  const long groups = (m + KBMAX - 1) / KBMAX;
  for (long j0 = 0; j0 < w; j0 += BJ) {
    const long wj = w - j0 < BJ ? w - j0 : BJ;
    for (long g = 0, k = 0; g < groups; ++g) {
      const long kb = (m - k) / (groups - g);
      chunk<T>((int)kb, R + j0, ldb, Jl + k * ldl, ldl, Jr + k * ldr + j0, ldr, X1 + k * ld1, ld1,
               X2 + k * ld2 + j0, ld2, h, wj, g == 0 ? PF : 0);
      k += kb;
    }
  }
}

/* X (m, n) = (P J^T)^T from the upper triangle of P (n, n), m >= 1: per panel of BI rows its diagonal block
   (made full in D) down the columns, and the rectangle right of it by panel(). */
template <typename T>
static void xt_blocked(const T *restrict P, const T *restrict J, T *restrict X, long n, long m) {
  for (long k = 0; k < m * n; ++k) X[k] = 0;
  T D[BI * BI];
  for (long i0 = 0; i0 < n; i0 += BI) {
    const long h = n - i0 < BI ? n - i0 : BI;
    for (long r = 0; r < h; ++r)
      for (long c = 0; c < h; ++c) D[r * h + c] = c >= r ? P[(i0 + r) * n + i0 + c] : P[(i0 + c) * n + i0 + r];
    for (long k = 0; k < m; ++k) axpy_tile<T, 1>(J + k * n + i0, n, D, h, X + k * n + i0, n, h, h);
    if (i0 + h < n)
      panel<T>(P + i0 * n + i0 + h, n, J + i0, n, J + i0 + h, n, X + i0, n, X + i0 + h, n, h, n - i0 - h, m);
  }
}

/* rxt by panels: X1 (m, h) += (R Jr^T)^T, X2 (m, w) += Jl R for R (h, w) row-major. */
template <typename T>
static void rxt_blocked(const T *Rm, const T *Jl, const T *Jr, T *X1, T *X2, long h, long w, long m) {
  for (long i0 = 0; i0 < h; i0 += BI) {
    const long hp = h - i0 < BI ? h - i0 : BI;
    panel<T>(Rm + i0 * w, w, Jl + i0, h, Jr, w, X1 + i0, h, X2, w, hp, w, m);
  }
}
#define BLOCKED_MIN_M 3

#include <cmath>
/* The small algebra of one update of one block (n weights, m <= MAXM labels), after X = S J^T:
   X (m, n) holds (S J^T)^T on entry. With P = c (S + diag(g) - W^T W) (W: r deferred rows, wsq = diag(W^T W),
   g and W optional): X <- c (X + J o g - (J W^T) W) = (P J^T)^T; A = sym(J X^T) + noise I (m, m, out);
   L = chol(A); u = L^-1 xi (out); X <- V = L^-1 X (in place); dw = V^T u (n, out);
   stats = [ok, info, dmin, max|V|, max |xi_k| / sqrt(A_kk)] with dmin = min_i c (dS_i + g_i - wsq_i) - sum_k V_ki^2,
   ok = Cholesky succeeded, xi and u finite, max|V| <= big, dmin > 0 and (gate < 0 or the largest normalised
   innovation <= gate). On a failed Cholesky info = the 1-based order of the first non-positive pivot and X,
   u, dw are left as they are. The same sums as the torch path up to their order. */
/* m ? a : b per lane, m a vector comparison's result (all bits set where true): bit operations, which GCC and
   Clang both take on vector types (a vector ?: is GCC's only). */
template <typename V, typename M>
static inline V vselect(M m, V a, V b) { return (V)((m & (M)a) | (~m & (M)b)); }

template <typename T>
static T dotn(const T *restrict a, const T *restrict b, long n) {  /* four vector accumulators: not latency bound */
  typedef typename Vec<T>::type v;
  enum { L = 32 / sizeof(T) };
  v s0 = {}, s1 = {}, s2 = {}, s3 = {};
  long i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    s0 += *(const v *)(a + i) * *(const v *)(b + i);
    s1 += *(const v *)(a + i + L) * *(const v *)(b + i + L);
    s2 += *(const v *)(a + i + 2 * L) * *(const v *)(b + i + 2 * L);
    s3 += *(const v *)(a + i + 3 * L) * *(const v *)(b + i + 3 * L);
  }
  for (; i + L <= n; i += L) s0 += *(const v *)(a + i) * *(const v *)(b + i);
  const v t = (s0 + s1) + (s2 + s3);
  T s = 0;
  for (int l = 0; l < L; ++l) s += t[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

/* X_k <- c (X_k - sum_q Y_kq W_q + J_k o g) for the columns [i, i + 2L) (two vectors; the caller does the last
   n % 2L columns one by one the same way): every element sees the same operations in the same order (q ascending, then g, then c); the r rows of W for these
   columns stay in L1 while the m rows of X pass. */
template <typename T>
static inline void correct_cols(T *restrict X, const T *restrict J, const T *restrict W, const T *restrict Y,
                                const T *restrict g, T c, long n, long m, long r, long i) {
  typedef typename Vec<T>::type v;
  enum { L = 32 / sizeof(T) };
  for (long k = 0; k < m; ++k) {
    T *restrict Xk = X + k * n;
    const T *restrict Yk = Y + k * r;
    v a0 = *(const v *)(Xk + i), a1 = *(const v *)(Xk + i + L);
    for (long q = 0; q < r; ++q) {
      const T y = Yk[q];
      a0 -= y * *(const v *)(W + q * n + i); a1 -= y * *(const v *)(W + q * n + i + L);
    }
    if (g) {
      a0 += *(const v *)(J + k * n + i) * *(const v *)(g + i);
      a1 += *(const v *)(J + k * n + i + L) * *(const v *)(g + i + L);
    }
    if (c != T(1)) { a0 *= c; a1 *= c; }
    *(v *)(Xk + i) = a0; *(v *)(Xk + i + L) = a1;
  }
}

template <typename T>
static void gain(T *restrict X, const T *restrict J, const T *restrict xi, long n, long m, const T *restrict W, long r,
                 const T *restrict wsq, const T *restrict g, const T *restrict dS, T c, T noise, T big, T gate,
                 T *restrict A, T *restrict u, T *restrict dw, double *stats, const long *wptr, const long *wnum,
                 long np, long wf32) {
  typedef typename Vec<T>::type v;
  enum { L = 32 / sizeof(T), CW = 2 * L };
  stats[5] = 0.0;
  const long nv = n - n % CW;  /* columns done by vectors; the rest one by one */
  if (r > 0 || g || c != T(1)) {  /* X <- c (X - (J W^T) W + J o g): per group of at most 64 rows of W, Y = J W^T
                                      (on the stack) and one pass over the columns; g and c with the last group
                                      (r = 0: one group of no rows) */
    T Y[MAXM * 64];
    long r0 = 0;
    do {
      const long rb = r - r0 < 64 ? r - r0 : 64;
      const T *restrict Wb = W + r0 * n;
      for (long k = 0; k < m; ++k)
        for (long q = 0; q < rb; ++q) Y[k * rb + q] = dotn<T>(J + k * n, Wb + q * n, n);
      const bool last = r0 + rb >= r;
      for (long i = 0; i < nv; i += CW) correct_cols<T>(X, J, Wb, Y, last ? g : nullptr, last ? c : T(1), n, m, rb, i);
      for (long i = nv; i < n; ++i)
        for (long k = 0; k < m; ++k) {
          T a = X[k * n + i];
          for (long q = 0; q < rb; ++q) a -= Y[k * rb + q] * Wb[q * n + i];
          if (last && g) a += J[k * n + i] * g[i];
          if (last && c != T(1)) a *= c;
          X[k * n + i] = a;
        }
      r0 += 64;
    } while (r0 < r);
  }
  for (long k = 0; k < m; ++k)
    for (long l = 0; l <= k; ++l) {
      const T a = T(0.5) * (dotn<T>(J + k * n, X + l * n, n) + dotn<T>(J + l * n, X + k * n, n));
      A[k * m + l] = A[l * m + k] = a;
    }
  for (long k = 0; k < m; ++k) A[k * m + k] += noise;
  T L_[MAXM * MAXM];
  long info = 0;
  for (long j = 0; j < m && !info; ++j) {  /* Cholesky, lower */
    T d = A[j * m + j];
    for (long p = 0; p < j; ++p) d -= L_[j * MAXM + p] * L_[j * MAXM + p];
    if (!(d > T(0))) { info = j + 1; break; }
    const T ljj = std::sqrt(d);
    L_[j * MAXM + j] = ljj;
    for (long i = j + 1; i < m; ++i) {
      T s = A[i * m + j];
      for (long p = 0; p < j; ++p) s -= L_[i * MAXM + p] * L_[j * MAXM + p];
      L_[i * MAXM + j] = s / ljj;
    }
  }
  T zmax = 0;
  for (long k = 0; k < m; ++k) {
    const T z = std::fabs(xi[k]) / std::sqrt(A[k * m + k]);
    zmax = z > zmax || z != z ? z : zmax;
  }
  stats[1] = double(info); stats[4] = double(zmax);
  if (info) { stats[0] = 0; stats[2] = 0; stats[3] = 0; return; }
  bool finite = true;
  T inv[MAXM];
  for (long k = 0; k < m; ++k) {  /* u = L^-1 xi */
    T uk = xi[k];
    finite = finite && std::isfinite(xi[k]);
    for (long p = 0; p < k; ++p) uk -= L_[k * MAXM + p] * u[p];
    inv[k] = T(1) / L_[k * MAXM + k];
    u[k] = uk * inv[k];
    finite = finite && std::isfinite(u[k]);
  }
  /* One pass over the columns: V = L^-1 X in place (row k: X_k - sum_{p<k} L_kp V_p, then times 1/L_kk), and per
     column sum_k V_ki^2, dw_i = sum_k u_k V_ki, max |V|, d_i; per element the same operations in the same order
     as row by row. */
  v vmax0 = {}, dmin0;
  for (int l = 0; l < L; ++l) dmin0[l] = T(INFINITY);
  v vmax1 = vmax0, dmin1 = dmin0;
  for (long i = 0; i < nv; i += CW) {
    v s0 = {}, s1 = {}, w0 = {}, w1 = {};
    for (long k = 0; k < m; ++k) {
      T *restrict Vk = X + k * n;
      v a0 = *(const v *)(Vk + i), a1 = *(const v *)(Vk + i + L);
      for (long p = 0; p < k; ++p) {
        const T lkp = L_[k * MAXM + p];
        a0 -= lkp * *(const v *)(X + p * n + i); a1 -= lkp * *(const v *)(X + p * n + i + L);
      }
      a0 *= inv[k]; a1 *= inv[k];
      *(v *)(Vk + i) = a0; *(v *)(Vk + i + L) = a1;
      s0 += a0 * a0; s1 += a1 * a1; w0 += u[k] * a0; w1 += u[k] * a1;
      const v b0 = vselect(a0 < 0, -a0, a0), b1 = vselect(a1 < 0, -a1, a1);  /* |V| (NaN stays NaN) */
      vmax0 = vselect((b0 > vmax0) | (b0 != b0), b0, vmax0);
      vmax1 = vselect((b1 > vmax1) | (b1 != b1), b1, vmax1);
    }
    *(v *)(dw + i) = w0; *(v *)(dw + i + L) = w1;
    v e0 = *(const v *)(dS + i), e1 = *(const v *)(dS + i + L);
    if (g) { e0 += *(const v *)(g + i); e1 += *(const v *)(g + i + L); }
    else { e0 += T(0); e1 += T(0); }
    if (wsq) { e0 -= *(const v *)(wsq + i); e1 -= *(const v *)(wsq + i + L); }
    else { e0 -= T(0); e1 -= T(0); }
    const v d0 = c * e0 - s0, d1 = c * e1 - s1;
    dmin0 = vselect((d0 < dmin0) | (d0 != d0), d0, dmin0);
    dmin1 = vselect((d1 < dmin1) | (d1 != d1), d1, dmin1);
  }
  T dmin = T(INFINITY), vmax = 0;
  for (int l = 0; l < L; ++l) {
    const T d0 = dmin0[l], d1 = dmin1[l], a0 = vmax0[l], a1 = vmax1[l];
    dmin = d0 < dmin || d0 != d0 ? d0 : dmin;
    dmin = d1 < dmin || d1 != d1 ? d1 : dmin;
    vmax = a0 > vmax || a0 != a0 ? a0 : vmax;
    vmax = a1 > vmax || a1 != a1 ? a1 : vmax;
  }
  for (long i = nv; i < n; ++i) {  /* the last n % 2L columns */
    T s = 0, w = 0;
    for (long k = 0; k < m; ++k) {
      T a = X[k * n + i];
      for (long p = 0; p < k; ++p) a -= L_[k * MAXM + p] * X[p * n + i];
      a *= inv[k];
      X[k * n + i] = a;
      s += a * a; w += u[k] * a;
      const T av = std::fabs(a);
      vmax = av > vmax || av != av ? av : vmax;
    }
    dw[i] = w;
    const T d = c * (dS[i] + (g ? g[i] : T(0)) - (wsq ? wsq[i] : T(0))) - s;
    dmin = d < dmin || d != d ? d : dmin;
  }
  const bool ok = finite && vmax <= big && dmin > T(0) && (gate < T(0) || zmax <= gate);
  stats[0] = ok ? 1.0 : 0.0; stats[2] = double(dmin); stats[3] = double(vmax);
  if (ok && np > 0) {  /* w <- w - dw into the parameters (np tensors of numel wnum, float32 or T) */
    long off = 0;
    for (long j = 0; j < np; ++j) {
      if (wf32) {
        float *restrict w = reinterpret_cast<float *>(wptr[j]);
        for (long i = 0; i < wnum[j]; ++i) w[i] -= static_cast<float>(dw[off + i]);
      } else {
        T *restrict w = reinterpret_cast<T *>(wptr[j]);
        for (long i = 0; i < wnum[j]; ++i) w[i] -= dw[off + i];
      }
      off += wnum[j];
    }
    stats[5] = 1.0;
  }
}

extern "C" {
void ekf_gain_f32(float *X, const float *J, const float *xi, long n, long m, const float *W, long r, const float *wsq,
                  const float *g, const float *dS, double c, double noise, double big, double gate, float *A, float *u,
                  float *dw, double *stats, const long *wptr, const long *wnum, long np, long wf32) {
  gain<float>(X, J, xi, n, m, W, r, wsq, g, dS, float(c), float(noise), float(big), float(gate), A, u, dw, stats,
              wptr, wnum, np, wf32); }
void ekf_gain_f64(double *X, const double *J, const double *xi, long n, long m, const double *W, long r,
                  const double *wsq, const double *g, const double *dS, double c, double noise, double big,
                  double gate, double *A, double *u, double *dw, double *stats, const long *wptr, const long *wnum,
                  long np, long wf32) {
  gain<double>(X, J, xi, n, m, W, r, wsq, g, dS, c, noise, big, gate, A, u, dw, stats, wptr, wnum, np, wf32); }
}

extern "C" {
void ekf_xt_f32(const float *P, const float *J, float *X, long n, long m) {
  if (m >= BLOCKED_MIN_M) xt_blocked<float>(P, J, X, n, m); else xt<float>(P, J, X, n, m); }
void ekf_xt_f64(const double *P, const double *J, double *X, long n, long m) {
  if (m >= BLOCKED_MIN_M) xt_blocked<double>(P, J, X, n, m); else xt<double>(P, J, X, n, m); }
void ekf_sg_f32(float *P, const float *V, long n, long m4, float s) { sg<float>(P, V, n, m4, s); }
void ekf_sg_f64(double *P, const double *V, long n, long m4, double s) { sg<double>(P, V, n, m4, s); }
void ekf_rxt_f32(const float *R, const float *Jl, const float *Jr, float *X1, float *X2, long h, long w, long m) {
  if (m >= BLOCKED_MIN_M) rxt_blocked<float>(R, Jl, Jr, X1, X2, h, w, m); else rxt<float>(R, Jl, Jr, X1, X2, h, w, m); }
void ekf_rxt_f64(const double *R, const double *Jl, const double *Jr, double *X1, double *X2, long h, long w, long m) {
  if (m >= BLOCKED_MIN_M) rxt_blocked<double>(R, Jl, Jr, X1, X2, h, w, m); else rxt<double>(R, Jl, Jr, X1, X2, h, w, m); }
}"""
MAXM = 64  # most Jacobian rows per update the compiled X = P Jᵀ takes (more: the BLAS kernel)

_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-fno-math-errno")
_STATE: dict = {}


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernels (built with :func:`ekf_plugin.native.native_library` on first use, cached per
    CPU), or None when they cannot be built (the reason is in :func:`last_error`)."""
    if "lib" in _STATE:
        return _STATE["lib"]
    from ekf_plugin.native import native_library  # noqa: PLC0415

    lib, why = None, ""
    for flags in (_FLAGS, tuple(f for f in _FLAGS if f != "-march=native")):  # some compilers refuse -march=native
        try:
            lib = native_library(SOURCE, flags, name="ekf_filter_thin")
            break
        except RuntimeError as exc:
            why = str(exc)
    if lib is not None:
        L, vp = ctypes.c_long, ctypes.c_void_p
        for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
            xt, sg = getattr(lib, f"ekf_xt_{suffix}"), getattr(lib, f"ekf_sg_{suffix}")
            xt.argtypes, xt.restype = [vp, vp, vp, L, L], None
            sg.argtypes, sg.restype = [vp, vp, L, L, real], None
            rxt = getattr(lib, f"ekf_rxt_{suffix}")
            rxt.argtypes, rxt.restype = [vp, vp, vp, vp, vp, L, L, L], None
            gn, D = getattr(lib, f"ekf_gain_{suffix}"), ctypes.c_double
            gn.argtypes, gn.restype = [vp, vp, vp, L, L, vp, L, vp, vp, vp, D, D, D, D, vp, vp, vp, vp, vp, vp, L, L], None
        why = ""
    _STATE["lib"], _STATE["error"] = lib, why
    return lib


def last_error() -> str:
    """Why :func:`load` returned None ("" if it did not)."""
    return _STATE.get("error", "")


def _applies(P: torch.Tensor, M: torch.Tensor) -> bool:
    return (P.device.type == "cpu" and P.dtype in (torch.float32, torch.float64) and M.dtype == P.dtype
            and P.is_contiguous() and P.dim() == 2 and P.shape[0] == P.shape[1] == M.shape[1])


def thin_xt(P: torch.Tensor, J: torch.Tensor) -> Optional[torch.Tensor]:
    """(m, n_b) = (P Jᵀ)ᵀ by the compiled kernel for a contiguous CPU float32/float64 block P (n_b, n_b), upper
    triangle valid, and J (m, n_b) with m ≤ MAXM; None when it does not apply or cannot be built."""
    if not _applies(P, J) or J.shape[0] > MAXM:
        return None
    lib = load()
    if lib is None:
        return None
    J = J.contiguous()  # (m, n_b)
    X = torch.empty_like(J)  # (m, n_b)
    getattr(lib, "ekf_xt_" + ("f32" if P.dtype == torch.float32 else "f64"))(
        P.data_ptr(), J.data_ptr(), X.data_ptr(), P.shape[0], J.shape[0])
    return X


def _rect_applies(R: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    return (R.device.type == "cpu" and R.dtype in (torch.float32, torch.float64) and R.dim() == 2
            and R.is_contiguous() and A.dtype == B.dtype == R.dtype and A.shape[0] == B.shape[0] <= MAXM
            and A.shape[1] == R.shape[0] and B.shape[1] == R.shape[1])


def rect_xt(R: torch.Tensor, Jl: torch.Tensor, Jr: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """((R Jrᵀ)ᵀ (m, h), Jl R (m, w)) in one pass over a contiguous CPU float32/float64 rectangle R (h, w) of a
    sharded P (:mod:`ekf_plugin.optim.sharded`), for Jl (m, h) and Jr (m, w), m ≤ MAXM; None when the compiled
    kernel does not apply or cannot be built."""
    if not _rect_applies(R, Jl, Jr):
        return None
    lib = load()
    if lib is None:
        return None
    Jl, Jr = Jl.contiguous(), Jr.contiguous()  # (m, h), (m, w)
    X1, X2 = torch.zeros_like(Jl), torch.zeros_like(Jr)  # (m, h), (m, w)
    getattr(lib, "ekf_rxt_" + ("f32" if R.dtype == torch.float32 else "f64"))(
        R.data_ptr(), Jl.data_ptr(), Jr.data_ptr(), X1.data_ptr(), X2.data_ptr(), R.shape[0], R.shape[1], Jl.shape[0])
    return X1, X2


def gain(X: torch.Tensor, J: torch.Tensor, xi: torch.Tensor, dS: torch.Tensor, c: float, noise: float, big: float,
         gate: Optional[float], W: Optional[torch.Tensor] = None, wsq: Optional[torch.Tensor] = None,
         g: Optional[torch.Tensor] = None, weights: Optional[Sequence[torch.Tensor]] = None
         ) -> Optional[Tuple[bool, int, float, torch.Tensor, torch.Tensor, bool]]:
    """The small algebra of an update of one block by one compiled call (the C++ comment above ``gain``): X (m, n),
    on entry (S Jᵀ)ᵀ, becomes V = L⁻¹ Xᵀ_P in place; returns (ok, info, dmin, A (m, m), Δw = Vᵀ L⁻¹ ξ (n,),
    stepped), or None where it does not apply (not contiguous CPU float32/float64 tensors of one dtype, m > MAXM,
    or no library): then the caller's torch algebra. ``weights``: the parameters in J's column order; where they
    are contiguous CPU tensors of X's dtype or float32, an accepted update also does w ← w − Δw in them
    (``stepped``; the same cast and subtraction as the torch path). The ~40 small tensor operations it replaces
    cost ~0.7 ms per update of the study's BPNN after a pass over P."""
    m, n = X.shape
    parts = [t for t in (X, J, xi, dS, W, wsq, g) if t is not None]
    if (m > MAXM or X.device.type != "cpu" or X.dtype not in (torch.float32, torch.float64)
            or any(t.dtype != X.dtype or t.device != X.device or not t.is_contiguous() for t in parts)):
        return None
    lib = load()
    if lib is None:
        return None
    A, u, dw = X.new_empty(m, m), X.new_empty(m), X.new_empty(n)  # (m, m), (m,), (n,)
    stats = torch.empty(6, dtype=torch.float64)  # ok, info, dmin, max|V|, largest normalised innovation, stepped
    wptr = wnum = None
    wf32 = 0
    if weights is not None and sum(w.numel() for w in weights) == n:
        kinds = {w.dtype for w in weights}
        if (len(kinds) == 1 and kinds <= {X.dtype, torch.float32}
                and all(w.device.type == "cpu" and w.is_contiguous() for w in weights)):
            wf32 = int(weights[0].dtype == torch.float32 and X.dtype != torch.float32)
            wptr, wnum = _weight_pointers(weights)

    def ptr(t):
        return None if t is None else t.data_ptr()

    getattr(lib, "ekf_gain_" + ("f32" if X.dtype == torch.float32 else "f64"))(
        X.data_ptr(), J.data_ptr(), xi.data_ptr(), n, m, ptr(W), 0 if W is None else W.shape[0], ptr(wsq), ptr(g),
        dS.data_ptr(), float(c), float(noise), float(big), -1.0 if gate is None else float(gate), A.data_ptr(),
        u.data_ptr(), dw.data_ptr(), stats.data_ptr(), ptr(wptr), ptr(wnum), 0 if wptr is None else wptr.numel(), wf32)
    ok, info, dmin, _, _, stepped = stats.tolist()
    return bool(ok), int(info), dmin, A, dw, bool(stepped)


_POINTERS: dict = {}  # (addresses, sizes) of a weight list -> its (pointers (p,), sizes (p,)) int64 tensors


def _weight_pointers(weights: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(addresses (p,), element counts (p,)) of ``weights`` as int64 tensors for :func:`gain`, kept per list of
    addresses and sizes (the same parameters at every update: two tensor constructions saved per call)."""
    key = tuple((w.data_ptr(), w.numel()) for w in weights)
    got = _POINTERS.get(key)
    if got is None:
        if len(_POINTERS) >= 16:
            _POINTERS.clear()
        got = _POINTERS[key] = (torch.tensor([a for a, _ in key], dtype=torch.int64),
                                torch.tensor([k for _, k in key], dtype=torch.int64))
    return got


class NativeKernel(BlasKernel):
    """The compiled kernel (module docstring) for contiguous float32/float64 CPU blocks; anything else
    (views, other dtypes) goes to the BLAS kernel it extends. Upper triangle valid, like BLAS."""

    name = "native"
    fused_scale = True

    def __init__(self, lib: Optional[ctypes.CDLL] = None) -> None:
        super().__init__()
        self._lib = lib if lib is not None else load()
        if self._lib is None:
            raise RuntimeError(f"the native EKF kernel could not be built: {last_error()}")

    _ok = staticmethod(_applies)

    def _suffix(self, P: torch.Tensor) -> str:
        return "f32" if P.dtype == torch.float32 else "f64"

    def xt(self, P: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
        X = thin_xt(P, J)
        return X if X is not None else self._blas_xt(P, J)

    def sub_gram_(self, P: torch.Tensor, V: torch.Tensor, scale: float = 1.0) -> None:
        """In place P ← scale·(P − Vᵀ V) on the upper triangle (``scale`` = 1/λ folds the fading memory in)."""
        if not self._ok(P, V):
            super().sub_gram_(P, V)
            if scale != 1.0:
                P.mul_(scale)
            return
        m = V.shape[0]
        m4 = -(-m // 4) * 4
        Vp = V.new_zeros((m4, V.shape[1]))  # (m4, n_b), rows m.. zero
        Vp[:m] = V
        getattr(self._lib, "ekf_sg_" + self._suffix(P))(P.data_ptr(), Vp.data_ptr(), P.shape[0], m4, float(scale))
