"""The MD step of a BPNN potential: energy, forces and virial with one analytic backward pass.

:class:`BPNNStep` evaluates a SchNetPack ``NeuralNetworkPotential`` built from
:class:`~ekf_plugin.bpnn.BehlerParrinello` and :class:`~ekf_plugin.bpnn.ElementNetworks` (our
``water_bpnn``/``bpnn_model`` models, ``spktrain`` ``best_model`` files and loaded n2p2 potentials)
on one structure, with the same physics as the model's own forward pass but none of its autograd
graph through the symmetry functions. :class:`ekf_plugin.evaluation.ModelEvaluator` (and so the
i-PI client, the i-PI PES and ``ekf_plugin.calculator``) uses it automatically for such models
(:func:`supports`).

How one call works (P pairs in the Verlet list, T candidate triples, N atoms):

1. **Verlet list** (:class:`VerletList`): pairs within r_c + skin with integer lattice shifts, from
   matscipy (CPU) or the brute-force torch list (GPU), rebuilt only when the displacements or the
   cell deformation could have brought a pair or triple from outside r_c + skin to inside r_c
   (criterion in :meth:`VerletList.needs_rebuild`; in 192-atom water at 0.5 fs steps the 0.5 Å skin
   lasts ~7–10 steps, and a rebuild costs about two steps). With the
   list, every candidate triple (i; j, k) of an element triplet that carries functions is stored as
   three pair indices p1 = i→j, p2 = i→k and **p3 = j→k**.
2. **Pair terms, once per pair**: r (P,), unit vectors (P, 3), f_c and f_c' (P,), the radial terms
   of every (η, r_s) its element pair uses, and for every distinct angular (η, r_s)
   h = exp(−η (r − r_s)²) f_c(r) and its r-derivative (P, K). Pairs beyond r_c have f_c = 0.
3. **Triples reuse them**: the narrow G3 factorises, exp(−η Σ (r − r_s)²) f_c f_c f_c = h(p1) h(p2)
   h(p3), so a triple's term is a product of three gathered pair factors and (1 + λ cos θ)^ζ
   (integer ζ by repeated multiplication), cos θ = u(p1)·u(p2). Candidates with a side beyond r_c
   contribute exactly 0 (a factor f_c = 0), so no per-step filtering is needed.
4. **Networks**: s = G·w + b → atomic energies; ∂E/∂G by autograd through the small element networks.
5. **One backward**: ∂E/∂G is contracted with hand-written dG/dr into **pair gradients**
   g_p = ∂E/∂r_p (P, 3): radial terms give (∂E/∂r) u_p; a triple gives derivatives along its three
   sides and cos θ terms along the other side's unit vector, and its r_jk = r_ik − r_ij part is handed
   on to r_ij (−) and r_ik (+), so only pairs of the centre are written.
6. **Forces and virial from pair gradients**: F_i = Σ_{p: i→·} g_p − Σ_{p: ·→i} g_p and
   ∂E/∂ε = Σ_p g_p ⊗ r_p, so stress = Σ_p g_p ⊗ r_p / V (SchNetPack's convention) and the virial
   W = −V·stress, without a strain graph.

Precision: ``dtype=torch.float64`` computes everything in float64. ``torch.float32`` computes pair and
triple terms and the networks in float32 but sums the symmetry functions, pair gradients, forces,
energy and virial in float64 (pair vectors are formed from float64 positions).
``compile=True`` (the default on CPU through :class:`~ekf_plugin.evaluation.ModelEvaluator` when a C++
compiler is found) runs the two per-triple kernels as C++ loops generated for the model's function set
and built once per machine in about a second (:func:`native_library`; same operations in the same
order, triples with a side beyond r_c skipped); ``compile="torch"`` fuses the torch kernels with
``torch.compile`` instead (slower, a one-off compile of 12 s to minutes), ``False`` runs them eagerly.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

ACC = torch.float64  # accumulation dtype of sums (features, pair gradients, forces, energy, virial)


def supports(model: torch.nn.Module) -> bool:
    """True if ``model`` is a plain BPNN potential this module evaluates exactly.

    That is a ``NeuralNetworkPotential``-like module with a :class:`BehlerParrinello`
    representation, input modules only ``Strain``/``PairwiseDistances``, output modules one
    :class:`ElementNetworks` plus ``Forces`` modules, and no postprocessors.
    """
    from ekf_plugin.bpnn.networks import ElementNetworks
    from ekf_plugin.bpnn.representation import BehlerParrinello

    try:
        import schnetpack as spk
    except ImportError:  # pragma: no cover - schnetpack is a dependency
        return False
    rep = getattr(model, "representation", None)
    if not isinstance(rep, BehlerParrinello):
        return False
    outs = list(getattr(model, "output_modules", []))
    nets = [m for m in outs if isinstance(m, ElementNetworks)]
    others = [m for m in outs if not isinstance(m, (ElementNetworks, spk.atomistic.Forces))]
    inputs_ok = all(isinstance(m, (spk.atomistic.Strain, spk.atomistic.PairwiseDistances))
                    for m in getattr(model, "input_modules", []))
    post = getattr(model, "postprocessors", [])
    if len(nets) != 1 or others or not inputs_ok or (len(post) and getattr(model, "do_postprocessing", True)):
        return False
    forces = [m for m in outs if isinstance(m, spk.atomistic.Forces)]
    return all(f.energy_key == nets[0].output_key for f in forces)


# ----------------------------------------------------------------------------- Verlet list


class VerletList:
    """Pairs within ``cutoff + skin`` (integer lattice shifts), reused while provably complete.

    Args:
        cutoff: r_c in Å (the model's).
        skin: extra radius in Å (default 0.5).
        method: ``"matscipy"``, ``"ase"`` or ``"torch"`` (see :func:`ekf_plugin.evaluation.neighbor_pairs`).
        device: where the torch list runs (GPU builds) and where the pair tensors live.

    After :meth:`build`: ``idx_i``, ``idx_j`` (P,) long and ``shifts`` (P, 3) float64 tensors on
    ``device`` with r_p = R[idx_j] − R[idx_i] + shifts @ cell for the *given* (unwrapped) positions.
    """

    def __init__(self, cutoff: float, skin: float = 0.5, method: str = "matscipy",
                 device: Optional[torch.device] = None) -> None:
        if not skin >= 0.0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.method = method
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.ref_positions: Optional[np.ndarray] = None  # (N, 3) Å at the last build
        self.ref_cell: Optional[np.ndarray] = None  # (3, 3) Å rows at the last build
        self.ref_pbc: Optional[np.ndarray] = None  # (3,) bool
        self.builds = 0

    def needs_rebuild(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> bool:
        """True unless every pair/triple now within r_c was within r_c + skin at the last build.

        With M = h₀⁻¹ h (row vectors: every pair vector is r = r̃ M, r̃ the pair vector of the
        reference-frame positions R̃ = R M⁻¹) and δ = max_i |R̃_i − R_i⁰|, a pair that was beyond
        r_c + skin is now at least σ_min(M) (r_c + skin − 2δ) long; the list is complete while that
        is ≥ r_c (a 1e-9 relative margin absorbs round-off).
        """
        if self.ref_positions is None or positions.shape != self.ref_positions.shape:
            return True
        if not np.array_equal(pbc, self.ref_pbc):
            return True
        if pbc.any():
            m = np.linalg.solve(self.ref_cell, cell)  # (3, 3) M = h0^-1 h
            rt = np.linalg.solve(m.T, positions.T).T  # (N, 3) R M^-1
            smin = float(np.linalg.svd(m, compute_uv=False)[-1])
        else:
            rt, smin = positions, 1.0
        disp = float(np.sqrt(((rt - self.ref_positions) ** 2).sum(1).max())) if len(positions) else 0.0
        return smin * (self.cutoff + self.skin - 2.0 * disp) < self.cutoff * (1.0 + 1e-9)

    def build(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
        """Pairs within r_c + skin of ``positions`` (N, 3) Å, ``cell`` (3, 3) Å rows, ``pbc`` (3,)."""
        from ekf_plugin.evaluation import neighbor_shifts

        i, j, s = neighbor_shifts(positions, cell, pbc, self.cutoff + self.skin, self.method, self.device)
        dev = self.device
        self.idx_i = torch.as_tensor(i, dtype=torch.long, device=dev)  # (P,)
        self.idx_j = torch.as_tensor(j, dtype=torch.long, device=dev)  # (P,)
        self.int_shifts = np.asarray(s, dtype=np.int64)  # (P, 3)
        self._i_np, self._j_np = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)  # (P,)
        self._buckets = None  # find_pairs' tables, made on first use
        self.shifts = torch.as_tensor(self.int_shifts, dtype=torch.float64, device=dev)  # (P, 3)
        self.ref_positions = np.array(positions, dtype=np.float64)
        self.ref_cell = np.array(cell, dtype=np.float64)
        self.ref_pbc = np.array(pbc, dtype=bool)
        self.builds += 1

    def find_pairs(self, i: np.ndarray, j: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Index in the list of the pairs (i → j, shift s), each (Q,) / (Q, 3); −1 where absent.

        Pairs are bucketed by (i, j) (a dense N² table up to 2048 atoms, a sorted search beyond), and
        the few images of one (i, j) are told apart by a packed shift code. ``s`` must lie within
        ±(the list's shift span) of the list's shifts (true for differences of two listed shifts).
        """
        if self._buckets is None:
            n = int(self.ref_positions.shape[0])
            key = self._i_np * n + self._j_np  # (P,)
            order = np.argsort(key, kind="stable")  # (P,)
            lo, hi = (self.int_shifts.min(0), self.int_shifts.max(0)) if len(key) else (np.zeros(3, np.int64),) * 2
            rad = np.maximum(np.abs(lo), np.abs(hi)) + (hi - lo)  # (3,) every listed or queried component
            if n <= 2048:
                counts = np.bincount(key, minlength=n * n)  # (N²,)
                self._buckets = (n, order, rad, np.cumsum(counts) - counts, counts, None)
            else:
                self._buckets = (n, order, rad, None, None, key[order])
            self._codes = self._pack(self.int_shifts, rad)  # (P,)
        n, order, rad, start, counts, skey = self._buckets
        q = i.astype(np.int64) * n + j  # (Q,)
        if skey is None:
            first, count = start[q], counts[q]  # (Q,)
        else:
            first = np.searchsorted(skey, q, "left")  # (Q,)
            count = np.searchsorted(skey, q, "right") - first  # (Q,)
        qcode = self._pack(s, rad)  # (Q,)
        out = np.full(len(q), -1, dtype=np.int64)  # (Q,)
        for c in range(int(count.max()) if len(q) else 0):  # usually one image per (i, j)
            has = count > c  # (Q,)
            cand = order[np.where(has, first + c, 0)]  # (Q,)
            hit = has & (self._codes[cand] == qcode)  # (Q,)
            out[hit] = cand[hit]
        return out

    @staticmethod
    def _pack(s: np.ndarray, rad: np.ndarray) -> np.ndarray:
        """(Q,) int64 code of integer shifts (Q, 3) with |s_c| ≤ rad_c."""
        base = 2 * rad + 1  # (3,)
        return ((s[:, 0] + rad[0]) * base[1] + (s[:, 1] + rad[1])) * base[2] + (s[:, 2] + rad[2])


# ----------------------------------------------------------------------------- per-triple kernels
#
# Written as one loop body over triples (1-D gathers from a structure-of-arrays pair table, Python
# loops over the few static function columns) so that ``torch.compile`` fuses each element triplet's
# forward, and its backward, into one C++ loop with no (T, U) intermediates. Eagerly they run as
# plain torch ops (slower, same numbers). Pair table rows: 0-2 unit vector, 3 distance, 4..4+K the
# angular factors h_k, 4+K..4+2K their r-derivatives.

Spec = Tuple[Tuple[int, float, float], ...]  # per function column: (factor row k, λ, ζ)


def _power(b: torch.Tensor, z: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(b^ζ, ζ b^(ζ−1)) of a (T,) base; integer ζ by repeated multiplication (None means 1)."""
    if z == 1:
        return b, None
    if float(z).is_integer():
        z = int(z)
        p = None  # (T,) b^(z−1) by binary powering
        e, sq = z - 1, b
        while e:
            if e & 1:
                p = sq if p is None else p * sq
            e >>= 1
            if e:
                sq = sq * sq
        return p * b, p * float(z)
    p = torch.pow(b, z - 1.0)  # (T,)
    return p * b, p * z


def _angular_forward(tab: torch.Tensor, tris: List[Tuple[torch.Tensor, ...]], n: int, specs: List[Spec]):
    """Slot sums of every element triplet: list of (n, U_c) float64 blocks.

    Args:
        tab: (4 + 2K, P) pair table (see above), compute dtype.
        tris: per triplet (p1, p2, p3, cen), each (T_c,) long: pairs i→j, i→k, j→k and centre i.
        n: number of atoms; specs: per triplet its columns (factor row, λ, ζ).
    """
    ux, uy, uz = tab[0], tab[1], tab[2]  # (P,) each
    out = []
    for (p1, p2, p3, cen), spec in zip(tris, specs):
        cos = ux[p1] * ux[p2] + uy[p1] * uy[p2] + uz[p1] * uz[p2]  # (T,)
        hh: Dict[int, torch.Tensor] = {}
        for k, _, _ in spec:
            if k not in hh:
                h = tab[4 + k]  # (P,)
                hh[k] = h[p1] * h[p2] * h[p3]  # (T,) exp(−η Σ(r − r_s)²) f_c f_c f_c
        n_cols = len(spec)
        flat = torch.zeros(n * n_cols, dtype=ACC, device=tab.device)  # (n·U,) row-major (n, U)
        base = cen * n_cols  # (T,)
        for c, (k, lam, z) in enumerate(spec):  # one scatter per column: fused, no (T, U) buffer
            a, _ = _power((cos * lam + 1.0).clamp(min=0.0), z)  # (T,) (1 + λ cos)^ζ
            flat = flat.index_add(0, base + c, (a * hh[k]).to(ACC))
        out.append(flat.view(n, n_cols))  # (n, U)
    return out


def _angular_backward(tab: torch.Tensor, qs: List[torch.Tensor], tris: List[Tuple[torch.Tensor, ...]],
                      specs: List[Spec], k_rows: int) -> torch.Tensor:
    """Pair gradients ∂E/∂r_p (P, 3) float64 of all triplets, from q = ∂E/∂(slot sums) (n, U_c) each.

    A triple's term depends on r_ij (p1), r_ik (p2) and r_jk = r_ik − r_ij (p3); its r_jk derivative
    is passed on to r_ij (−) and r_ik (+), so only p1 and p2 receive gradients.
    ``k_rows`` = K (the derivative rows start at 4 + K).
    """
    n_pairs = tab.shape[1]
    ux, uy, uz, d = tab[0], tab[1], tab[2], tab[3]  # (P,) each
    grad = torch.zeros(n_pairs * 3, dtype=ACC, device=tab.device)  # (P·3,) row-major (P, 3)
    for (p1, p2, p3, cen), spec, q in zip(tris, specs, qs):
        u1 = (ux[p1], uy[p1], uz[p1])  # 3 × (T,)
        u2 = (ux[p2], uy[p2], uz[p2])  # 3 × (T,)
        u3 = (ux[p3], uy[p3], uz[p3])  # 3 × (T,)
        cos = u1[0] * u2[0] + u1[1] * u2[1] + u1[2] * u2[2]  # (T,)
        keys: List[int] = []
        for k, _, _ in spec:
            if k not in keys:
                keys.append(k)
        hs = {k: (tab[4 + k][p1], tab[4 + k][p2], tab[4 + k][p3]) for k in keys}  # 3 × (T,) per factor
        qf = q.reshape(-1).to(tab.dtype)  # (n·U,) ∂E/∂slots, row-major (n, U)
        qb = cen * len(spec)  # (T,)
        qa: Dict[int, torch.Tensor] = {}
        c_cos = None  # (T,) ∂E/∂cos θ
        for c, (k, lam, z) in enumerate(spec):
            b = cos * lam + 1.0  # (T,)
            a, da = _power(b.clamp(min=0.0), z)  # (T,) each
            qc = qf[qb + c]  # (T,) ∂E/∂slot of the triple's centre
            qa[k] = qc * a if k not in qa else qa[k] + qc * a  # (T,) Σ_u q_u A_u per factor
            dq = qc * lam if da is None else qc * da * lam  # (T,)
            h1, h2, h3 = hs[k]
            t = torch.where(b > 0, dq, torch.zeros_like(dq)) * (h1 * h2 * h3)  # (T,)
            c_cos = t if c_cos is None else c_cos + t
        s1 = s2 = s3 = None  # (T,) ∂E/∂r_ij, ∂E/∂r_ik, ∂E/∂r_jk through the factors
        for k in keys:
            h1, h2, h3 = hs[k]
            hd = tab[4 + k_rows + k]  # (P,)
            q3 = qa[k] * h3  # (T,)
            a1, a2, a3 = q3 * h2 * hd[p1], q3 * h1 * hd[p2], qa[k] * (h1 * h2) * hd[p3]  # (T,) each
            s1 = a1 if s1 is None else s1 + a1
            s2 = a2 if s2 is None else s2 + a2
            s3 = a3 if s3 is None else s3 + a3
        w1, w2 = c_cos / d[p1], c_cos / d[p2]  # (T,) dcos/dr_ij = (u_ik − cos u_ij)/r_ij
        r1, r2 = s1 - w1 * cos, s2 - w2 * cos  # (T,)
        b1, b2 = p1 * 3, p2 * 3  # (T,) flat offsets into the row-major (P, 3) gradient
        for x in range(3):  # one scatter per component: fused, no (T, 3) buffers
            grad = grad.index_add(0, b1 + x, (r1 * u1[x] + w1 * u2[x] - s3 * u3[x]).to(ACC))
            grad = grad.index_add(0, b2 + x, (r2 * u2[x] + w2 * u1[x] + s3 * u3[x]).to(ACC))
    return grad.view(n_pairs, 3)


_COMPILED: Dict[Any, Any] = {}


def _kernel(fn, enabled: bool):
    """``fn`` itself, or ``torch.compile(fn, dynamic=True)`` (one compile per process)."""
    if not enabled:
        return fn
    if fn not in _COMPILED:
        # scalar C++ (no SIMD): the loops are gather-bound, and the code compiles ~2x faster
        _COMPILED[fn] = torch.compile(fn, dynamic=True, options={"cpp.simdlen": 1})
    return _COMPILED[fn]


def default_compile(device: Any = "cpu") -> bool:
    """Whether to compile the triple kernels by default (native C++ loops on CPU, see :class:`BPNNStep`).

    ``EKF_PLUGIN_COMPILE=0``/``1`` decides if set; otherwise on for CPU devices when a C++ compiler
    (``$CXX``, ``c++`` or ``g++``) is on PATH, off elsewhere (GPUs run the kernels eagerly).
    """
    env = os.environ.get("EKF_PLUGIN_COMPILE")
    if env is not None and env.strip():
        return env.strip().lower() not in ("0", "false", "no", "off")
    if torch.device(device).type != "cpu":
        return False
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++") if c)


# ----------------------------------------------------------------------------- native CPU kernels
#
# The same two per-triple kernels as C++ loops generated for the model's function set (columns, λ, ζ
# and factor rows are constants, so every per-triple value stays in registers): one pass over a
# triplet's triples for all its columns, the pair table as rows (P, R) so that a triple reads three
# rows, the sums of one centre (forward) and of one pair i→j (backward) kept in registers while the
# triples, sorted by centre and p1, stay on them, and triples with a side ≥ r_c skipped (their terms
# are exactly 0). Built with the system C++ compiler (ekf_plugin.native: about a second, no torch headers) into a shared
# library cached on disk (ekf_plugin.native) and called through ctypes with raw pointers; used for CPU tensors only
# (other devices run the torch kernels above). Arithmetic in the compute dtype, in the order of the
# torch kernels; sums in double.

_NATIVE_FLAGS = ("-O2", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off")
_NATIVE: Dict[str, Any] = {}  # "triples": the triple builder's ctypes function


def _c_power(b: str, z: float, out: str) -> List[str]:
    """C statements setting ``out_a`` = b^ζ and ``out_d`` = ζ b^(ζ−1) (None-free), in :func:`_power`'s order."""
    if z == 1:
        return [f"const T {out}_a = {b}; const T {out}_d = (T)1;"]
    if float(z).is_integer():
        zi = int(z)
        lines, p, e, sq, n = [], None, zi - 1, b, 0
        while e:
            if e & 1:
                if p is None:
                    p = sq
                else:
                    lines.append(f"const T {out}_p{n} = {p} * {sq};")
                    p, n = f"{out}_p{n}", n + 1
            e >>= 1
            if e:
                lines.append(f"const T {out}_s{n} = {sq} * {sq};")
                sq, n = f"{out}_s{n}", n + 1
        return lines + [f"const T {out}_a = {p} * {b}; const T {out}_d = {p} * (T){float(z)!r};"]
    return [f"const T {out}_p = std::pow({b}, (T){float(z) - 1.0!r});",
            f"const T {out}_a = {out}_p * {b}; const T {out}_d = {out}_p * (T){float(z)!r};"]


def _native_source(specs: List[Spec], n_factors: int) -> str:
    """C++ source of ``fwd<i>_{f32,f64}`` and ``bwd<i>_{f32,f64}`` for the triplets' ``specs``."""
    R, K = 4 + 2 * n_factors, n_factors
    src = ["#include <stdint.h>", "#include <cmath>", ""]
    head = ("const T* __restrict tab, T rc, int64_t nt, const int64_t* __restrict p1, const int64_t* __restrict p2, "
            "const int64_t* __restrict p3, const int64_t* __restrict cen")
    load = [
        "const T* a1 = tab + p1[t] * R; const T* a2 = tab + p2[t] * R; const T* a3 = tab + p3[t] * R;",
        "if (a1[3] >= rc || a2[3] >= rc || a3[3] >= rc) continue;  /* f_c = f_c' = 0 on a side */",
        "const T cs = a1[0] * a2[0] + a1[1] * a2[1] + a1[2] * a2[2];",
    ]
    for i, spec in enumerate(specs):
        U = len(spec)
        keys = list(dict.fromkeys(k for k, _, _ in spec))
        lams = list(dict.fromkeys(lam for _, lam, _ in spec))
        pw = list(dict.fromkeys((lam, z) for _, lam, z in spec))
        body_b = []
        for li, lam in enumerate(lams):
            body_b.append(f"const T b{li} = cs * (T){lam!r} + (T)1; const T bc{li} = b{li} < (T)0 ? (T)0 : b{li};")
        for pi, (lam, z) in enumerate(pw):
            body_b += _c_power(f"bc{lams.index(lam)}", z, f"w{pi}")
        hh = [f"const T hh{m} = a1[{4 + k}] * a2[{4 + k}] * a3[{4 + k}];" for m, k in enumerate(keys)]
        # forward: acc[c] over the triples of one centre
        src += [f"template <typename T> static void fwd{i}({head}, double* __restrict out) {{",
                f"  const int64_t R = {R}; double acc[{U}] = {{0}}; int64_t cur = -1;",
                "  for (int64_t t = 0; t < nt; ++t) {",
                "    if (cen[t] != cur) {",
                f"      if (cur >= 0) for (int c = 0; c < {U}; ++c) out[cur * {U} + c] += acc[c];",
                f"      for (int c = 0; c < {U}; ++c) acc[c] = 0.0;",
                "      cur = cen[t];", "    }"]
        src += ["    " + x for x in load + body_b + hh]
        for c, (k, lam, z) in enumerate(spec):
            src.append(f"    acc[{c}] += (double)(w{pw.index((lam, z))}_a * hh{keys.index(k)});")
        src += ["  }", f"  if (cur >= 0) for (int c = 0; c < {U}; ++c) out[cur * {U} + c] += acc[c];", "}", ""]
        # backward: pair gradients; p1's kept in registers while p1 is unchanged
        src += [f"template <typename T> static void bwd{i}({head}, const double* __restrict q, double* __restrict grad) {{",
                f"  const int64_t R = {R}; double g0 = 0.0, g1 = 0.0, g2 = 0.0; int64_t cur = -1;",
                "  for (int64_t t = 0; t < nt; ++t) {",
                "    if (p1[t] != cur) {",
                "      if (cur >= 0) { grad[cur * 3] += g0; grad[cur * 3 + 1] += g1; grad[cur * 3 + 2] += g2; }",
                "      g0 = g1 = g2 = 0.0; cur = p1[t];", "    }"]
        src += ["    " + x for x in load + body_b + hh]
        src.append(f"    const double* qr = q + cen[t] * {U};")
        qa: Dict[int, str] = {}
        ccos = None
        for c, (k, lam, z) in enumerate(spec):
            w, m, li = f"w{pw.index((lam, z))}", keys.index(k), lams.index(lam)
            src.append(f"    const T q{c} = (T)qr[{c}];")
            src.append(f"    const T qa{m}_{c} = " + (f"q{c} * {w}_a;" if m not in qa else f"{qa[m]} + q{c} * {w}_a;"))
            qa[m] = f"qa{m}_{c}"
            dq = f"q{c} * (T){lam!r}" if z == 1 else f"q{c} * {w}_d * (T){lam!r}"
            src.append(f"    const T t{c} = (b{li} > (T)0 ? {dq} : (T)0) * hh{m};")
            src.append(f"    const T cc{c} = " + (f"t{c};" if ccos is None else f"{ccos} + t{c};"))
            ccos = f"cc{c}"
        s = {1: None, 2: None, 3: None}
        for m, k in enumerate(keys):
            kd = 4 + K + k
            src.append(f"    const T h1_{m} = a1[{4 + k}], h2_{m} = a2[{4 + k}], h3_{m} = a3[{4 + k}];")
            src.append(f"    const T q3_{m} = {qa[m]} * h3_{m};")
            terms = {1: f"q3_{m} * h2_{m} * a1[{kd}]", 2: f"q3_{m} * h1_{m} * a2[{kd}]",
                     3: f"{qa[m]} * (h1_{m} * h2_{m}) * a3[{kd}]"}
            for side in (1, 2, 3):
                prev = s[side]
                src.append(f"    const T s{side}_{m} = " + (terms[side] if prev is None else f"{prev} + {terms[side]}") + ";")
                s[side] = f"s{side}_{m}"
        src += [f"    const T w1 = {ccos} / a1[3], w2 = {ccos} / a2[3];",
                f"    const T r1 = {s[1]} - w1 * cs, r2 = {s[2]} - w2 * cs;",
                f"    const T s3 = {s[3]};",
                "    g0 += (double)(r1 * a1[0] + w1 * a2[0] - s3 * a3[0]);",
                "    g1 += (double)(r1 * a1[1] + w1 * a2[1] - s3 * a3[1]);",
                "    g2 += (double)(r1 * a1[2] + w1 * a2[2] - s3 * a3[2]);",
                "    double* gb = grad + p2[t] * 3;",
                "    for (int x = 0; x < 3; ++x) gb[x] += (double)(r2 * a2[x] + w2 * a1[x] + s3 * a3[x]);",
                "  }",
                "  if (cur >= 0) { grad[cur * 3] += g0; grad[cur * 3 + 1] += g1; grad[cur * 3 + 2] += g2; }",
                "}", ""]
    src.append('extern "C" {')
    for i in range(len(specs)):
        for name, T in (("f32", "float"), ("f64", "double")):
            args = (f"const {T}* tab, {T} rc, int64_t nt, const int64_t* p1, const int64_t* p2, const int64_t* p3, "
                    "const int64_t* cen")
            src.append(f"void fwd{i}_{name}({args}, double* out) {{ fwd{i}<{T}>(tab, rc, nt, p1, p2, p3, cen, out); }}")
            src.append(f"void bwd{i}_{name}({args}, const double* q, double* grad) "
                       f"{{ bwd{i}<{T}>(tab, rc, nt, p1, p2, p3, cen, q, grad); }}")
    src.append("}")
    return "\n".join(src) + "\n"


_TRIPLES_SRC = r"""
#include <stdint.h>
#include <stdlib.h>

/* Candidate triples (i; j, k) of one element triplet (c; a, b) from a pair list, in the order of
   BehlerParrinello's SymmetryFunctions._triples (centre, then the a-neighbour, then the b-neighbour, pairs
   grouped by (centre, neighbour element) in list order; a == b: j before k), kept when |r_ik − r_ij|² < rc2
   and the pair j → k with shift S_ik − S_ij is in the list (p3). Returns the count, or −1 if cap is too small
   or memory is short. */
static inline int64_t code_of(const int64_t* s, const int64_t* rad) {
    const int64_t b1 = 2 * rad[1] + 1, b2 = 2 * rad[2] + 1;
    return ((s[0] + rad[0]) * b1 + (s[1] + rad[1])) * b2 + (s[2] + rad[2]);
}

extern "C" int64_t triples(int64_t n, int64_t E, int64_t P, const int64_t* ii, const int64_t* jj,
                           const int64_t* sh, const double* rij, const int64_t* sp, const int64_t* order,
                           const int64_t* start, int64_t c, int64_t a, int64_t b, double rc2,
                           const int64_t* rad, int64_t* p1, int64_t* p2, int64_t* p3, int64_t* cen, int64_t cap) {
    const int64_t ncode = (2 * rad[0] + 1) * (2 * rad[1] + 1) * (2 * rad[2] + 1);
    int64_t H = 1;
    while (H < 2 * P + 2) H <<= 1;
    int64_t* hk = (int64_t*)malloc(sizeof(int64_t) * H);
    int64_t* hv = (int64_t*)malloc(sizeof(int64_t) * H);
    if (!hk || !hv) { free(hk); free(hv); return -1; }
    for (int64_t h = 0; h < H; ++h) hk[h] = -1;
    for (int64_t p = 0; p < P; ++p) {  /* (i, j, shift) -> pair */
        const int64_t key = (ii[p] * n + jj[p]) * ncode + code_of(sh + 3 * p, rad);
        uint64_t h = ((uint64_t)key * 0x9E3779B97F4A7C15ull) & (uint64_t)(H - 1);
        while (hk[h] != -1 && hk[h] != key) h = (h + 1) & (uint64_t)(H - 1);
        if (hk[h] == -1) { hk[h] = key; hv[h] = p; }
    }
    int64_t t = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (sp[i] != c) continue;
        const int64_t a0 = start[i * E + a], a1 = start[i * E + a + 1];
        const int64_t b0 = start[i * E + b], b1 = start[i * E + b + 1];
        for (int64_t x = a0; x < a1; ++x) {
            const int64_t q1 = order[x];
            const double* v1 = rij + 3 * q1;
            const int64_t* s1 = sh + 3 * q1;
            for (int64_t y = (a == b ? x + 1 : b0); y < b1; ++y) {
                const int64_t q2 = order[y];
                const double* v2 = rij + 3 * q2;
                const double dx = v2[0] - v1[0], dy = v2[1] - v1[1], dz = v2[2] - v1[2];
                if (!(dx * dx + dy * dy + dz * dz < rc2)) continue;
                const int64_t* s2 = sh + 3 * q2;
                int64_t ds[3] = {s2[0] - s1[0], s2[1] - s1[1], s2[2] - s1[2]};
                if (ds[0] < -rad[0] || ds[0] > rad[0] || ds[1] < -rad[1] || ds[1] > rad[1] ||
                    ds[2] < -rad[2] || ds[2] > rad[2]) continue;
                const int64_t key = (jj[q1] * n + jj[q2]) * ncode + code_of(ds, rad);
                uint64_t h = ((uint64_t)key * 0x9E3779B97F4A7C15ull) & (uint64_t)(H - 1);
                while (hk[h] != -1 && hk[h] != key) h = (h + 1) & (uint64_t)(H - 1);
                if (hk[h] == -1) continue;  /* r_jk beyond the list */
                if (t >= cap) { free(hk); free(hv); return -1; }
                p1[t] = q1; p2[t] = q2; p3[t] = hv[h]; cen[t] = i; ++t;
            }
        }
    }
    free(hk); free(hv);
    return t;
}
"""


def native_triples(vl: "VerletList", species: np.ndarray, rij: np.ndarray, triplets: List[Tuple[int, int, int]],
                   n_elements: int, cutoff: float) -> Dict[Tuple[int, int, int], Tuple[np.ndarray, ...]]:
    """Candidate triples (p1, p2, p3, centre), each (T,) int64, per element triplet, from the list ``vl``.

    The same triples, in the same order, as ``SymmetryFunctions._triples`` followed by
    :meth:`VerletList.find_pairs` (kept where |r_jk| < ``cutoff`` and the pair j → k is listed), in one C
    loop per triplet. ``species`` (N,), ``rij`` (P, 3) float64 pair vectors of the list.
    """
    import ctypes

    fn = _NATIVE.get("triples")
    if fn is None:
        fn = native_library(_TRIPLES_SRC).triples
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [i64, i64, i64, vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, ctypes.c_double, vp, vp, vp, vp, vp, i64]
        fn.restype = i64
        _NATIVE["triples"] = fn
    n, E = int(species.shape[0]), int(n_elements)
    ii, jj = np.ascontiguousarray(vl._i_np), np.ascontiguousarray(vl._j_np)  # (P,)
    sh = np.ascontiguousarray(vl.int_shifts, dtype=np.int64)  # (P, 3)
    rij = np.ascontiguousarray(rij, dtype=np.float64)  # (P, 3)
    sp = np.ascontiguousarray(species, dtype=np.int64)  # (N,)
    key = ii * E + sp[jj]  # (P,)
    order = np.argsort(key, kind="stable").astype(np.int64)  # (P,) pairs grouped by (centre, neighbour element)
    cnt = np.bincount(key, minlength=n * E)  # (N·E,)
    start = np.concatenate([[0], np.cumsum(cnt)]).astype(np.int64)  # (N·E + 1,)
    if len(sh):
        lo, hi = sh.min(0), sh.max(0)
        rad = (np.maximum(np.abs(lo), np.abs(hi)) + (hi - lo)).astype(np.int64)  # (3,) any difference of two shifts
    else:
        rad = np.zeros(3, np.int64)
    cnt2 = cnt.reshape(n, E)
    out = {}
    for c, a, b in triplets:
        centres = sp == c
        cap = int((cnt2[centres, a] * cnt2[centres, b]).sum())
        bufs = [np.empty(max(cap, 1), dtype=np.int64) for _ in range(4)]
        t = fn(n, E, len(ii), ii.ctypes.data, jj.ctypes.data, sh.ctypes.data, rij.ctypes.data, sp.ctypes.data,
               order.ctypes.data, start.ctypes.data, c, a, b, float(cutoff) ** 2, rad.ctypes.data,
               *(x.ctypes.data for x in bufs), cap)
        if t < 0:
            raise RuntimeError("native triple builder: out of memory")
        if t:
            out[(c, a, b)] = tuple(x[:t] for x in bufs)  # views: no copy
    return out


def native_library(source: str):
    """``source`` built and loaded with :func:`ekf_plugin.native.native_library` (``RuntimeError`` if impossible)."""
    from ekf_plugin.native import native_library as build

    return build(source, flags=_NATIVE_FLAGS, name="bpnn_md")


# ----------------------------------------------------------------------------- the step


@dataclass
class StepResult:
    """One evaluation, float64 tensors on the model's device, in eV and Å."""

    energy: torch.Tensor  # () eV
    forces: torch.Tensor  # (N, 3) eV/Å
    stress: Optional[torch.Tensor]  # (3, 3) eV/Å³ (Σ_p g_p ⊗ r_p / V), None without a cell
    virial: Optional[torch.Tensor]  # (3, 3) eV, −V·stress symmetrised, None without a cell


class BPNNStep:
    """Energy, forces and virial of a BPNN potential for MD (see the module docstring).

    Args:
        model: a model for which :func:`supports` is true. Its weights and scaling are read at every
            call (later changes are seen); the function set is read once.
        dtype: dtype of the pair and triple terms (default: the networks' dtype). The networks run in
            their own dtype; sums are float64 either way.
        skin: Verlet skin in Å (0 = a new list every call).
        neighbor_list: ``"auto"`` (matscipy on CPU, torch on GPU), ``"matscipy"``, ``"ase"``, ``"torch"``.
        compile: how the per-triple kernels run: ``True`` or ``"native"`` = the native C++ loops on CPU
            (:func:`native_library`; on other devices ``True`` means ``"torch"``), ``"torch"`` =
            ``torch.compile``, ``False`` = eager torch ops. A failed build warns and runs them eagerly.
    """

    def __init__(self, model: torch.nn.Module, dtype: Optional[torch.dtype] = None, skin: float = 0.5,
                 neighbor_list: str = "auto", compile: bool = False) -> None:
        if not supports(model):
            raise ValueError("BPNNStep needs a BehlerParrinello + ElementNetworks potential without postprocessors")
        from ekf_plugin.bpnn.networks import ElementNetworks

        self.model = model
        self.nets = next(m for m in model.output_modules if isinstance(m, ElementNetworks))
        p = next(self.nets.parameters())
        self._setup(model.representation, p.device, dtype or p.dtype, skin, neighbor_list, compile)

    @classmethod
    def features_only(cls, representation: torch.nn.Module, dtype: torch.dtype = torch.float64, skin: float = 0.0,
                      neighbor_list: str = "auto", compile: Any = True) -> "BPNNStep":
        """An evaluator of the raw symmetry functions of a :class:`BehlerParrinello` representation alone
        (:meth:`raw_features`; no networks, so no energies or forces). ``skin=0``: a new list every call,
        for frames that are unrelated to each other (a training set)."""
        self = cls.__new__(cls)
        self.model = self.nets = None
        self._setup(representation, representation.scale_weight.device, dtype, skin, neighbor_list, compile)
        return self

    def _setup(self, representation: torch.nn.Module, device: torch.device, dtype: torch.dtype, skin: float,
               neighbor_list: str, compile: Any) -> None:
        self.rep = representation
        self.sf = self.rep.sf
        self.device = device
        self.dtype = dtype
        if neighbor_list == "auto":
            from ekf_plugin.evaluation import _default_cpu_list

            neighbor_list = "torch" if self.device.type != "cpu" else _default_cpu_list()
        self.cutoff = float(self.sf.cutoff)
        self.verlet = VerletList(self.cutoff, skin, neighbor_list, self.device)
        self._build_constants()
        self.compile = self._kernel_mode(compile)
        self._numbers: Optional[np.ndarray] = None
        self.calls = 0

    def _kernel_mode(self, compile: Any):
        """``"native"``, ``"torch"`` or ``False`` (see the class docstring)."""
        if compile is False or compile is None or compile == 0:
            return False
        if compile not in (True, 1, "native", "torch"):
            raise ValueError(f"compile must be True, False, 'native' or 'torch', got {compile!r}")
        if compile == "torch":
            return "torch"
        if self.device.type != "cpu" or self.dtype not in (torch.float32, torch.float64):
            return "torch" if compile is True or compile == 1 else False
        try:
            self._native_lib()
        except RuntimeError as exc:
            warnings.warn(f"cannot build the native BPNN triple kernels ({exc}); running them eagerly "
                          "(same results, slower)", RuntimeWarning, stacklevel=3)
            return False
        return "native"

    # -- constants derived from the function set -------------------------------------------
    def _build_constants(self) -> None:
        sf, dev = self.sf, self.device
        E = len(sf.elements)
        self.E = E
        sel = sf.feature_slot.cpu()  # (E, W) slot of each feature in SymmetryFunctions' layout
        n_rad = E * sf.n_rad_keys
        # radial: per (centre, neighbour) element pair the (η, r_s) keys its functions use
        rad_keys: Dict[Tuple[int, int], List[int]] = {}
        for c in range(E):
            for col in range(sf.n_features[c]):
                slot = int(sel[c, col])
                if slot < n_rad:
                    ej, k = divmod(slot, sf.n_rad_keys)
                    keys = rad_keys.setdefault((c, ej), [])
                    if k not in keys:
                        keys.append(k)
        self.rad_keys = rad_keys
        # angular: distinct (η, r_s) pair factors, and per element triplet its columns (factor, λ, ζ)
        ang = list(zip(sf.ang_eta.tolist(), sf.ang_rs.tolist()))
        fkeys: List[Tuple[float, float]] = []
        for key in ang:
            if key not in fkeys:
                fkeys.append(key)
        self.n_factors = len(fkeys)
        self.fac_eta = torch.tensor([k[0] for k in fkeys], dtype=torch.float64, device=dev)  # (K,)
        self.fac_rs = torch.tensor([k[1] for k in fkeys], dtype=torch.float64, device=dev)  # (K,)
        self.triplets: List[Dict[str, Any]] = []
        offset = n_rad
        for c, a, b in sf.triplet_list:
            cols, _ = sf.triplet_columns[(c, a, b)]
            spec = tuple((fkeys.index(ang[u]), float(sf.ang_lam[u]), float(sf.ang_zeta[u])) for u in cols)
            self.triplets.append({"combo": (c, a, b), "cols": list(cols), "spec": spec, "offset": offset,
                                  "index": len(self.triplets)})
            offset += len(cols)
        self.n_slots = offset  # slot matrix (N, S): [radial E*U_r | one block per triplet]
        fmap = torch.zeros_like(sel)  # (E, W) column of the slot matrix of each feature
        for c in range(E):
            for col in range(sf.n_features[c]):
                slot = int(sel[c, col])
                if slot < n_rad:
                    fmap[c, col] = slot
                else:
                    r, u = divmod(slot - n_rad, sf.n_ang_keys)
                    a, b = divmod(r, E)
                    t = next(t for t in self.triplets if t["combo"] == (c, a, b))
                    fmap[c, col] = t["offset"] + t["cols"].index(u)
        self.feature_map = fmap.to(dev)  # (E, W)
        self.rad_eta = sf.rad_eta.to(dev)  # (U_r,) float64
        self.rad_rs = sf.rad_rs.to(dev)  # (U_r,) float64

    # -- list-dependent tables ------------------------------------------------------------
    def _rebuild(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
        """New Verlet list, radial pair groups and candidate triples (p1, p2, p3, centre) per triplet."""
        vl = self.verlet
        vl.build(positions, cell, pbc)
        E, dev, sp = self.E, self.device, self.species
        n = sp.shape[0]
        ii, jj = vl.idx_i, vl.idx_j  # (P,)
        ci, cj = sp.index_select(0, ii), sp.index_select(0, jj)  # (P,)
        self.rad_groups = []  # ((c, e_j), pairs (P_g,), their centres (P_g,), keys (U_g,), slot columns (U_g,))
        for (c, ej), keys in self.rad_keys.items():
            idx = torch.nonzero((ci == c) & (cj == ej)).squeeze(-1)  # (P_g,)
            if idx.numel():
                k = torch.tensor(keys, dtype=torch.long, device=dev)  # (U_g,)
                self.rad_groups.append(((c, ej), idx, ii.index_select(0, idx), k, ej * self.sf.n_rad_keys + k))
        r = torch.as_tensor(positions, dtype=torch.float64, device=dev)  # (N, 3)
        h = torch.as_tensor(cell, dtype=torch.float64, device=dev)  # (3, 3)
        rij = r.index_select(0, jj) - r.index_select(0, ii) + vl.shifts @ h  # (P, 3)
        self.tris, self.specs, self.active = [], [], []
        if self.compile == "native":  # the same triples from one C loop per triplet
            built = native_triples(vl, sp.cpu().numpy(), rij.cpu().numpy(), [t["combo"] for t in self.triplets],
                                   E, vl.cutoff + vl.skin)
            for t in self.triplets:
                if t["combo"] in built:
                    self.tris.append(tuple(torch.as_tensor(x, device=dev) for x in built[t["combo"]]))
                    self.specs.append(t["spec"])
                    self.active.append(t)
            self.n_atoms = n
            self.n_triples = sum(int(x[0].numel()) for x in self.tris)
            return
        parts = self.sf._triples(sp, rij, ii, jj, n, split=True, cutoff=vl.cutoff + vl.skin) or []
        by_combo = {combo: (cen, q1, q2) for combo, cen, q1, q2, _ in parts}
        jn, s_np = jj.cpu().numpy(), vl.int_shifts
        for t in self.triplets:
            if t["combo"] not in by_combo:
                continue
            cen, q1, q2 = by_combo[t["combo"]]
            q1n, q2n = q1.cpu().numpy(), q2.cpu().numpy()
            p3 = vl.find_pairs(jn[q1n], jn[q2n], s_np[q2n] - s_np[q1n])  # (T,) pair j→k with shift S_ik − S_ij
            keep = torch.as_tensor(np.nonzero(p3 >= 0)[0], dtype=torch.long, device=dev)  # (T',)
            p3t = torch.as_tensor(p3, dtype=torch.long, device=dev).index_select(0, keep)  # (T',)
            self.tris.append((q1.index_select(0, keep), q2.index_select(0, keep), p3t, cen.index_select(0, keep)))
            self.specs.append(t["spec"])
            self.active.append(t)
        self.n_atoms = n
        self.n_triples = sum(int(x[0].numel()) for x in self.tris)

    # -- evaluation -------------------------------------------------------------------------
    def __call__(self, numbers: np.ndarray, positions: np.ndarray, cell: Optional[np.ndarray] = None,
                 pbc: Optional[np.ndarray] = None) -> StepResult:
        """Evaluate one structure.

        Args:
            numbers: (N,) atomic numbers.
            positions: (N, 3) Å (may be unwrapped).
            cell: (3, 3) Å, lattice vectors as rows (ignored without PBC).
            pbc: (3,) bool (default: periodic if a non-singular cell is given).
        """
        r, h, periodic = self._prepare(numbers, positions, cell, pbc)
        rt = torch.as_tensor(r, dtype=torch.float64, device=self.device)  # (N, 3)
        ht = torch.as_tensor(h, dtype=torch.float64, device=self.device)  # (3, 3)
        energy, forces, dedeps = self._evaluate(rt, ht)
        return _result(energy, forces, dedeps, h, periodic)

    def _prepare(self, numbers: np.ndarray, positions: np.ndarray, cell: Optional[np.ndarray],
                 pbc: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, bool]:
        """Checks one structure, updates species and (if needed) the Verlet list: (R (N, 3), h (3, 3), periodic)."""
        from ekf_plugin.bpnn.representation import species_of

        z = np.asarray(numbers, dtype=np.int64).reshape(-1)
        r = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        h = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
        if pbc is None:
            pbc = np.full(3, abs(np.linalg.det(h)) > 1e-12)
        pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
        periodic = bool(pbc.any())
        if periodic and abs(np.linalg.det(h)) < 1e-12:
            raise ValueError("periodic boundary conditions need a non-singular cell")
        if not periodic:
            h = np.zeros((3, 3))
        dev = self.device
        if self._numbers is None or not np.array_equal(z, self._numbers):
            zt = torch.as_tensor(z, device=dev)
            self.species = species_of(zt, self.rep.species_table.to(dev), self.rep.elements)  # (N,)
            self._element_atoms = [torch.nonzero(self.species == e).squeeze(-1) for e in range(self.E)]  # (N_e,)
            self._numbers = z.copy()
            self.verlet.ref_positions = None
        if self.verlet.needs_rebuild(r, h, pbc):
            self._rebuild(r, h, pbc)
        self.calls += 1
        return r, h, periodic

    @torch.no_grad()
    def raw_features(self, numbers: np.ndarray, positions: np.ndarray, cell: Optional[np.ndarray] = None,
                     pbc: Optional[np.ndarray] = None) -> torch.Tensor:
        """(N, W) float64 unscaled symmetry functions of one structure, as
        :meth:`BehlerParrinello.raw_features` computes them (same layout, columns beyond an element's
        functions 0), from the pair and triple kernels of the MD step. Arguments as :meth:`__call__` (Å)."""
        r, h, _ = self._prepare(numbers, positions, cell, pbc)
        rt = torch.as_tensor(r, dtype=torch.float64, device=self.device)  # (N, 3)
        ht = torch.as_tensor(h, dtype=torch.float64, device=self.device)  # (3, 3)
        slots, _ = self._forward(self._pair_vectors(rt, ht))  # (N, S)
        fmap, pref = self._feature_slots(self.species, slots.device)  # (N, W) each
        return torch.gather(slots, 1, fmap) * pref  # (N, W)

    def _feature_slots(self, sp: torch.Tensor, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per atom of species ``sp`` (N,): the slot column of each feature and its prefactor, (N, W) each;
        raw features G = gather(slots, 1, columns) · prefactor."""
        fmap = self.feature_map.index_select(0, sp)  # (N, W)
        pref = self.sf.feature_prefactor.to(device=device, dtype=ACC).index_select(0, sp)  # (N, W)
        return fmap, pref

    def _evaluate(self, r: torch.Tensor, h: torch.Tensor):
        """(energy (), forces (N, 3), ∂E/∂ε (3, 3)), float64, from positions (N, 3) Å and cell (3, 3) Å."""
        slots, ctx = self._forward(self._pair_vectors(r, h))
        energies, gslots = self._energy_and_slot_gradient(slots, self.species, self._element_atoms, 1)
        forces, dedeps = self._backward(ctx, gslots)
        return energies[0], forces, dedeps

    def _pair_vectors(self, r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(P, 3) float64 pair vectors of the list for positions (N, 3) Å and cell rows (3, 3) Å."""
        vl = self.verlet
        return r.index_select(0, vl.idx_j) - r.index_select(0, vl.idx_i) + vl.shifts @ h

    def _forward(self, rij: torch.Tensor):
        """Slot matrix (N, S) float64 of this structure from its pair vectors (P, 3), and what the backward needs."""
        sf, dt, n, dev = self.sf, self.dtype, self.n_atoms, rij.device
        d64 = torch.linalg.vector_norm(rij, dim=1).clamp(min=1e-12)  # (P,)
        u = (rij / d64[:, None]).to(dt)  # (P, 3) unit vectors
        d = d64.to(dt)  # (P,)
        fc, dfc = sf.cutoff_fn.value_and_derivative(d)  # (P,) each; 0 beyond r_c
        # ---- pair table: u, r, h_k = exp(−η_k (r − r_s,k)²) f_c, ∂h_k/∂r
        x = d[None, :] - self.fac_rs.to(dt)[:, None]  # (K, P)
        eta = self.fac_eta.to(dt)[:, None]  # (K, 1)
        ex = torch.exp(-eta * x * x)  # (K, P)
        tab = torch.cat([u.T, d[None, :], ex * fc[None, :], ex * (dfc[None, :] - 2.0 * eta * x * fc[None, :])])  # (4+2K, P)
        # ---- forward: slot matrix (N, S) float64
        slots = torch.zeros(n, self.n_slots, dtype=ACC, device=dev)  # (N, S)
        rad = []
        for _, idx, cen, k, cols in self.rad_groups:
            dg, fg = d.index_select(0, idx), fc.index_select(0, idx)  # (P_g,)
            xr = dg[:, None] - self.rad_rs.to(dt).index_select(0, k)[None, :]  # (P_g, U_g)
            er = self.rad_eta.to(dt).index_select(0, k)[None, :]  # (1, U_g)
            e = torch.exp(-er * xr * xr)  # (P_g, U_g)
            blk = torch.zeros(n, k.shape[0], dtype=ACC, device=dev).index_add_(0, cen, (e * fg[:, None]).to(ACC))  # (N, U_g)
            slots.index_add_(1, cols, blk)
            rad.append(e * (dfc.index_select(0, idx)[:, None] - 2.0 * er * xr * fg[:, None]))  # (P_g, U_g) ∂term/∂r
        if self.compile == "native":
            tab = tab.T.contiguous()  # (P, 4+2K) rows: one pair's table in one place
            blocks = self._native_forward(tab, n)  # (N, U_c) each
        else:
            blocks = self._run(_angular_forward, tab, self.tris, n, self.specs)  # (N, U_c) each
        for t, blk in zip(self.active, blocks):
            slots[:, t["offset"]:t["offset"] + blk.shape[1]] += blk
        return slots, (rij, u, tab, rad)

    def _energy_and_slot_gradient(self, slots: torch.Tensor, sp: torch.Tensor, element_atoms: List[torch.Tensor],
                                  n_struct: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Energies (B,) and ∂E/∂slots (N, S), float64, from the slot matrix (N, S) of B structures of N/B atoms."""
        dev = slots.device
        fmap, pref = self._feature_slots(sp, dev)  # (N, W) each
        w = self.rep.scale_weight.to(device=dev, dtype=ACC).index_select(0, sp)  # (N, W)
        b = self.rep.scale_bias.to(device=dev, dtype=ACC).index_select(0, sp)  # (N, W)
        g = torch.gather(slots, 1, fmap) * pref  # (N, W) raw symmetry functions
        energies, ds = self._networks(g * w + b, sp, element_atoms, n_struct)  # (B,), (N, W)
        return energies, torch.zeros_like(slots).scatter_add_(1, fmap, ds * w * pref)  # (N, S) ∂E/∂slots

    def _backward(self, ctx, gslots: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forces (N, 3) and ∂E/∂ε (3, 3), float64, of this structure from ∂E/∂slots (N, S)."""
        rij, u, tab, rad = ctx
        dt, dev, n = self.dtype, rij.device, self.n_atoms
        qs = [gslots[:, t["offset"]:t["offset"] + len(t["cols"])].contiguous() for t in self.active]  # (N, U_c)
        if self.compile == "native":
            gp = self._native_backward(tab, qs)  # (P, 3)
        else:
            gp = self._run(_angular_backward, tab, qs, self.tris, self.specs, self.n_factors)  # (P, 3)
        sr = torch.zeros(rij.shape[0], dtype=ACC, device=dev)  # (P,) radial ∂E/∂r_p
        gq = gslots.to(dt)  # (N, S)
        for (_, idx, cen, k, cols), dterm in zip(self.rad_groups, rad):
            q = gq.index_select(1, cols).index_select(0, cen)  # (P_g, U_g)
            sr.index_add_(0, idx, (q * dterm).sum(1).to(ACC))
        gp = gp + sr[:, None] * u.to(ACC)  # (P, 3)
        vl = self.verlet
        forces = torch.zeros(n, 3, dtype=ACC, device=dev)  # (N, 3) F_i = Σ_{i→·} g − Σ_{·→i} g
        forces.index_add_(0, vl.idx_i, gp).index_add_(0, vl.idx_j, -gp)
        return forces, gp.T @ rij  # ∂E/∂ε = Σ_p g_p ⊗ r_p

    def _native_lib(self):
        """The native kernels of this function set (built on first use, see :func:`native_library`)."""
        lib = getattr(self, "_native", None)
        if lib is None:
            import ctypes

            lib = native_library(_native_source([t["spec"] for t in self.triplets], self.n_factors))
            vp, i64 = ctypes.c_void_p, ctypes.c_int64
            for t in self.triplets:
                for name, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
                    for kind, extra in (("fwd", [vp]), ("bwd", [vp, vp])):
                        fn = getattr(lib, f"{kind}{t['index']}_{name}")
                        fn.argtypes = [vp, real, i64, vp, vp, vp, vp, *extra]
                        fn.restype = None
            self._native = lib
        return lib

    def _native_fn(self, kind: str, index: int):
        name = "f32" if self.dtype == torch.float32 else "f64"
        return getattr(self._native_lib(), f"{kind}{index}_{name}")

    def _native_forward(self, tab: torch.Tensor, n: int) -> List[torch.Tensor]:
        """Slot sums (n, U_c) float64 per active triplet from the row-major pair table (P, R)."""
        rc = float(self.sf.cutoff_fn.cutoff.to(self.dtype))  # the eager f_c's threshold, in the compute dtype
        out = []
        for t, (p1, p2, p3, cen) in zip(self.active, self.tris):
            blk = torch.zeros(n, len(t["cols"]), dtype=ACC)  # (n, U)
            self._native_fn("fwd", t["index"])(tab.data_ptr(), rc, p1.numel(), p1.data_ptr(), p2.data_ptr(),
                                               p3.data_ptr(), cen.data_ptr(), blk.data_ptr())
            out.append(blk)
        return out

    def _native_backward(self, tab: torch.Tensor, qs: List[torch.Tensor]) -> torch.Tensor:
        """Pair gradients (P, 3) float64 from the row-major pair table (P, R) and ∂E/∂slots (n, U_c) per triplet."""
        rc = float(self.sf.cutoff_fn.cutoff.to(self.dtype))
        grad = torch.zeros(tab.shape[0], 3, dtype=ACC)  # (P, 3)
        for t, (p1, p2, p3, cen), q in zip(self.active, self.tris, qs):
            self._native_fn("bwd", t["index"])(tab.data_ptr(), rc, p1.numel(), p1.data_ptr(), p2.data_ptr(),
                                               p3.data_ptr(), cen.data_ptr(), q.data_ptr(), grad.data_ptr())
        return grad

    def _run(self, fn, *args):
        """A triple kernel, compiled when ``self.compile == "torch"``; a failed compile warns and falls back to eager."""
        if self.compile == "torch":
            try:
                return _kernel(fn, True)(*args)
            except Exception as exc:  # no working compiler, unsupported backend, ...
                warnings.warn(f"torch.compile of the BPNN triple kernels failed ({type(exc).__name__}: {exc}); "
                              "running them eagerly (same results, slower)", RuntimeWarning, stacklevel=3)
                self.compile = False
        return fn(*args)

    def _networks(self, s: torch.Tensor, sp: torch.Tensor, element_atoms: List[torch.Tensor],
                  n_struct: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Energies (B,) float64 eV and ∂E/∂s (N, W) float64 from the scaled features s (N, W) float64.

        The element networks run in their own dtype (float32 in float32 mode); atomic energies are
        summed in float64, per structure of N/B consecutive atoms when B > 1.
        """
        nets = self.nets
        ndt = next(nets.parameters()).dtype
        x = s.to(ndt).requires_grad_(True)  # (N, W)
        with torch.enable_grad():
            if n_struct == 1:
                total = torch.zeros((), dtype=ACC, device=s.device)
                for e, net in enumerate(nets.networks):
                    idx = element_atoms[e]  # (N_e,)
                    if idx.numel():
                        total = total + net(x.index_select(0, idx)[:, : nets.n_in[e]]).to(ACC).sum()
                (ds,) = torch.autograd.grad(total, x)  # (N, W)
                per = total.detach()[None]  # (1,)
            else:
                y = torch.zeros(s.shape[0], dtype=ACC, device=s.device)  # (N,) atomic network outputs
                for e, net in enumerate(nets.networks):
                    idx = element_atoms[e]  # (N_e,)
                    if idx.numel():
                        y = y.index_add(0, idx, net(x.index_select(0, idx)[:, : nets.n_in[e]]).to(ACC).squeeze(-1))
                (ds,) = torch.autograd.grad(y.sum(), x)  # (N, W)
                per = y.detach().view(n_struct, -1).sum(1)  # (B,)
        scale = nets.energy_scale.to(device=s.device, dtype=ACC)
        offsets = nets.atom_energy.to(device=s.device, dtype=ACC).index_select(0, sp).view(n_struct, -1).sum(1)  # (B,)
        return per * scale + offsets, ds.to(ACC) * scale


def _result(energy: torch.Tensor, forces: torch.Tensor, dedeps: torch.Tensor, h: np.ndarray, periodic: bool) -> StepResult:
    """StepResult of one structure from its energy (), forces (N, 3) and ∂E/∂ε (3, 3) with cell rows h (3, 3) Å."""
    stress = virial = None
    if periodic:
        stress = dedeps / abs(float(np.linalg.det(h)))  # (3, 3) eV/Å³
        virial = -0.5 * (dedeps + dedeps.T)  # (3, 3) eV
    return StepResult(energy, forces, stress, virial)


def evaluate_batch(steps: List["BPNNStep"], numbers: np.ndarray, positions: np.ndarray,
                   cells: Optional[np.ndarray] = None, pbc: Optional[np.ndarray] = None) -> List[StepResult]:
    """B structures with the same atoms (e.g. the beads of a ring polymer) in one evaluation.

    Structure b uses ``steps[b]``'s Verlet list (reused and rebuilt as in :meth:`BPNNStep.__call__`); the
    steps must share the model, dtype and kernels. Pair and triple terms and the backward run per
    structure (each structure's tables stay in the CPU cache; joined tables of 8 × 192 atoms measured 35 %
    slower per structure), the element networks once for all B·N atoms (forward and backward). Equal to
    evaluating each structure with its step, to round-off (atomic energies are summed per atom instead of
    per element).

    Args:
        steps: B steps (distinct objects: each keeps its own list).
        numbers: (N,) atomic numbers, the same for all structures.
        positions: (B, N, 3) Å.
        cells: (B, 3, 3) Å rows, or None (no cell).
        pbc: (3,) bool for all (default: periodic if a cell is non-singular).

    Returns:
        B :class:`StepResult`.
    """
    positions = np.asarray(positions, dtype=np.float64)
    nb = len(steps)
    if positions.ndim != 3 or positions.shape[0] != nb:
        raise ValueError(f"positions must be (B={nb}, N, 3), got {positions.shape}")
    if len({id(s) for s in steps}) != nb:
        raise ValueError("each structure needs its own BPNNStep (its own Verlet list)")
    first = steps[0]
    for s in steps[1:]:
        if s.model is not first.model or s.dtype != first.dtype or s.compile != first.compile:
            raise ValueError("batched steps must share the model, dtype and kernels")
    if nb == 1:
        return [first(numbers, positions[0], None if cells is None else cells[0], pbc)]
    prep = [s._prepare(numbers, positions[b], None if cells is None else cells[b], pbc) for b, s in enumerate(steps)]
    dev, n = first.device, first.n_atoms
    slots, ctxs = [], []
    for (r, h, _), s in zip(prep, steps):  # pair and triple terms per structure: its tables stay in cache
        rt = torch.as_tensor(r, dtype=torch.float64, device=dev)  # (N, 3)
        ht = torch.as_tensor(h, dtype=torch.float64, device=dev)  # (3, 3)
        sl, ctx = s._forward(s._pair_vectors(rt, ht))
        slots.append(sl)
        ctxs.append(ctx)
    sp = first.species.repeat(nb)  # (B·N,)
    element_atoms = [torch.cat([ea + b * n for b in range(nb)]) for ea in first._element_atoms]  # (B·N_e,)
    energies, gslots = first._energy_and_slot_gradient(torch.cat(slots), sp, element_atoms, nb)  # (B,), (B·N, S)
    out = []
    for b, s in enumerate(steps):
        forces, dedeps = s._backward(ctxs[b], gslots[b * n:(b + 1) * n])
        out.append(_result(energies[b], forces, dedeps, prep[b][1], prep[b][2]))
    return out
