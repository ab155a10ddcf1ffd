"""Vectorised Behler-Parrinello symmetry functions (radial G2, narrow angular G3).

TorchANI-style: per-pair and per-triple terms are computed for all pairs/triples at once and
scattered (``index_add_``) into per-atom slots; there is no Python loop over atoms or neighbours.
Derivatives (forces, stress through SchNetPack's strain) come from autograd, so the training path
(``create_graph=True``) works unchanged.

Layout of the computation (P pairs, T triples, N atoms, E elements):

1. radial: every *distinct* (η, r_s) of the G2 set is evaluated for every pair, ``(P, U_r)``, and
   summed into slots ``(N · E, U_r)`` indexed by (centre atom, neighbour element);
2. angular: unordered neighbour pairs (j < k) of every centre form the triples; every distinct
   (η, r_s, λ, ζ) of the G3 set is evaluated per triple, ``(T, U_a)``, and summed into slots
   ``(N · E · E, U_a)`` indexed by (centre atom, neighbour-element pair);
3. each element's feature vector is a gather of its functions' slots times a constant prefactor.

Pair counting of G3 (``angular_convention``):

* ``"n2p2"`` (default): each unordered neighbour pair {j, k} counts once, for same-element and
  mixed-element triplets alike — n2p2's ``SymFncExpAngn`` (loop ``k > j``) and RuNNer. This is
  what makes n2p2 potentials load exactly.
* ``"ordered"``: PiNN's convention, a sum over ordered (j, k) with j of the first and k of the second
  neighbour element, i.e. same-element triplets (O–HH) are 2× the n2p2 value, mixed ones equal. The
  study's Eq. S2 is written as such an ordered double sum. After min/max scaling (Eq. S4) the two
  conventions give identical network inputs.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .cutoff import CutoffFunction
from .presets import G2, G3, SymmetryFunction, per_element

ANGULAR_CONVENTIONS = ("n2p2", "ordered")


def neighbor_pairs_of_centers(idx_i: torch.Tensor, n_atoms: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All unordered pairs (p1 < p2 in sorted order) of pairs sharing a centre atom.

    Args:
        idx_i: (P,) centre atom of every pair.
        n_atoms: N.

    Returns:
        ``(center, p1, p2)``, each (T,): centre atom and the two pair indices (into ``idx_i``).
    """
    device = idx_i.device
    order = torch.argsort(idx_i, stable=True)  # (P,)
    counts = torch.bincount(idx_i, minlength=n_atoms)  # (N,)
    start = torch.cumsum(counts, 0) - counts  # (N,)
    n_tri = counts * (counts - 1) // 2  # (N,)
    total = int(n_tri.sum())
    if total == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty
    center = torch.repeat_interleave(torch.arange(n_atoms, device=device), n_tri)  # (T,)
    tri_start = torch.cumsum(n_tri, 0) - n_tri  # (N,)
    sel = torch.index_select
    local = torch.arange(total, device=device) - sel(tri_start, 0, center)  # (T,)
    m = int(counts.max())
    tri = torch.tril_indices(m, m, -1, device=device)  # (2, m(m-1)/2): rows a > b, row-major
    base = sel(start, 0, center)  # (T,)
    p1 = sel(order, 0, base + sel(tri[1], 0, local))  # (T,)
    p2 = sel(order, 0, base + sel(tri[0], 0, local))  # (T,)
    return center, p1, p2


class SymmetryFunctions(nn.Module):
    """Raw (unscaled) G2/G3 symmetry functions for a fixed element list.

    Args:
        elements: chemical symbols, e.g. ``["H", "O"]``; index e of an atom = position in this list.
        functions: G2/G3 records with parameters in Å (see :mod:`ekf_plugin.bpnn.presets`).
        cutoff: r_c in Å, shared by all functions.
        cutoff_type: name or n2p2 number (:mod:`ekf_plugin.bpnn.cutoff`).
        cutoff_alpha: inner-radius fraction of the core cutoff types.
        angular_convention: ``"n2p2"`` or ``"ordered"`` (module docstring).
        fast_angular: use the hand-written triple gradient (:class:`_AngularTerms`) when all angular
            r_s are 0 and all ζ integers; otherwise (or ``False``) plain autograd.
        compile_kernels: fuse the per-triple element-wise math with ``torch.compile`` (needs a C++
            compiler; ~40 s compile on first use per process; ~2-4x faster angular terms on CPU).

    ``n_features[e]`` functions for element e, padded with zeros to ``width = max(n_features)``.
    """

    def __init__(
        self,
        elements: Sequence[str],
        functions: Sequence[SymmetryFunction],
        cutoff: float,
        cutoff_type="tanhu",
        cutoff_alpha: float = 0.0,
        angular_convention: str = "n2p2",
        fast_angular: bool = True,
        compile_kernels: bool = False,
    ) -> None:
        super().__init__()
        if angular_convention not in ANGULAR_CONVENTIONS:
            raise ValueError(f"angular_convention must be one of {ANGULAR_CONVENTIONS}, got {angular_convention!r}")
        self.elements = list(elements)
        self.angular_convention = angular_convention
        self.fast_angular = fast_angular
        self.compile_kernels = compile_kernels
        self.cutoff_fn = CutoffFunction(cutoff, cutoff_type, cutoff_alpha)
        by_element = per_element(functions, self.elements)
        self.functions: Dict[str, List[SymmetryFunction]] = by_element
        self.n_features = [len(by_element[e]) for e in self.elements]
        if min(self.n_features) == 0:
            empty = [e for e, n in zip(self.elements, self.n_features) if n == 0]
            raise ValueError(f"no symmetry functions centred on element(s) {empty}")
        self.width = max(self.n_features)
        self._build_tables(by_element)

    def _build_tables(self, by_element: Dict[str, List[SymmetryFunction]]) -> None:
        E = len(self.elements)
        index = {e: n for n, e in enumerate(self.elements)}
        rad_keys: List[Tuple[float, float]] = []
        ang_keys: List[Tuple[float, float, float, float]] = []
        for fs in by_element.values():
            for f in fs:
                if isinstance(f, G2) and (f.eta, f.rs) not in rad_keys:
                    rad_keys.append((f.eta, f.rs))
                if isinstance(f, G3) and (f.eta, f.rs, f.lam, f.zeta) not in ang_keys:
                    ang_keys.append((f.eta, f.rs, f.lam, f.zeta))
        ang_keys.sort(key=lambda k: k[3])  # equal ζ contiguous: one pow per run of columns
        self._zeta_runs = []
        for n, k in enumerate(ang_keys):
            if self._zeta_runs and self._zeta_runs[-1][0] == k[3]:
                self._zeta_runs[-1][2] = n + 1
            else:
                self._zeta_runs.append([k[3], n, n + 1])
        self._zeta_runs = [(int(z) if float(z).is_integer() else z, a, b) for z, a, b in self._zeta_runs]
        n_rad = E * len(rad_keys)  # radial slot columns per atom
        sel = torch.zeros(E, self.width, dtype=torch.long)  # (E, W) slot column of each feature
        pref = torch.zeros(E, self.width, dtype=torch.float64)  # (E, W) prefactor (0 = padding)
        for e, fs in by_element.items():
            for col, f in enumerate(fs):
                if isinstance(f, G2):
                    sel[index[e], col] = index[f.neighbor] * len(rad_keys) + rad_keys.index((f.eta, f.rs))
                    pref[index[e], col] = 1.0
                else:
                    a, b = sorted(index[n] for n in f.neighbors)
                    u = ang_keys.index((f.eta, f.rs, f.lam, f.zeta))
                    sel[index[e], col] = n_rad + (a * E + b) * len(ang_keys) + u
                    same = f.neighbors[0] == f.neighbors[1]
                    pref[index[e], col] = 2.0 ** (1.0 - f.zeta) * (2.0 if same and self.angular_convention == "ordered" else 1.0)
        self.n_rad_keys = len(rad_keys)
        self.n_ang_keys = len(ang_keys)
        self.register_buffer("feature_slot", sel, persistent=False)
        self.register_buffer("feature_prefactor", pref, persistent=False)
        self.register_buffer("rad_eta", torch.tensor([k[0] for k in rad_keys], dtype=torch.float64), persistent=False)
        self.register_buffer("rad_rs", torch.tensor([k[1] for k in rad_keys], dtype=torch.float64), persistent=False)
        eta, rs, lam, zeta = (torch.tensor([k[n] for k in ang_keys], dtype=torch.float64) for n in range(4))
        for name, value in (("ang_eta", eta), ("ang_rs", rs), ("ang_lam", lam), ("ang_zeta", zeta)):
            self.register_buffer(name, value, persistent=False)
        self.ang_rs_zero = bool((rs == 0).all())
        self.ang_zeta_int = [int(z) for z in zeta.tolist()] if bool((zeta == zeta.round()).all()) else None
        # which (centre, j-element, k-element) combinations carry at least one G3 (skip the others)
        used = torch.zeros(E, E, E, dtype=torch.bool)
        for e, fs in by_element.items():
            for f in fs:
                if isinstance(f, G3):
                    a, b = sorted(index[n] for n in f.neighbors)
                    used[index[e], a, b] = used[index[e], b, a] = True
        self.register_buffer("triplet_used", used.reshape(-1), persistent=False)
        self.triplet_list = [(c, a, b) for c in range(E) for a in range(E) for b in range(a, E) if bool(used[c, a, b])]
        # per element triplet: the angular columns its functions use, and their runs of equal ζ
        self.triplet_columns = {}
        for c, a, b in self.triplet_list:
            cols = sorted({ang_keys.index((f.eta, f.rs, f.lam, f.zeta)) for f in by_element[self.elements[c]]
                           if isinstance(f, G3) and sorted(index[n] for n in f.neighbors) == [a, b]})
            runs = []
            for n, u in enumerate(cols):
                z = ang_keys[u][3]
                z = int(z) if float(z).is_integer() else z
                if runs and runs[-1][0] == z:
                    runs[-1][2] = n + 1
                else:
                    runs.append([z, n, n + 1])
            self.triplet_columns[(c, a, b)] = (cols, [tuple(r) for r in runs])

    @property
    def cutoff(self) -> torch.Tensor:
        """r_c in Å (0-dim tensor)."""
        return self.cutoff_fn.cutoff

    def forward(self, species: torch.Tensor, r_ij: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor) -> torch.Tensor:
        """Raw symmetry functions.

        Args:
            species: (N,) element index of each atom (0..E-1).
            r_ij: (P, 3) vectors from atom i to neighbour j in Å (full neighbour list, both directions).
            idx_i, idx_j: (P,) atom indices of the pairs.

        Returns:
            (N, width) features in each element's documented order, zero-padded.
        """
        n_atoms = species.shape[0]
        E = len(self.elements)
        dtype = r_ij.dtype
        rc = self.cutoff_fn.cutoff.to(dtype)
        d = torch.linalg.vector_norm(r_ij, dim=-1)  # (P,)
        keep = torch.nonzero(d.detach() < rc).squeeze(-1)  # (P',)
        if keep.numel() != d.numel():
            r_ij, d, idx_i, idx_j = r_ij[keep], d[keep], idx_i[keep], idx_j[keep]
        fc = self.cutoff_fn(d)  # (P,)
        radial = self._radial(species, d, fc, idx_i, idx_j, n_atoms)  # (N, E*U_r)
        if self.fast_angular and self.ang_rs_zero and self.ang_zeta_int is not None:
            angular = self._angular_fast(species, r_ij, idx_i, idx_j, n_atoms)  # (N, E*E*U_a)
        else:
            angular = self._angular(species, r_ij, d, fc, idx_i, idx_j, n_atoms)  # (N, E*E*U_a)
        slots = torch.cat([radial, angular], dim=1)  # (N, S)
        sel = self.feature_slot[species]  # (N, W)
        g = torch.gather(slots, 1, sel) * self.feature_prefactor.to(dtype)[species]  # (N, W)
        if d.numel() == 0:  # no neighbours in range: keep the graph to the positions (forces = 0)
            g = g + 0.0 * r_ij.sum()
        return g

    def _radial(self, species, d, fc, idx_i, idx_j, n_atoms) -> torch.Tensor:
        E, U = len(self.elements), self.n_rad_keys
        out = d.new_zeros(n_atoms * E, max(U, 1))  # (N*E, U_r)
        if U == 0 or d.numel() == 0:
            return out[:, :U].reshape(n_atoms, E * U)
        eta, rs = self.rad_eta.to(d.dtype), self.rad_rs.to(d.dtype)
        x = d[:, None] - rs[None, :]  # (P, U_r)
        terms = torch.exp(-eta[None, :] * x * x) * fc[:, None]  # (P, U_r)
        out.index_add_(0, idx_i * E + species[idx_j], terms)
        return out.reshape(n_atoms, E * U)

    def _triples(self, species, r_ij, idx_i, idx_j, n_atoms, split: bool = False, cutoff: Optional[float] = None):
        """Triples with functions and r_jk < r_c: (center, p1, p2, row) each (T,), or None.

        ``cutoff`` (Å, default r_c) bounds r_jk; the MD step's Verlet list passes r_c + skin.

        Pairs are grouped by (centre, neighbour element) into padded tables; for each element
        triplet that carries functions (no H–HH in water) r_jk² of all candidate neighbour pairs is
        one batched Gram product, and a single mask keeps the valid ones (call under no_grad).
        """
        E = len(self.elements)
        sel = torch.index_select
        device = idx_i.device
        n_pairs = idx_i.shape[0]
        if n_pairs < 2:
            return None
        sj = sel(species, 0, idx_j)  # (P,)
        key = idx_i * E + sj  # (P,)
        key_sorted, order = torch.sort(key, stable=True)  # (P,)
        cnt = torch.bincount(key, minlength=n_atoms * E)  # (N*E,)
        start = torch.cumsum(cnt, 0) - cnt  # (N*E,)
        pos = torch.arange(n_pairs, device=device) - sel(start, 0, key_sorted)  # (P,) slot in group
        m = int(cnt.max())
        ptab = torch.zeros(n_atoms * E, m, dtype=torch.long, device=device)  # (N*E, M) pair index
        ptab[key_sorted, pos] = order
        vtab = r_ij.new_zeros(n_atoms * E, m, 3)  # (N*E, M, 3) pair vectors, zero-padded
        vtab[key_sorted, pos] = sel(r_ij, 0, order)
        cnt2 = cnt.view(n_atoms, E)  # (N, E)
        max_e = cnt2.max(0).values.tolist()
        rc2 = float(self.cutoff_fn.cutoff if cutoff is None else cutoff) ** 2
        parts = []
        for c, a, b in self.triplet_list:
            ma, mb = max_e[a], max_e[b]
            if ma == 0 or mb == 0 or (a == b and ma < 2):
                continue
            centers = torch.nonzero(species == c).squeeze(-1)  # (N_c,)
            if centers.numel() == 0:
                continue
            va = vtab[centers * E + a, :ma]  # (N_c, Ma, 3)
            vb = vtab[centers * E + b, :mb]  # (N_c, Mb, 3)
            r3sq = (va * va).sum(-1)[:, :, None] + (vb * vb).sum(-1)[:, None, :] - 2.0 * torch.bmm(va, vb.transpose(1, 2))
            ok = r3sq < rc2  # (N_c, Ma, Mb)
            xa = torch.arange(ma, device=device)
            yb = torch.arange(mb, device=device)
            ok &= (xa[None, :] < sel(cnt2[:, a], 0, centers)[:, None])[:, :, None]
            ok &= (yb[None, :] < sel(cnt2[:, b], 0, centers)[:, None])[:, None, :]
            if a == b:
                ok &= (xa[:, None] < yb[None, :])[None]
            n, x, y = torch.nonzero(ok).unbind(1)  # (T_c,)
            cen = sel(centers, 0, n)  # (T_c,)
            q1 = ptab[cen * E + a, x]  # (T_c,)
            q2 = ptab[cen * E + b, y]  # (T_c,)
            if cen.numel():
                parts.append(((c, a, b), cen, q1, q2, (cen * E + a) * E + b))
        if not parts:
            return None
        if split:
            return parts
        center, p1, p2, row = (torch.cat(t) for t in list(zip(*parts))[1:])
        if center.numel() == 0:
            return None
        return center, p1, p2, row

    def _angular_fast(self, species, r_ij, idx_i, idx_j, n_atoms) -> torch.Tensor:
        E, U = len(self.elements), self.n_ang_keys
        with torch.no_grad():
            parts = self._triples(species, r_ij.detach(), idx_i, idx_j, n_atoms, split=True)
        slots = r_ij.new_zeros(n_atoms * E * E, U) + 0.0 * r_ij.sum()  # (N*E*E, U_a)
        for combo, _, p1, p2, row in parts or []:
            cols, runs = self.triplet_columns[combo]
            part = _AngularTerms.apply(r_ij, p1, p2, row, n_atoms * E * E, self, cols, runs)  # (N*E*E, U_c)
            slots = slots.index_add(1, torch.tensor(cols, device=r_ij.device), part)
        return slots.reshape(n_atoms, E * E * U)

    def _angular(self, species, r_ij, d, fc, idx_i, idx_j, n_atoms) -> torch.Tensor:
        E, U = len(self.elements), self.n_ang_keys
        out = d.new_zeros(n_atoms * E * E, max(U, 1))  # (N*E*E, U_a)
        if U == 0 or d.numel() < 2:
            return out[:, :U].reshape(n_atoms, E * E * U)
        center, p1, p2 = neighbor_pairs_of_centers(idx_i, n_atoms)  # (T,) each
        sel = torch.index_select
        sj = sel(species, 0, idx_j)  # (P,) neighbour element per pair
        ej, ek = sel(sj, 0, p1), sel(sj, 0, p2)  # (T,)
        combo = (sel(species, 0, center) * E + ej) * E + ek  # (T,)
        used = torch.nonzero(sel(self.triplet_used, 0, combo)).squeeze(-1)  # (T1,) triplets with functions
        center, p1, p2, ej, ek = (sel(t, 0, used) for t in (center, p1, p2, ej, ek))
        v1, v2 = sel(r_ij, 0, p1), sel(r_ij, 0, p2)  # (T1, 3)
        v3 = v2 - v1  # (T1, 3) r_jk
        r3sq = (v3 * v3).sum(-1)  # (T1,)
        rc = self.cutoff_fn.cutoff.to(d.dtype)
        ok = torch.nonzero(r3sq.detach() < rc * rc).squeeze(-1)  # (T,) r_jk inside the cutoff
        if ok.numel() == 0:
            return out[:, :U].reshape(n_atoms, E * E * U)
        center, p1, p2, v1, v2, r3sq, ej, ek = (sel(t, 0, ok) for t in (center, p1, p2, v1, v2, r3sq, ej, ek))
        a = torch.minimum(ej, ek)
        b = torch.maximum(ej, ek)
        r1, r2 = sel(d, 0, p1), sel(d, 0, p2)  # (T,)
        r3 = torch.sqrt(r3sq)  # (T,)
        fcp = sel(fc, 0, p1) * sel(fc, 0, p2) * self.cutoff_fn(r3)  # (T,)
        cos = (v1 * v2).sum(-1) / (r1 * r2)  # (T,)
        dtype = d.dtype
        eta = self.ang_eta.to(dtype)
        if self.ang_rs_zero:
            s = r1 * r1 + r2 * r2 + r3sq  # (T,)
            expo = torch.exp(-eta[None, :] * s[:, None])  # (T, U_a)
        else:
            rs = self.ang_rs.to(dtype)[None, :]
            x1, x2, x3 = r1[:, None] - rs, r2[:, None] - rs, r3[:, None] - rs  # (T, U_a)
            expo = torch.exp(-eta[None, :] * (x1 * x1 + x2 * x2 + x3 * x3))  # (T, U_a)
        base = (1.0 + self.ang_lam.to(dtype)[None, :] * cos[:, None]).clamp(min=0.0)  # (T, U_a)
        ang = self._power(base)  # (T, U_a)
        terms = expo * ang * fcp[:, None]  # (T, U_a)
        out.index_add_(0, (center * E + a) * E + b, terms)
        return out.reshape(n_atoms, E * E * U)

    def _power(self, base: torch.Tensor) -> torch.Tensor:
        """(1 + λ cos)^ζ per column (ζ constant per column; integer powers are computed exactly)."""
        if self.ang_zeta_int is None:
            return torch.pow(base, self.ang_zeta.to(base.dtype)[None, :])
        zetas = self.ang_zeta_int
        if all(z == 1 for z in zetas):
            return base
        return torch.cat([base[:, a:b] if z == 1 else torch.pow(base[:, a:b], z) for z, a, b in self._zeta_runs], dim=1)


def _angular_forward_math(v1, v2, eta, lam, cutoff_fn, runs):
    """Per-triple terms (T, U) and what the gradient needs, from r_ij = v1 and r_ik = v2 (T, 3)."""
    v3 = v2 - v1  # (T, 3)
    r1 = torch.linalg.vector_norm(v1, dim=-1)  # (T,)
    r2 = torch.linalg.vector_norm(v2, dim=-1)  # (T,)
    r3 = torch.linalg.vector_norm(v3, dim=-1)  # (T,)
    f1, df1 = cutoff_fn.value_and_derivative(r1)
    f2, df2 = cutoff_fn.value_and_derivative(r2)
    f3, df3 = cutoff_fn.value_and_derivative(r3)
    cos = (v1 * v2).sum(-1) / (r1 * r2)  # (T,)
    s = r1 * r1 + r2 * r2 + r3 * r3  # (T,)
    expo = torch.exp(s[:, None] * (-eta)[None, :])  # (T, U)
    base = (cos[:, None] * lam[None, :] + 1.0).clamp(min=0.0)  # (T, U)
    ang = _power_runs(base, runs)  # (T, U)
    fcp = f1 * f2 * f3  # (T,)
    terms = expo * ang * fcp[:, None]  # (T, U)
    return terms, v3, r1, r2, r3, f1, f2, f3, df1, df2, df3, cos, expo, base, ang


def _power_runs(base, runs):
    """(T, U) base^ζ per column (columns grouped in runs of equal integer ζ)."""
    if all(z == 1 for z, _, _ in runs):
        return base
    return torch.cat([base[:, a:b] if z == 1 else torch.pow(base[:, a:b], z) for z, a, b in runs], dim=1)


def _angular_backward_math(q, v1, v2, v3, r1, r2, r3, f1, f2, f3, df1, df2, df3, cos, base, ang, eta, lam, runs):
    """grad r_ij, r_ik (T, 3) each from q = grad[row] · exp(−η s) (T, U); linear in q."""
    ga = q * ang  # (T, U)
    fcp = f1 * f2 * f3  # (T,)
    c_f = ga.sum(1)  # (T,) coefficient of dF
    c_s = (ga * eta[None, :]).sum(1) * fcp  # (T,) coefficient of −ds
    parts = []
    for z, a, b in runs:  # coefficient of dcos: Σ_u q_u ζ_u λ_u base_u^(ζ_u − 1) · F
        if z == 1:
            parts.append((q[:, a:b] * lam[None, a:b]).sum(1))
        else:
            pw = base[:, a:b] if z == 2 else torch.pow(base[:, a:b], z - 1)
            parts.append((q[:, a:b] * pw * (z * lam[None, a:b])).sum(1))
    c_cos = parts[0]
    for part in parts[1:]:
        c_cos = c_cos + part
    c_cos = c_cos * fcp
    u1, u2, u3 = v1 / r1[:, None], v2 / r2[:, None], v3 / r3[:, None]  # (T, 3)
    h3 = (c_f * f1 * f2 * df3)[:, None] * u3 - (2.0 * c_s)[:, None] * v3  # (T, 3) terms through r_jk
    cc1 = c_cos / r1
    cc2 = c_cos / r2
    g1 = (c_f * f2 * df1 * f3 - cc1 * cos - 2.0 * c_s * r1)[:, None] * u1 + cc1[:, None] * u2 - h3  # (T, 3)
    g2 = (c_f * f1 * df2 * f3 - cc2 * cos - 2.0 * c_s * r2)[:, None] * u2 + cc2[:, None] * u1 + h3  # (T, 3)
    return g1, g2


_COMPILED: dict = {}


def _maybe_compiled(fn, enabled: bool):
    """``torch.compile(fn, dynamic=True)`` once per process when ``enabled`` (needs a C++ compiler)."""
    if not enabled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class _AngularTerms(torch.autograd.Function):
    """Narrow G3 slot sums with a hand-written gradient (r_s = 0, integer ζ).

    forward: ``r_ij`` (P, 3) → slots (R, U_c) for the columns ``cols`` of one element triplet: Σ over triples (rows) of
    exp(−η s) (1 + λ cos)^ζ f_c(r_ij) f_c(r_ik) f_c(r_jk), s = r_ij² + r_ik² + r_jk².
    backward: grad (R, U_a) → grad r_ij (P, 3), written with differentiable torch ops that are linear
    in the incoming gradient, so forces can be trained (``create_graph=True``: gradients of forces
    and stress w.r.t. the weights are exact). Second derivatives w.r.t. positions (Hessians) are not
    provided by this path (use ``fast_angular=False``). With ``sf.compile_kernels`` the element-wise
    parts run through ``torch.compile`` (forward, and backward when no graph is being built).
    """

    @staticmethod
    def forward(ctx, r_ij, p1, p2, row, n_rows, sf, cols, runs):
        v1, v2 = torch.index_select(r_ij, 0, p1), torch.index_select(r_ij, 0, p2)  # (T, 3)
        idx = torch.tensor(cols, device=r_ij.device)
        eta = sf.ang_eta.to(r_ij.dtype)[idx]  # (U_c,)
        lam = sf.ang_lam.to(r_ij.dtype)[idx]  # (U_c,)
        fwd = _maybe_compiled(_angular_forward_math, sf.compile_kernels)
        terms, *saved = fwd(v1, v2, eta, lam, sf.cutoff_fn, runs)
        out = r_ij.new_zeros(n_rows, terms.shape[1]).index_add_(0, row, terms)  # (R, U)
        ctx.save_for_backward(p1, p2, row, v1, v2, eta, lam, *saved)
        ctx.runs = runs
        ctx.compile_kernels = sf.compile_kernels
        ctx.n_pairs = r_ij.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        p1, p2, row, v1, v2, eta, lam, v3, r1, r2, r3, f1, f2, f3, df1, df2, df3, cos, expo, base, ang = ctx.saved_tensors
        q = torch.index_select(grad, 0, row) * expo  # (T, U)
        bwd = _maybe_compiled(_angular_backward_math, ctx.compile_kernels and not torch.is_grad_enabled())
        g1, g2 = bwd(q, v1, v2, v3, r1, r2, r3, f1, f2, f3, df1, df2, df3, cos, base, ang, eta, lam, ctx.runs)
        out = g1.new_zeros(ctx.n_pairs, 3).index_add(0, p1, g1).index_add(0, p2, g2)  # (P, 3)
        return out, None, None, None, None, None, None, None
