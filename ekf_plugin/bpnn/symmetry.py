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

from typing import Dict, List, Sequence, Tuple

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
    ) -> None:
        super().__init__()
        if angular_convention not in ANGULAR_CONVENTIONS:
            raise ValueError(f"angular_convention must be one of {ANGULAR_CONVENTIONS}, got {angular_convention!r}")
        self.elements = list(elements)
        self.angular_convention = angular_convention
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
