"""Compiled energy and force-label rows of the element networks (CPU): the closed form of
:mod:`ekf_plugin.bpnn.network_jacobian` in one C++ loop per update.

The torch path of :class:`~ekf_plugin.bpnn.network_jacobian.NetworkJacobians` spends most of a BPNN force update's
~1 ms of rows (10 labels, 192-atom water) in ~100 small tensor operations, not in arithmetic (~9 M multiply-adds).
This kernel does the same sums atom by atom:

* per element, the forward pass of its atoms (h_l, σ'(z_l), σ''/σ'(z_l)) and the backward δ_l of the energy;
* energy: E += scale · NN(s_i), row += scale · (δ_lᵀ h_{l−1}, δ_l, h_L, 1) summed over the atoms;
* force label k: for each atom i whose column c_{k,i} = ∂s_i/∂r_{a_k,α_k} is not all zero (an atom outside the
  cutoff sphere of a_k has a zero column: about half of them in water), the tangent t_l = σ'(z_l) ∘ (W_l t_{l−1})
  with t_0 = c_{k,i}, F_k −= scale · w · t_L, and the reverse sweep z̄_l = δ_l ∘ (W_l t_{l−1}) ∘ σ''/σ'(z_l) +
  h̄_l ∘ σ'(z_l), h̄_{l−1} = W_lᵀ z̄_l, row_k −= scale · (δ_lᵀ t_{l−1} + z̄_lᵀ h_{l−1}, z̄_l, t_L, 0);
* force components alone (:func:`force_values`, a threshold selection's candidates): by reverse mode, each atom's
  energy gradient g_i = ∂E/∂s_i = W_0ᵀ δ_1 once, then F_k −= scale · Σ_i g_i · c_{k,i} (summed in the column
  table's slot space, a vector dot per atom): 30 candidates, 192-atom water, float32, one core, warm: 0.21 against
  0.60 ms for the tangents of each (label, atom); the same components to round-off, not bitwise (other sums).

Labels are the outer loop, atoms the inner, so a label's row slice of one element (1.5 k weights) stays in L1
while its atoms add to it; the energy needs no per-atom state (one pass per atom). Columns come as a (k, N, W)
tensor or as the feature kernel's :class:`~ekf_plugin.bpnn.feature_derivatives.ColumnTable` (read through its slots,
no gathered copy). Vectors are 64 bytes, widths padded to them; networks of up to 8 linear layers and 256 float32 /
128 float64 units per layer (else the kernel declines and the torch path runs). Sums run in the tensors' dtype
(float32 or float64) in atom order: the values equal the torch path's to round-off (tests). Measured (192-atom
water, float32, one core, warm cache): 10 force rows 0.35 ms against 1.06 ms for the torch path, one energy row
0.07 against 0.36 ms. :func:`rows_module` returns None (and the torch path is used) where the library cannot be
built, or with ``EKF_PLUGIN_NATIVE_ROWS=0``.
"""

from __future__ import annotations

import ctypes
import os
from typing import List, Optional, Sequence, Tuple

import torch

from ..native import VECTOR_MATH
from .feature_derivatives import ColumnTable

__all__ = ["rows_module", "NATIVE_ROWS", "NetworkLayout", "energy_rows", "force_rows", "force_values"]

NATIVE_ROWS = os.environ.get("EKF_PLUGIN_NATIVE_ROWS", "1") != "0"  # "0": the torch path everywhere

_SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

""" + VECTOR_MATH + r"""
constexpr int MAXV = 16;  // widths up to 16 vectors (256 float32, 128 float64): wider networks take the torch path
constexpr int MAXLIN = 8;  // linear layers per network (7 hidden): deeper networks take the torch path

template <typename T>
inline typename VT<T>::v tanhv(typename VT<T>::v x) {
  typedef typename VT<T>::v V;
  const T c = sizeof(T) == 4 ? T(9) : T(20);  // tanh(9) rounds to 1 in float32, tanh(20) in float64
  x = x > c ? V{} + c : x;  // written so that NaN stays NaN
  x = x < -c ? V{} - c : x;
  V e = expm1v<T>(x + x);
  return e / (e + T(2));
}

inline int64_t nvec(int64_t d, int L) { return (d + L - 1) / L; }

template <typename T>
struct Buf {  // 64-byte aligned scratch that grows
  T* p = nullptr;
  size_t cap = 0;
  T* get(size_t n) {
    if (n > cap) {
      std::free(p);
      size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
      p = static_cast<T*>(std::aligned_alloc(64, bytes ? bytes : 64));
      cap = n;
    }
    return p;
  }
  ~Buf() { std::free(p); }
};

/* One element network: n_lin linear layers, widths d[0..n_lin] (d[n_lin] = 1), hidden activations act[j]
   (1 tanh, 0 identity) for j < n_lin - 1, row offsets wo[l], bo[l] of W_l and b_l (-1: not in the row). */
struct Net {
  int64_t n_lin;
  const int64_t* d;
  const int64_t* act;
  const int64_t* wo;
  const int64_t* bo;
};

inline Net net_of(const int64_t* desc) {
  Net n;
  n.n_lin = desc[0];
  n.d = desc + 1;
  n.act = n.d + n.n_lin + 1;
  n.wo = n.act + (n.n_lin - 1);
  n.bo = n.wo + n.n_lin;
  return n;
}

/* Padded copies of one element's weights and the forward state of its atoms, all in vectors of VT<T>::L:
   layer l has nv[l] = ceil(d_l / L) vectors; hidden layer j is layer j + 1. Per atom a block of
   nvh = sum_{l=0}^{n_lin-1} nv[l] vectors for each of h (h_0 = x), d1 = sigma', r2 = sigma''/sigma', delta. */
template <typename T>
struct Element {
  typedef typename VT<T>::v V;
  int64_t n_lin = 0, nvh = 0;
  int64_t nv[MAXLIN + 1], off[MAXLIN + 1];  // per layer l <= n_lin: vectors, offset (in vectors) in an atom's block
  Buf<V> wt, wp, bias, h, d1, r2, delta;
  int64_t wt_at[MAXLIN], wp_at[MAXLIN], b_at[MAXLIN];
  std::vector<int64_t> atoms;
};

template <typename T>
bool prepare(const Net& net, const T* const* W, const T* const* B, Element<T>& el) {
  typedef typename VT<T>::v V;
  const int L = VT<T>::L;
  if (net.n_lin < 1 || net.n_lin > MAXLIN) return false;
  el.n_lin = net.n_lin;
  int64_t acc = 0;
  for (int64_t l = 0; l <= net.n_lin; ++l) {
    el.nv[l] = nvec(net.d[l], L);
    if (el.nv[l] > MAXV) return false;
    el.off[l] = acc;
    if (l < net.n_lin) acc += el.nv[l];
  }
  el.nvh = acc;
  int64_t nt = 0, np = 0, nb = 0;
  for (int64_t l = 0; l < net.n_lin; ++l) {
    el.wt_at[l] = nt; nt += net.d[l] * el.nv[l + 1];  // W^T: d_l rows of nv[l+1] vectors
    el.wp_at[l] = np; np += net.d[l + 1] * el.nv[l];  // W: d_{l+1} rows of nv[l] vectors
    el.b_at[l] = nb; nb += el.nv[l + 1];
  }
  V* wt = el.wt.get(nt);
  V* wp = el.wp.get(np);
  V* bs = el.bias.get(nb);
  std::memset(static_cast<void*>(wt), 0, nt * sizeof(V));
  std::memset(static_cast<void*>(wp), 0, np * sizeof(V));
  std::memset(static_cast<void*>(bs), 0, nb * sizeof(V));
  for (int64_t l = 0; l < net.n_lin; ++l) {
    const int64_t din = net.d[l], dout = net.d[l + 1];
    T* t = reinterpret_cast<T*>(wt + el.wt_at[l]);
    T* p = reinterpret_cast<T*>(wp + el.wp_at[l]);
    const int64_t pin = el.nv[l] * L, pout = el.nv[l + 1] * L;
    for (int64_t o = 0; o < dout; ++o)
      for (int64_t i = 0; i < din; ++i) {
        t[i * pout + o] = W[l][o * din + i];
        p[o * pin + i] = W[l][o * din + i];
      }
    T* b = reinterpret_cast<T*>(bs + el.b_at[l]);
    for (int64_t o = 0; o < dout; ++o) b[o] = B[l][o];
  }
  return true;
}

// out (nout vectors) = base + sum_i in[i] * M[i, :] for M of din rows of nout vectors; NV > 0: nout == NV (the
// accumulators stay in registers)
template <typename T, int NV>
inline void matvec_n(typename VT<T>::v* __restrict__ out, const typename VT<T>::v* base, const T* in, int64_t din,
                     const typename VT<T>::v* __restrict__ M) {
  typedef typename VT<T>::v V;
  V acc[NV];
#pragma GCC unroll 4
  for (int q = 0; q < NV; ++q) acc[q] = base ? base[q] : V{};
  for (int64_t i = 0; i < din; ++i) {
    const T s = in[i];
    const V* m = M + i * NV;
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) acc[q] += s * m[q];
  }
#pragma GCC unroll 4
  for (int q = 0; q < NV; ++q) out[q] = acc[q];
}

template <typename T>
inline void matvec(typename VT<T>::v* __restrict__ out, const typename VT<T>::v* base, const T* in, int64_t din,
                   const typename VT<T>::v* __restrict__ M, int64_t nout) {
  switch (nout) {
    case 1: return matvec_n<T, 1>(out, base, in, din, M);
    case 2: return matvec_n<T, 2>(out, base, in, din, M);
    case 3: return matvec_n<T, 3>(out, base, in, din, M);
    case 4: return matvec_n<T, 4>(out, base, in, din, M);
    default: break;
  }
  typedef typename VT<T>::v V;
  V acc[MAXV];
  for (int64_t q = 0; q < nout; ++q) acc[q] = base ? base[q] : V{};
  for (int64_t i = 0; i < din; ++i) {
    const T s = in[i];
    if (s == T(0)) continue;
    const V* m = M + i * nout;
    for (int64_t q = 0; q < nout; ++q) acc[q] += s * m[q];
  }
  for (int64_t q = 0; q < nout; ++q) out[q] = acc[q];
}

/* One atom's forward pass from its features src (d_0): h (h_0 = src zero padded), d1 = sigma', r2 = sigma''/sigma'
   of every hidden layer, and the energy's backward delta_top = w_out o sigma', delta_{j-1} = (W_j^T delta_j) o
   sigma'(z_{j-1}); each a block of nvh vectors at the layer offsets el.off. */
template <typename T>
inline void forward_atom(const Net& net, const Element<T>& el, const T* src, typename VT<T>::v* h,
                         typename VT<T>::v* d1, typename VT<T>::v* r2, typename VT<T>::v* dl) {
  typedef typename VT<T>::v V;
  const int L = VT<T>::L;
  const int64_t nh = net.n_lin - 1;
  T* x = reinterpret_cast<T*>(h);
  std::memset(static_cast<void*>(h), 0, el.nv[0] * sizeof(V));
  for (int64_t i = 0; i < net.d[0]; ++i) x[i] = src[i];
  for (int64_t j = 0; j < nh; ++j) {  // hidden layer j = layer j + 1
    const int64_t l = j + 1, nout = el.nv[l];
    V* z = h + el.off[l];
    matvec<T>(z, el.bias.p + el.b_at[j], reinterpret_cast<const T*>(h + el.off[j]), net.d[j], el.wt.p + el.wt_at[j],
              nout);
    if (net.act[j]) {
      for (int64_t q = 0; q < nout; ++q) {
        const V t = tanhv<T>(z[q]);
        z[q] = t; d1[el.off[l] + q] = T(1) - t * t; r2[el.off[l] + q] = T(-2) * t;
      }
    } else {
      for (int64_t q = 0; q < nout; ++q) { d1[el.off[l] + q] = V{} + T(1); r2[el.off[l] + q] = V{}; }
    }
    // padding lanes: tanh(0) = 0, d1 = 1 there; zero d1 so tangents stay zero in the padding
    T* d1s = reinterpret_cast<T*>(d1 + el.off[l]);
    for (int64_t o = net.d[l]; o < nout * L; ++o) d1s[o] = T(0);
  }
  if (nh) {
    const int64_t top = nh;  // layer index of the last hidden layer
    const V* w = el.wp.p + el.wp_at[net.n_lin - 1];  // W_out: one row of nv[top] vectors
    for (int64_t q = 0; q < el.nv[top]; ++q) dl[el.off[top] + q] = w[q] * d1[el.off[top] + q];
    for (int64_t l = top; l > 1; --l) {  // layer l = hidden j = l - 1 feeds from layer l - 1 by W_{l-1}
      matvec<T>(dl + el.off[l - 1], nullptr, reinterpret_cast<const T*>(dl + el.off[l]), net.d[l],
                el.wp.p + el.wp_at[l - 1], el.nv[l - 1]);
      for (int64_t q = 0; q < el.nv[l - 1]; ++q) dl[el.off[l - 1] + q] *= d1[el.off[l - 1] + q];
    }
  }
}

/* The forward state of every atom of the element, atom-major (the force labels revisit each atom per label). */
template <typename T>
void forward(const Net& net, const T* s, int64_t lds, const int64_t* atoms, int64_t na, Element<T>& el) {
  typedef typename VT<T>::v V;
  const int64_t nvh = el.nvh;
  V* H = el.h.get(na * nvh);
  V* D1 = el.d1.get(na * nvh);
  V* R2 = el.r2.get(na * nvh);
  V* DL = el.delta.get(na * nvh);
  el.atoms.assign(atoms, atoms + na);
  for (int64_t a = 0; a < na; ++a)
    forward_atom<T>(net, el, s + atoms[a] * lds, H + a * nvh, D1 + a * nvh, R2 + a * nvh, DL + a * nvh);
}

// G (dout rows of nin vectors) += p[o] * x + q[o] * y  (q may be null); NIN > 0: nin == NIN
template <typename T, int NIN>
inline void outer2_n(typename VT<T>::v* __restrict__ G, const T* p, const typename VT<T>::v* x, const T* q,
                     const typename VT<T>::v* y, int64_t dout) {
  typedef typename VT<T>::v V;
  V xs[NIN], ys[NIN];
#pragma GCC unroll 4
  for (int i = 0; i < NIN; ++i) { xs[i] = x[i]; ys[i] = q ? y[i] : V{}; }
  if (q) {
    for (int64_t o = 0; o < dout; ++o) {
      V* g = G + o * NIN;
      const T a = p[o], b = q[o];
#pragma GCC unroll 4
      for (int i = 0; i < NIN; ++i) g[i] += a * xs[i] + b * ys[i];
    }
  } else {
    for (int64_t o = 0; o < dout; ++o) {
      V* g = G + o * NIN;
      const T a = p[o];
#pragma GCC unroll 4
      for (int i = 0; i < NIN; ++i) g[i] += a * xs[i];
    }
  }
}

template <typename T>
inline void outer2(typename VT<T>::v* __restrict__ G, const T* p, const typename VT<T>::v* x, const T* q,
                   const typename VT<T>::v* y, int64_t dout, int64_t nin) {
  switch (nin) {
    case 1: return outer2_n<T, 1>(G, p, x, q, y, dout);
    case 2: return outer2_n<T, 2>(G, p, x, q, y, dout);
    case 3: return outer2_n<T, 3>(G, p, x, q, y, dout);
    case 4: return outer2_n<T, 4>(G, p, x, q, y, dout);
    default: break;
  }
  typedef typename VT<T>::v V;
  V xs[MAXV], ys[MAXV];
  for (int64_t i = 0; i < nin; ++i) { xs[i] = x[i]; if (q) ys[i] = y[i]; }
  for (int64_t o = 0; o < dout; ++o) {
    V* g = G + o * nin;
    const T a = p[o];
    if (q) {
      const T b = q[o];
      for (int64_t i = 0; i < nin; ++i) g[i] += a * xs[i] + b * ys[i];
    } else {
      for (int64_t i = 0; i < nin; ++i) g[i] += a * xs[i];
    }
  }
}

/* Gradient scratch of one label: per layer l, W_l as d_{l+1} rows of nv[l] vectors and b_l as nv[l+1] vectors. */
template <typename T>
struct Grad {
  typedef typename VT<T>::v V;
  Buf<V> buf;
  int64_t w_at[MAXLIN], b_at[MAXLIN], total = 0;
  void shape(const Net& net, const Element<T>& el) {
    total = 0;
    for (int64_t l = 0; l < net.n_lin; ++l) {
      w_at[l] = total; total += net.d[l + 1] * el.nv[l];
      b_at[l] = total; total += el.nv[l + 1];
    }
    buf.get(total);
  }
  void zero() { std::memset(static_cast<void*>(buf.p), 0, total * sizeof(V)); }
  // row[wo, bo] += factor * (unpadded parts); a block entry never summed into adds factor * 0, leaving the row's 0
  void flush(const Net& net, const Element<T>& el, T factor, T* row) const {
    const int L = VT<T>::L;
    for (int64_t l = 0; l < net.n_lin; ++l) {
      const int64_t din = net.d[l], dout = net.d[l + 1], pin = el.nv[l] * L;
      if (net.wo[l] >= 0) {
        const T* g = reinterpret_cast<const T*>(buf.p + w_at[l]);
        T* r = row + net.wo[l];
        for (int64_t o = 0; o < dout; ++o)
          for (int64_t i = 0; i < din; ++i) r[o * din + i] += factor * g[o * pin + i];
      }
      if (net.bo[l] >= 0) {
        const T* g = reinterpret_cast<const T*>(buf.p + b_at[l]);
        T* r = row + net.bo[l];
        for (int64_t o = 0; o < dout; ++o) r[o] += factor * g[o];
      }
    }
  }
};

/* Energy and its row: per atom the forward pass into one scratch block (hot in L1; nothing stored per atom),
   then its sums: W_out += h_top, W_{l-1} += delta_l h_{l-1}^T, b_{l-1} += delta_l; the row is scaled once. */
template <typename T>
void energy_part(const Net& net, Element<T>& el, Grad<T>& gr, const T* s, int64_t lds, const int64_t* atoms,
                 int64_t na, T scale, T* energy, T* row) {
  typedef typename VT<T>::v V;
  const int64_t nh = net.n_lin - 1, nvh = el.nvh;
  const int64_t last = net.n_lin - 1, top = nh;  // output layer, its input layer
  const V* wout = el.wp.p + el.wp_at[last];
  const T bout = reinterpret_cast<const T*>(el.bias.p + el.b_at[last])[0];
  V* h = el.h.get(4 * nvh);
  V* d1 = h + nvh;
  V* r2 = d1 + nvh;
  V* dl = r2 + nvh;
  gr.zero();
  V esum{};
  for (int64_t a = 0; a < na; ++a) {
    forward_atom<T>(net, el, s + atoms[a] * lds, h, d1, r2, dl);
    const V* hl = h + el.off[top];
    V* gw = gr.buf.p + gr.w_at[last];
    for (int64_t q = 0; q < el.nv[top]; ++q) { esum += wout[q] * hl[q]; gw[q] += hl[q]; }
    for (int64_t l = 1; l <= nh; ++l) {  // hidden layer l: W_{l-1} (d_l rows of nv[l-1]) += delta_l h_{l-1}
      outer2<T>(gr.buf.p + gr.w_at[l - 1], reinterpret_cast<const T*>(dl + el.off[l]), h + el.off[l - 1], nullptr,
                nullptr, net.d[l], el.nv[l - 1]);
      V* gb = gr.buf.p + gr.b_at[l - 1];
      for (int64_t q = 0; q < el.nv[l]; ++q) gb[q] += dl[el.off[l] + q];
    }
  }
  T e = T(0);
  for (int i = 0; i < VT<T>::L; ++i) e += esum[i];
  *energy += scale * (e + T(na) * bout);
  reinterpret_cast<T*>(gr.buf.p + gr.b_at[last])[0] = T(na);
  gr.flush(net, el, scale, row);
}

template <typename T>
void force_part(const Net& net, Element<T>& el, Grad<T>& gr, T scale, const T* cols, int64_t n_labels,
                int64_t n_atoms, int64_t ldc, const int64_t* cslot, const T* cfac, T* force, T* rows, int64_t ldr) {
  typedef typename VT<T>::v V;
  const int L = VT<T>::L;
  const int64_t nh = net.n_lin - 1, na = static_cast<int64_t>(el.atoms.size()), nvh = el.nvh;
  const int64_t last = net.n_lin - 1, top = nh, d0 = net.d[0];
  const V* wout = el.wp.p + el.wp_at[last];
  V t[MAXLIN * MAXV], dz[MAXLIN * MAXV], zbar[MAXV], hbar[MAXV];  // per layer (offsets el.off): tangents t_l, W t_{l-1}
  const bool with_rows = rows != nullptr;  // else the values alone: the tangents' forward sweep, no gradient
  for (int64_t k = 0; k < n_labels; ++k) {
    if (with_rows) gr.zero();
    V fsum{};
    bool touched = false;
    for (int64_t a = 0; a < na; ++a) {
      const T* c = cols + (k * n_atoms + el.atoms[a]) * ldc;
      std::memset(static_cast<void*>(t), 0, el.nv[0] * sizeof(V));
      T* t0 = reinterpret_cast<T*>(t);
      bool any = false;
      if (cslot) {  // a column table: feature i is slot cslot[i] times cfac[i]
        for (int64_t i = 0; i < d0; ++i) { t0[i] = c[cslot[i]] * cfac[i]; any |= (t0[i] != T(0)); }
      } else {
        for (int64_t i = 0; i < d0; ++i) { t0[i] = c[i]; any |= (c[i] != T(0)); }
      }
      if (!any) continue;  // outside a_k's cutoff sphere: no contribution
      touched = true;
      const V* h = el.h.p + a * nvh;
      const V* d1 = el.d1.p + a * nvh;
      const V* r2 = el.r2.p + a * nvh;
      const V* dl = el.delta.p + a * nvh;
      for (int64_t l = 1; l <= nh; ++l) {  // dz_l = W_{l-1} t_{l-1}, t_l = sigma' o dz_l
        matvec<T>(dz + el.off[l], nullptr, reinterpret_cast<const T*>(t + el.off[l - 1]), net.d[l - 1],
                  el.wt.p + el.wt_at[l - 1], el.nv[l]);
        for (int64_t q = 0; q < el.nv[l]; ++q) t[el.off[l] + q] = d1[el.off[l] + q] * dz[el.off[l] + q];
      }
      const V* tl = t + el.off[top];
      if (!with_rows) {
        for (int64_t q = 0; q < el.nv[top]; ++q) fsum += wout[q] * tl[q];
        continue;
      }
      V* gw = gr.buf.p + gr.w_at[last];
      for (int64_t q = 0; q < el.nv[top]; ++q) { fsum += wout[q] * tl[q]; gw[q] += tl[q]; }
      for (int64_t l = nh; l >= 1; --l) {  // reverse sweep over hidden layer l (weights W_{l-1})
        const int64_t nvl = el.nv[l], o = el.off[l];
        for (int64_t q = 0; q < nvl; ++q) {
          V zb = dl[o + q] * dz[o + q] * r2[o + q];
          if (l < nh) zb += hbar[q] * d1[o + q];
          zbar[q] = zb;
        }
        outer2<T>(gr.buf.p + gr.w_at[l - 1], reinterpret_cast<const T*>(dl + o), t + el.off[l - 1],
                  reinterpret_cast<const T*>(zbar), h + el.off[l - 1], net.d[l], el.nv[l - 1]);
        V* gb = gr.buf.p + gr.b_at[l - 1];
        for (int64_t q = 0; q < nvl; ++q) gb[q] += zbar[q];
        if (l > 1)  // hbar_{l-1} = W_{l-1}^T zbar_l
          matvec<T>(hbar, nullptr, reinterpret_cast<const T*>(zbar), net.d[l], el.wp.p + el.wp_at[l - 1],
                    el.nv[l - 1]);
      }
    }
    if (!touched) continue;
    T f = T(0);
    for (int i = 0; i < L; ++i) f += fsum[i];
    force[k] -= scale * f;
    if (with_rows) gr.flush(net, el, -scale, rows + k * ldr);
  }
}

/* The force components alone (a threshold selection's candidates), by reverse mode: per atom the energy's input
   gradient g_a = dE/dx_a = W_0^T delta_1 once (its forward state from forward()), times the column table's factors,
   then F_k -= scale sum_a g_a . c_{k,a}: one backward per atom instead of one tangent per (label, atom) as
   force_part's values (the same components to round-off; 30 candidates on 192-atom water, float32, one core:
   see the module docstring). */
template <typename T>
void force_values_part(const Net& net, Element<T>& el, T scale, const T* cols, int64_t n_labels, int64_t n_atoms,
                       int64_t ldc, const int64_t* cslot, const T* cfac, T* force) {
  typedef typename VT<T>::v V;
  static thread_local Buf<T> gbuf;
  const int64_t nh = net.n_lin - 1, na = static_cast<int64_t>(el.atoms.size()), nvh = el.nvh, d0 = net.d[0];
  const int64_t w = cslot ? ldc : d0;  // g_a in the columns' own layout: a table's slots, or the features
  T* gw = gbuf.get(static_cast<size_t>(na * w));  // (na, w)
  std::memset(static_cast<void*>(gw), 0, static_cast<size_t>(na * w) * sizeof(T));
  V g[MAXV];
  for (int64_t a = 0; a < na; ++a) {
    if (nh)  // g = W_0^T delta_1, delta_1 = dE/dz_1 of the first hidden layer
      matvec<T>(g, nullptr, reinterpret_cast<const T*>(el.delta.p + a * nvh + el.off[1]), net.d[1],
                el.wp.p + el.wp_at[0], el.nv[0]);
    else  // no hidden layer: E = w_out . x + b
      for (int64_t q = 0; q < el.nv[0]; ++q) g[q] = el.wp.p[el.wp_at[0] + q];
    const T* gs = reinterpret_cast<const T*>(g);
    T* ga = gw + a * w;
    if (cslot) {  // feature i is slot cslot[i] times cfac[i] of a table row: g summed into slot space
      for (int64_t i = 0; i < d0; ++i) ga[cslot[i]] += gs[i] * cfac[i];
    } else {
      for (int64_t i = 0; i < d0; ++i) ga[i] = gs[i];
    }
  }
  for (int64_t k = 0; k < n_labels; ++k) {
    T f = T(0);
    for (int64_t a = 0; a < na; ++a) {
      const T* c = cols + (k * n_atoms + el.atoms[a]) * ldc;
      const T* ga = gw + a * w;
      T dot = T(0);
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < w; ++i) dot += ga[i] * c[i];
      f += dot;
    }
    force[k] -= scale * f;
  }
}

template <typename T>
void rows_all(int64_t mode, int64_t E, const int64_t* species, int64_t N, const T* s, int64_t lds, const int64_t* desc,
              const int64_t* desc_at, const int64_t* ptrs, const int64_t* ptr_at, const int64_t* use, T scale,
              const T* atom_energy, int64_t with_atom_energy, const T* cols, int64_t n_labels, int64_t ldc,
              const int64_t* cslot, const T* cfac, int64_t ldf, T* out_value, T* rows, int64_t ldr, int64_t* status) {
  static thread_local Element<T> el;
  static thread_local Grad<T> gr;
  std::vector<int64_t> atoms;
  atoms.reserve(N);
  std::vector<const T*> W, B;
  *status = 0;
  for (int64_t e = 0; e < E; ++e) {
    atoms.clear();
    for (int64_t i = 0; i < N; ++i)
      if (species[i] == e) atoms.push_back(i);
    // the atom energies of every element (one share has them), the networks of the elements in use
    if (mode == 0 && with_atom_energy) *out_value += atom_energy[e] * T(atoms.size());
    if (!use[e] || atoms.empty()) continue;
    const Net net = net_of(desc + desc_at[e]);
    W.resize(net.n_lin); B.resize(net.n_lin);
    for (int64_t l = 0; l < net.n_lin; ++l) {
      W[l] = reinterpret_cast<const T*>(ptrs[ptr_at[e] + 2 * l]);
      B[l] = reinterpret_cast<const T*>(ptrs[ptr_at[e] + 2 * l + 1]);
    }
    if (!prepare<T>(net, W.data(), B.data(), el)) { *status = 1; return; }
    gr.shape(net, el);
    const int64_t na = static_cast<int64_t>(atoms.size());
    if (mode == 0) {
      energy_part<T>(net, el, gr, s, lds, atoms.data(), na, scale, out_value, rows);
    } else {  // 1: force components and rows; 2: the components alone
      forward<T>(net, s, lds, atoms.data(), na, el);
      if (mode == 2)
        force_values_part<T>(net, el, scale, cols, n_labels, N, ldc, cslot ? cslot + e * ldf : nullptr,
                             cfac ? cfac + e * ldf : nullptr, out_value);
      else
        force_part<T>(net, el, gr, scale, cols, n_labels, N, ldc, cslot ? cslot + e * ldf : nullptr,
                      cfac ? cfac + e * ldf : nullptr, out_value, rows, ldr);
    }
  }
}
}  // namespace

#define ROWS_ALL(NAME, T)                                                                                      \
  extern "C" void NAME(int64_t mode, int64_t E, const int64_t* species, int64_t N, const T* s, int64_t lds,         \
                       const int64_t* desc, const int64_t* desc_at, const int64_t* ptrs, const int64_t* ptr_at,      \
                       const int64_t* use, double scale, const T* atom_energy, int64_t with_atom_energy,             \
                       const T* cols, int64_t n_labels, int64_t ldc, const int64_t* cslot, const T* cfac,            \
                       int64_t ldf, T* out_value, T* rows, int64_t ldr, int64_t* status) {                           \
    rows_all<T>(mode, E, species, N, s, lds, desc, desc_at, ptrs, ptr_at, use, static_cast<T>(scale), atom_energy,   \
                with_atom_energy, cols, n_labels, ldc, cslot, cfac, ldf, out_value, rows, ldr, status);              \
  }
ROWS_ALL(network_rows_f64, double)
ROWS_ALL(network_rows_f32, float)
"""

_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared")


_MODULE: List = []  # the loaded library once found (the per-update lookup is then a list index)


def rows_module():
    """The compiled library (:func:`ekf_plugin.native.native_library`; about a second on first use, then cached on
    disk), or None where it cannot be built (a warning, once) or ``EKF_PLUGIN_NATIVE_ROWS=0``."""
    if _MODULE:
        return _MODULE[0]
    if not NATIVE_ROWS:
        return None
    from ekf_plugin.native import optional_library

    lib = optional_library(_SOURCE, _FLAGS, "bpnn_network_rows", "native network-row kernel")
    if lib is None:
        return None
    for fn in (lib.network_rows_f64, lib.network_rows_f32):  # typed: plain ints and addresses pass as they are
        fn.restype = None
        fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    _MODULE.append(lib)
    return lib


class NetworkLayout:
    """The integer side of the kernel's arguments for fixed networks and row order: per element its layer widths,
    activations and the row offsets of each W_l and b_l (−1 where a parameter is not in the row).

    Args:
        stacks: per element (linears, whether each hidden activation is tanh).
        slots: per element, per layer (row offset of W or None, row offset of b or None).
    """

    def __init__(self, stacks: Sequence[Tuple[Sequence[torch.nn.Linear], Sequence[bool]]],
                 slots: Sequence[Sequence[Tuple[Optional[int], Optional[int]]]]) -> None:
        desc, desc_at, ptr_at = [], [], []
        self.linears: List[torch.nn.Linear] = []
        for (linears, tanh), layer_slots in zip(stacks, slots):
            desc_at.append(len(desc))
            ptr_at.append(2 * len(self.linears))
            widths = [linears[0].in_features] + [m.out_features for m in linears]
            desc += [len(linears), *widths, *[int(t) for t in tanh]]
            desc += [-1 if w is None else int(w) for w, _ in layer_slots]
            desc += [-1 if b is None else int(b) for _, b in layer_slots]
            self.linears.extend(linears)
        offsets = [o for layer_slots in slots for pair in layer_slots for o in pair if o is not None]
        self.disjoint = len(set(offsets)) == len(offsets)  # no parameter twice (the kernel scales its slices once)
        self.desc = torch.tensor(desc, dtype=torch.int64)  # (D,)
        self.desc_at = torch.tensor(desc_at, dtype=torch.int64)  # (E,)
        self.ptr_at = torch.tensor(ptr_at, dtype=torch.int64)  # (E,)
        self.n_elements = len(desc_at)
        self.tensors = [t for m in self.linears for t in (m.weight, m.bias)]  # W_0, b_0, W_1, … (no Module lookups)
        if any(t is None for t in self.tensors):
            raise ValueError("native rows need every Linear with a bias")
        self._pointers: Optional[Tuple[tuple, Optional[torch.Tensor]]] = None
        self._use: dict = {}
        self._atom_energy: Optional[Tuple[tuple, torch.Tensor]] = None
        self._status = ctypes.c_int64(0)  # the kernel's flag: 1 where a network is too wide or deep for it
        self._addresses = (self.desc.data_ptr(), self.desc_at.data_ptr(), self.ptr_at.data_ptr())

    def pointers(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """(2 · layers,) addresses of W_l, b_l of every element, or None where one is not a contiguous CPU tensor
        of ``dtype`` (then the torch path). Cached while the addresses stay the same (in-place updates)."""
        key = (dtype, *[p.data_ptr() for p in self.tensors])
        if self._pointers is not None and self._pointers[0] == key:
            return self._pointers[1]
        ok = all(p.dtype == dtype and p.device.type == "cpu" and p.is_contiguous() for p in self.tensors)
        got = torch.tensor(key[1:], dtype=torch.int64) if ok else None
        self._pointers = (key, got)
        return got

    def atom_energies(self, atom_energy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``atom_energy`` (E,) in ``dtype``, contiguous; the copy kept while the buffer is unchanged."""
        key = (atom_energy.data_ptr(), atom_energy._version, dtype)
        if self._atom_energy is None or self._atom_energy[0] != key:
            self._atom_energy = (key, atom_energy.to(dtype).contiguous())
        return self._atom_energy[1]

    def use(self, share: Tuple[int, int]) -> torch.Tensor:
        """(E,) int64 flags of the elements e with e % W == r for ``share`` = (r, W)."""
        got = self._use.get(share)
        if got is None:
            r, world = share
            got = self._use[share] = torch.tensor([int(e % world == r) for e in range(self.n_elements)],
                                                  dtype=torch.int64)
        return got


def _call(module, layout: NetworkLayout, mode: int, s: torch.Tensor, species: torch.Tensor, share: Tuple[int, int],
          scale: float, atom_energy: Optional[torch.Tensor], cols=None, n: int = 0
          ) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """mode 0: energy and row; 1: force components and rows; 2: force components alone (rows None)."""
    dtype = s.dtype
    if dtype not in (torch.float32, torch.float64) or s.device.type != "cpu" or not layout.disjoint:
        return None
    ptrs = layout.pointers(dtype)
    if ptrs is None:
        return None
    s = s.contiguous()
    species = species.to(torch.int64).contiguous()
    ae = None if atom_energy is None else layout.atom_energies(atom_energy, dtype)
    table = slot = factor = None
    if cols is None:
        k = 1
    elif isinstance(cols, ColumnTable):  # the kernel gathers the features' slots itself
        cols = cols.to(dtype)
        if cols.slot.shape[0] != layout.n_elements:
            return None
        table, slot, factor = cols.table.contiguous(), cols.slot.contiguous(), cols.factor.contiguous()
        k = table.shape[0]
    else:
        table = cols.to(dtype).contiguous()
        k = table.shape[0]
    value = s.new_zeros(k)  # (k,)
    rows = s.new_zeros(k, n) if mode != 2 else None  # (k, n); mode 2: the values alone
    status = layout._status
    desc, desc_at, ptr_at = layout._addresses
    fn = module.network_rows_f64 if dtype == torch.float64 else module.network_rows_f32
    fn(mode, layout.n_elements, species.data_ptr(), s.shape[0], s.data_ptr(), s.shape[1], desc, desc_at,
       ptrs.data_ptr(), ptr_at, layout.use(share).data_ptr(), float(scale), None if ae is None else ae.data_ptr(),
       int(ae is not None), None if table is None else table.data_ptr(), k, 0 if table is None else table.shape[2],
       None if slot is None else slot.data_ptr(), None if factor is None else factor.data_ptr(),
       0 if slot is None else slot.shape[1], value.data_ptr(), None if rows is None else rows.data_ptr(), n,
       ctypes.byref(status))
    return None if status.value else (value, rows)


def energy_rows(module, layout: NetworkLayout, s: torch.Tensor, species: torch.Tensor, share: Tuple[int, int],
                scale: float, atom_energy: Optional[torch.Tensor], n: int
                ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Energy (1,) in eV and its row (1, n) of one structure with scaled features s (N, W), species (N,), over the
    element networks e with e % W == r for ``share`` = (r, W), plus ``atom_energy`` (E,) eV per atom unless None;
    None where the kernel does not apply (then the torch path)."""
    return _call(module, layout, 0, s, species, share, scale, atom_energy, None, n)


def force_rows(module, layout: NetworkLayout, s: torch.Tensor, species: torch.Tensor, columns, scale: float,
               n: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Force components (k,) in eV/Å and their rows (k, n) for columns (k, N, W) = ∂s/∂r per Å, a tensor or a
    :class:`~ekf_plugin.bpnn.feature_derivatives.ColumnTable` whose elements are the networks' (read without
    the gather); None where the kernel does not apply."""
    return _call(module, layout, 1, s, species, (0, 1), scale, None, columns, n)


def force_values(module, layout: NetworkLayout, s: torch.Tensor, species: torch.Tensor, columns, scale: float
                 ) -> Optional[torch.Tensor]:
    """The force components (k,) of :func:`force_rows` alone, by reverse mode (each atom's energy gradient dotted
    with its columns, no rows): :func:`force_rows`' values for the same columns to round-off; None where the kernel
    does not apply. E.g. a threshold selection's candidates, whose rows are not needed."""
    got = _call(module, layout, 2, s, species, (0, 1), scale, None, columns, 0)
    return None if got is None else got[0]
