"""∂G/∂r columns from the local pairs and triangles equal the full autograd Jacobian of the features and the
previous implementation (per-label triples with forward-mode tangents, kept below as the reference)."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import pytest
import torch
from ase import Atoms

import schnetpack.properties as props
from ekf_plugin.bpnn import G2, G3, BehlerParrinello, feature_derivatives
from ekf_plugin.bpnn.representation import pair_vectors, species_of
from ekf_plugin.bpnn.symmetry import SymmetryFunctions
from ekf_plugin.models import water_bpnn

from ._systems import converter, randomise_scaling, water_cluster, water_pair

CUSTOM = [  # r_s ≠ 0, non-integer ζ, all element triplets incl. H–HH (Å)
    G2("O", "H", 0.5, 0.9), G2("H", "O", 0.3, 1.2), G2("H", "H", 0.2),
    G3("O", ("H", "H"), 0.1, 1.0, 1.5, 0.4), G3("O", ("H", "O"), 0.05, -1.0, 2.0),
    G3("H", ("H", "H"), 0.02, 1.0, 3.0), G3("H", ("O", "O"), 0.03, -1.0, 1.0, 0.2),
]


def _full_jacobian(rep, batch):
    """(3N, N, W) ∂s/∂r of the scaled features by autograd over all positions."""
    species = rep.species_table[batch[props.Z]]

    def scaled(r):
        s = dict(batch)
        s[props.R] = r
        s[props.Rij] = pair_vectors(s)
        return rep(s)["scalar_representation"]  # (N, W)

    jac = torch.autograd.functional.jacobian(scaled, batch[props.R])  # (N, W, N, 3)
    assert species.numel() == jac.shape[0]
    return jac.permute(2, 3, 0, 1).reshape(-1, jac.shape[0], jac.shape[1])


@pytest.mark.parametrize("system", ["periodic_pair", "cluster"])
@pytest.mark.parametrize("convention", ["n2p2", "ordered"])
@pytest.mark.parametrize("functions", ["water_paper", "custom"])
def test_columns_equal_autograd_jacobian(system, convention, functions):
    # the 5.5 Å box is smaller than 2 r_c: atoms see several periodic images of the same neighbour
    atoms = water_pair() if system == "periodic_pair" else water_cluster(4)
    sf = CUSTOM if functions == "custom" else functions
    cutoff_type = "cos" if functions == "custom" else "tanhu"
    rep = BehlerParrinello(("H", "O"), sf, cutoff=6.35, cutoff_type=cutoff_type, angular_convention=convention).double()
    model = water_bpnn(dtype=torch.float64)
    model.representation = rep
    randomise_scaling(model)
    batch = converter(model)(atoms)
    batch[props.Rij] = pair_vectors(batch)
    n = len(atoms)
    ref = _full_jacobian(rep, batch)  # (3N, N, W)
    flat = torch.arange(3 * n)
    cols = rep.feature_columns(batch, flat // 3, flat % 3)  # (3N, N, W)
    assert float(ref.abs().max()) > 1e-2
    torch.testing.assert_close(cols, ref, rtol=1e-10, atol=1e-12)


def test_columns_of_an_atom_without_neighbours_are_zero():
    atoms = water_cluster(2)
    atoms.positions[3:] += 20.0  # second molecule far away
    model = water_bpnn(dtype=torch.float64)
    batch = converter(model)(atoms)
    batch[props.Rij] = pair_vectors(batch)
    cols = model.representation.feature_columns(batch, torch.tensor([0, 4]), torch.tensor([1, 2]))  # (2, N, W)
    assert float(cols[0, :3].abs().max()) > 0  # atom 0 moves its own molecule's features
    assert float(cols[0, 3:].abs().max()) == 0.0  # but not the far molecule's
    assert float(cols[1, :3].abs().max()) == 0.0


def test_radial_only_functions():
    rep = BehlerParrinello(("H", "O"), [G2("O", "H", 0.5), G2("H", "O", 0.3), G2("H", "H", 0.2)], cutoff=6.35).double()
    model = water_bpnn(dtype=torch.float64)
    model.representation = rep
    batch = converter(model)(water_pair())
    batch[props.Rij] = pair_vectors(batch)
    flat = torch.arange(3 * len(water_pair()))
    torch.testing.assert_close(rep.feature_columns(batch, flat // 3, flat % 3), _full_jacobian(rep, batch))


def _water_box(n_side: int = 3, spacing: float = 3.1, seed: int = 1) -> Atoms:
    """n_side³ randomly oriented, jittered water molecules in a cubic box of n_side·spacing Å (periodic)."""
    rng = np.random.default_rng(seed)
    pos = []
    for x in range(n_side):
        for y in range(n_side):
            for z in range(n_side):
                q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
                mol = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]) @ q.T
                pos += list(mol + spacing * np.array([x, y, z]) + rng.normal(scale=0.3, size=3))
    box = n_side * spacing
    return Atoms("OH2" * n_side**3, positions=pos, cell=[box, box, box], pbc=True)


def _columns_both(rep, batch, atoms, components):
    species = species_of(batch[props.Z], rep.species_table, rep.elements)
    args = (rep.sf, species, batch[props.Rij], batch[props.idx_i], batch[props.idx_j], atoms, components)
    return feature_derivatives.feature_columns(*args), reference_columns(*args)


@pytest.mark.parametrize("n_side", [2, 3])
@pytest.mark.parametrize("functions", ["water_paper", "custom"])
def test_columns_equal_the_reference_implementation_on_a_water_box(functions, n_side):
    # 24 atoms in a 6.2 Å box (images of the label atom itself in range) or 81 in a 9.3 Å box (< 2 r_c:
    # several images of a neighbour in range)
    sf = CUSTOM if functions == "custom" else functions
    rep = BehlerParrinello(("H", "O"), sf, cutoff=6.35, cutoff_type="cos" if functions == "custom" else "tanhu").double()
    model = water_bpnn(dtype=torch.float64)
    model.representation = rep
    batch = converter(model)(_water_box(n_side))
    batch[props.Rij] = pair_vectors(batch)
    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(3 * 3 * n_side**3, generator=g)[:10]
    new, ref = _columns_both(rep, batch, flat // 3, flat % 3)
    assert float(ref.abs().max()) > 1e-2
    torch.testing.assert_close(new, ref, rtol=1e-10, atol=1e-12)


def test_unsorted_neighbour_list_gives_the_same_columns():
    model = water_bpnn(dtype=torch.float64)
    rep = model.representation
    batch = converter(model)(water_cluster(3))
    perm = torch.randperm(batch[props.idx_i].numel(), generator=torch.Generator().manual_seed(0))
    for key in (props.idx_i, props.idx_j, props.offsets):
        batch[key] = batch[key][perm]
    batch[props.Rij] = pair_vectors(batch)
    flat = torch.arange(27)
    new, ref = _columns_both(rep, batch, flat // 3, flat % 3)
    torch.testing.assert_close(new, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shuffle", [False, True])
def test_columns_from_positions_form_only_the_labels_pairs_and_equal_the_pair_vector_path(shuffle):
    """Without ``_Rij`` the columns gather the labelled atoms' pairs and form r_j − r_i + offset for those
    only: the same columns as from the full pair vectors (periodic pair with cell offsets, sorted or not)."""
    model = water_bpnn(dtype=torch.float64)
    rep = model.representation
    batch = converter(model)(water_pair(seed=2))
    if shuffle:
        perm = torch.randperm(batch[props.idx_i].numel(), generator=torch.Generator().manual_seed(1))
        for key in (props.idx_i, props.idx_j, props.offsets):
            batch[key] = batch[key][perm]
    assert bool((batch[props.offsets] != 0).any()), "pairs through the cell boundary"
    flat = torch.tensor([0, 4, 8, 11, 15, 17])
    lazy = rep.feature_columns({k: v for k, v in batch.items() if k != props.Rij}, flat // 3, flat % 3)
    full = rep.feature_columns({**batch, props.Rij: pair_vectors(batch)}, flat // 3, flat % 3)
    torch.testing.assert_close(lazy, full, rtol=0, atol=1e-14)
    assert lazy.abs().sum() > 0


INTEGER_ZETA = [  # r_s ≠ 0, integer ζ ∈ {1, 2, 3, 4}, H–HH triplets (Å): the native kernel's general case
    G2("O", "H", 0.5, 0.9), G2("H", "H", 0.2),
    G3("O", ("H", "H"), 0.1, 1.0, 4.0, 0.4), G3("O", ("H", "O"), 0.05, -1.0, 2.0),
    G3("H", ("H", "H"), 0.02, 1.0, 3.0), G3("H", ("O", "O"), 0.03, -1.0, 1.0, 0.2), G3("H", ("H", "O"), 0.03, 1.0, 1.0),
]

MANY_KEYS = [G2("O", "H", 0.5, 0.9)] + [  # 20 angular functions on H–HO, 18 side factors (η, r_s), ζ up to 16 (Å):
    # more keys and side factors than one vector of the kernel holds (16 float32 or 8 float64 lanes)
    G3("H", ("H", "O"), 0.01 * (1 + k % 9), (-1.0) ** k, float((1, 3, 5, 16)[k % 4]), 0.3 * (k // 9))
    for k in range(18)
] + [G3("H", ("H", "O"), 0.01, 1.0, 2.0), G3("H", ("H", "O"), 0.02, -1.0, 7.0), G3("O", ("H", "H"), 0.05, 1.0, 2.0)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("functions, cutoff_type", [("water_paper", "tanhu"), ("integer_zeta", "cos"), ("integer_zeta", "tanh"),
                                                    ("many_keys", "cos")])
def test_native_kernel_equals_the_torch_path(functions, cutoff_type, dtype):
    if feature_derivatives.native_module() is None:  # first use compiles (about a second; cached on disk)
        pytest.skip("no C++ toolchain for the native kernel")
    sf = {"integer_zeta": INTEGER_ZETA, "many_keys": MANY_KEYS}.get(functions, functions)
    rep = BehlerParrinello(("H", "O"), sf, cutoff=6.35, cutoff_type=cutoff_type).double()
    model = water_bpnn(dtype=torch.float64)
    model.representation = rep
    for n_side in (2, 3):
        batch = converter(model)(_water_box(n_side))
        batch[props.Rij] = pair_vectors(batch).to(dtype)
        flat = torch.randperm(3 * 3 * n_side**3, generator=torch.Generator().manual_seed(1))[:12]
        species = species_of(batch[props.Z], rep.species_table, rep.elements)
        args = (rep.sf, species, batch[props.Rij], batch[props.idx_i], batch[props.idx_j], flat // 3, flat % 3)
        assert feature_derivatives._native_supported(rep.sf, batch[props.Rij])
        torch_path = feature_derivatives.feature_columns(*args, native=False)
        native = feature_derivatives.feature_columns(*args, native=True)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        assert float(torch_path.abs().max()) > 1e-2
        torch.testing.assert_close(native, torch_path, **tol)
        if dtype == torch.float64:
            torch.testing.assert_close(native, reference_columns(*args), rtol=1e-10, atol=1e-12)
        # pair vectors formed from positions and offsets (the training path), pair list not sorted by centre
        perm = torch.randperm(batch[props.idx_i].shape[0], generator=torch.Generator().manual_seed(2))
        lazy = (rep.sf, species, None, batch[props.idx_i][perm], batch[props.idx_j][perm], flat // 3, flat % 3)
        kw = dict(positions=batch[props.R].to(dtype), offsets=batch[props.offsets][perm])
        torch.testing.assert_close(feature_derivatives.feature_columns(*lazy, native=True, **kw),
                                   feature_derivatives.feature_columns(*lazy, native=False, **kw), **tol)
        torch.testing.assert_close(feature_derivatives.feature_columns(*lazy, native=True, **kw), native, **tol)


# ---------------------------------------------------------------------------------------------------------
# Reference: the previous implementation (per-label candidate triples, forward-mode tangents per triple).


def _power_and_slope(sf: SymmetryFunctions, base: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(T, U_a) base^ζ and its derivative ζ base^(ζ−1), ζ per column (integer ζ exactly)."""
    if sf.ang_zeta_int is None:
        zeta = sf.ang_zeta.to(base.dtype)[None, :]  # (1, U_a)
        return torch.pow(base, zeta), zeta * torch.pow(base, zeta - 1.0)
    values, slopes = [], []
    for z, a, b in sf._zeta_runs:  # columns grouped by equal ζ
        x = base[:, a:b]  # (T, U_z)
        if z == 1:
            values.append(x), slopes.append(torch.ones_like(x))
        else:
            xm = x if z == 2 else torch.pow(x, z - 1)  # (T, U_z)
            values.append(xm * x), slopes.append(z * xm)
    return torch.cat(values, 1), torch.cat(slopes, 1)


def angular_term_tangents(sf: SymmetryFunctions, v1, v2, t1, t2) -> torch.Tensor:
    """(T, U_a) directional derivatives of the narrow G3 terms (before the 2^(1−ζ) prefactor).

    Args:
        v1, v2: (T, 3) r_ij and r_ik in Å; t1, t2: (T, 3) their tangents (per Å of the moved coordinate).

    term = exp(−η Σ_k (r_k − r_s)²) (1 + λ cos θ)^ζ f_c(r_ij) f_c(r_ik) f_c(r_jk), k over ij, ik, jk.
    """
    dtype = v1.dtype
    v3, t3 = v2 - v1, t2 - t1  # (T, 3) r_jk and its tangent
    r1 = torch.linalg.vector_norm(v1, dim=-1)  # (T,)
    r2 = torch.linalg.vector_norm(v2, dim=-1)  # (T,)
    r3 = torch.linalg.vector_norm(v3, dim=-1)  # (T,)
    d1, d2, d3 = (v1 * t1).sum(-1) / r1, (v2 * t2).sum(-1) / r2, (v3 * t3).sum(-1) / r3  # (T,) dr_k
    f1, g1 = sf.cutoff_fn.value_and_derivative(r1)  # (T,) each
    f2, g2 = sf.cutoff_fn.value_and_derivative(r2)
    f3, g3 = sf.cutoff_fn.value_and_derivative(r3)
    fcp = f1 * f2 * f3  # (T,)
    dfcp = g1 * d1 * f2 * f3 + f1 * g2 * d2 * f3 + f1 * f2 * g3 * d3  # (T,)
    cos = (v1 * v2).sum(-1) / (r1 * r2)  # (T,)
    dcos = ((t1 * v2).sum(-1) + (v1 * t2).sum(-1)) / (r1 * r2) - cos * (d1 / r1 + d2 / r2)  # (T,)
    eta, rs = sf.ang_eta.to(dtype)[None, :], sf.ang_rs.to(dtype)[None, :]  # (1, U_a)
    lam = sf.ang_lam.to(dtype)[None, :]  # (1, U_a)
    x1, x2, x3 = r1[:, None] - rs, r2[:, None] - rs, r3[:, None] - rs  # (T, U_a)
    expo = torch.exp(-eta * (x1 * x1 + x2 * x2 + x3 * x3))  # (T, U_a)
    dexpo_rel = -2.0 * eta * (x1 * d1[:, None] + x2 * d2[:, None] + x3 * d3[:, None])  # (T, U_a) d expo / expo
    base = (1.0 + lam * cos[:, None]).clamp(min=0.0)  # (T, U_a)
    ang, slope = _power_and_slope(sf, base)  # (T, U_a) each
    return expo * ((ang * dexpo_rel + slope * lam * dcos[:, None]) * fcp[:, None] + ang * dfcp[:, None])  # (T, U_a)


def radial_term_tangents(sf: SymmetryFunctions, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(P, U_r) directional derivatives of the radial terms exp(−η (r − r_s)²) f_c(r): v, t (P, 3) in Å."""
    d = torch.linalg.vector_norm(v, dim=-1)  # (P,)
    dd = (v * t).sum(-1) / d  # (P,) dr
    f, g = sf.cutoff_fn.value_and_derivative(d)  # (P,) each
    eta, rs = sf.rad_eta.to(v.dtype)[None, :], sf.rad_rs.to(v.dtype)[None, :]  # (1, U_r)
    x = d[:, None] - rs  # (P, U_r)
    gauss = torch.exp(-eta * x * x)  # (P, U_r)
    return gauss * (g[:, None] - 2.0 * eta * x * f[:, None]) * dd[:, None]  # (P, U_r)


def _segments(counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For groups of sizes ``counts`` (K,): group index and position in the group of every member, (Σ,) each."""
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)  # (Σ,)
    first = torch.cumsum(counts, 0) - counts  # (K,)
    pos = torch.arange(group.numel(), device=counts.device) - first[group]  # (Σ,)
    return group, pos


def _label_triples(atoms, idx_i, idx_j, n_atoms):
    """Candidate triples whose terms depend on the label's atom (module docstring).

    Returns ``(label, p1, p2, valid)``, each (T,): label index, the two pairs (same centre), and whether the
    candidate counts (each unordered pair {p1, p2} once); the r_jk cut and element filter come later.
    """
    order = torch.argsort(idx_i, stable=True)  # (P,) pairs grouped by centre
    counts = torch.bincount(idx_i, minlength=n_atoms)  # (N,)
    start = torch.cumsum(counts, 0) - counts  # (N,)
    # (A) centre = a_l: all unordered pairs of its neighbours
    c_a = counts[atoms]  # (L,)
    lab_a, t = _segments(c_a * (c_a - 1) // 2)  # (T_A,)
    m = max(int(c_a.max()) if c_a.numel() else 0, 2)
    tri = torch.tril_indices(m, m, -1, device=idx_i.device)  # (2, m(m−1)/2), rows > cols
    base = start[atoms[lab_a]]  # (T_A,)
    p1_a, p2_a = order[base + tri[1][t]], order[base + tri[0][t]]  # (T_A,)
    # (B) a_l is the neighbour j of pair q = (i → a_l), i ≠ a_l: pair q with every other pair p of i
    hit = (idx_j[None, :] == atoms[:, None]) & (idx_i[None, :] != atoms[:, None])  # (L, P)
    lab_q, q = torch.nonzero(hit, as_tuple=True)  # (Q,)
    centre_q = idx_i[q]  # (Q,)
    k, pos = _segments(counts[centre_q])  # (T_B,)
    lab_b, q_b = lab_q[k], q[k]  # (T_B,)
    p_b = order[start[centre_q[k]] + pos]  # (T_B,)
    valid_b = (p_b != q_b) & ((p_b > q_b) | (idx_j[p_b] != atoms[lab_b]))  # (T_B,) each unordered pair once
    label = torch.cat([lab_a, lab_b])  # (T,)
    p1 = torch.cat([p1_a, q_b])  # (T,)
    p2 = torch.cat([p2_a, p_b])  # (T,)
    valid = torch.cat([torch.ones_like(lab_a, dtype=torch.bool), valid_b])  # (T,)
    return label, p1, p2, valid


@torch.no_grad()
def reference_columns(
    sf: SymmetryFunctions,
    species: torch.Tensor,
    r_ij: torch.Tensor,
    idx_i: torch.Tensor,
    idx_j: torch.Tensor,
    atoms: torch.Tensor,
    components: torch.Tensor,
) -> torch.Tensor:
    """∂G_i/∂r_{a_l, α_l} of the raw symmetry functions for L (atom, component) labels.

    Args:
        sf: the symmetry functions.
        species: (N,) element index per atom.
        r_ij: (P, 3) pair vectors r_j − r_i (+ cell offset) in Å, full neighbour list (both directions).
        idx_i, idx_j: (P,) atoms of each pair.
        atoms: (L,) atom a_l of each label.
        components: (L,) Cartesian component α_l ∈ {0, 1, 2} of each label.

    Returns:
        (L, N, width) in the feature layout of :meth:`SymmetryFunctions.forward`, in feature units per Å.
    """
    n_atoms, n_labels = species.shape[0], atoms.shape[0]
    rc = float(sf.cutoff)
    inside = torch.linalg.vector_norm(r_ij, dim=-1) < rc  # (P,)
    pairs = _LabelPairs(r_ij[inside], idx_i[inside], idx_j[inside], atoms, components)
    E = len(sf.elements)
    rad = _radial_columns(sf, species, pairs, n_atoms)  # (L·N·E, U_r)
    ang = _angular_columns(sf, species, pairs, n_atoms)  # (L·N·E·E, U_a)
    rad = rad.view(n_labels, n_atoms, E * sf.n_rad_keys)  # (L, N, E·U_r)
    ang = ang.view(n_labels, n_atoms, E * E * sf.n_ang_keys)  # (L, N, E·E·U_a)
    slots = torch.cat([rad, ang], 2)  # (L, N, S)
    sel = sf.feature_slot[species].expand(n_labels, -1, -1)  # (L, N, W)
    return torch.gather(slots, 2, sel) * sf.feature_prefactor.to(r_ij.dtype)[species]  # (L, N, W)


class _LabelPairs:
    """Pairs inside the cutoff and the labels' atoms/axes, with the tangent of a pair vector under a label."""

    def __init__(self, r_ij, idx_i, idx_j, atoms, components):
        self.r_ij, self.idx_i, self.idx_j, self.atoms = r_ij, idx_i, idx_j, atoms  # (P, 3), (P,), (P,), (L,)
        self.unit = torch.eye(3, dtype=r_ij.dtype, device=r_ij.device)[components]  # (L, 3) e_α per label

    def tangent(self, label: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(K, 3) d r_ij[p] / d r_{a, α} of label ``label``: s·e_α with s = [j = a] − [i = a]."""
        a = self.atoms[label]  # (K,)
        s = (self.idx_j[p] == a).to(self.r_ij.dtype) - (self.idx_i[p] == a).to(self.r_ij.dtype)  # (K,)
        return s[:, None] * self.unit[label]  # (K, 3)


def _radial_columns(sf, species, pairs: _LabelPairs, n_atoms: int) -> torch.Tensor:
    """(L·N·E, U_r) tangents of the radial slots from the pairs with a_l as centre or neighbour."""
    E, L, U_r = len(sf.elements), pairs.atoms.shape[0], sf.n_rad_keys
    rad = pairs.r_ij.new_zeros(L * n_atoms * E, U_r)  # (L·N·E, U_r)
    a = pairs.atoms[:, None]  # (L, 1)
    lab, p = torch.nonzero((pairs.idx_i[None, :] == a) | (pairs.idx_j[None, :] == a), as_tuple=True)  # (K,)
    if U_r and p.numel():
        d_terms = radial_term_tangents(sf, pairs.r_ij[p], pairs.tangent(lab, p))  # (K, U_r)
        rows = (lab * n_atoms + pairs.idx_i[p]) * E + species[pairs.idx_j[p]]  # (K,)
        rad.index_add_(0, rows, d_terms)
    return rad


def _angular_columns(sf, species, pairs: _LabelPairs, n_atoms: int) -> torch.Tensor:
    """(L·N·E·E, U_a) tangents of the angular slots from the triples that contain a_l."""
    E, L, U_a = len(sf.elements), pairs.atoms.shape[0], sf.n_ang_keys
    ang = pairs.r_ij.new_zeros(L * n_atoms * E * E, U_a)  # (L·N·E·E, U_a)
    if not (U_a and pairs.r_ij.shape[0] >= 2 and L):
        return ang
    idx_i, idx_j, rc = pairs.idx_i, pairs.idx_j, float(sf.cutoff)
    label, p1, p2, valid = _label_triples(pairs.atoms, idx_i, idx_j, n_atoms)  # (T,) each
    sj = species[idx_j]  # (P,) neighbour element of each pair
    key = (species[idx_i] * E + sj) * E  # (P,) element-triplet key without the second neighbour
    v1, v2 = pairs.r_ij[p1], pairs.r_ij[p2]  # (T, 3)
    ok = valid & sf.triplet_used[key[p1] + sj[p2]] & (((v2 - v1) ** 2).sum(-1) < rc * rc)  # (T,)
    keep = torch.nonzero(ok).squeeze(-1)  # (T',) triples that carry terms
    label, p1, p2, v1, v2 = (x.index_select(0, keep) for x in (label, p1, p2, v1, v2))
    if label.numel():
        d_terms = angular_term_tangents(sf, v1, v2, pairs.tangent(label, p1), pairs.tangent(label, p2))  # (T', U_a)
        ej, ek = sj[p1], sj[p2]  # (T',)
        rows = ((label * n_atoms + idx_i[p1]) * E + torch.minimum(ej, ek)) * E + torch.maximum(ej, ek)  # (T',)
        ang.index_add_(0, rows, d_terms)
    return ang
