"""Symmetry functions: formula vs a brute-force loop, derivatives, invariances, edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ekf_plugin.bpnn import BehlerParrinello, G2, G3
from ekf_plugin.models import water_bpnn

from ._systems import converter, randomise_scaling, water_cluster, water_pair


def _brute_force(atoms, functions, rc, ordered=False):
    """Literal double loops over neighbours (minimum image not needed: cluster, no cell)."""
    pos = atoms.positions
    sym = atoms.get_chemical_symbols()
    fc = lambda r: math.tanh(1 - r / rc) ** 3 if r < rc else 0.0
    out = []
    for i in range(len(atoms)):
        row = []
        for f in (g for g in functions if g.center == sym[i]):
            val = 0.0
            others = [j for j in range(len(atoms)) if j != i]
            if isinstance(f, G2):
                for j in others:
                    if sym[j] == f.neighbor:
                        r = np.linalg.norm(pos[j] - pos[i])
                        val += math.exp(-f.eta * (r - f.rs) ** 2) * fc(r)
            else:
                pairs = itertools.permutations(others, 2) if ordered else itertools.combinations(others, 2)
                for j, k in pairs:
                    want = list(f.neighbors)
                    if ordered:
                        ok = [sym[j], sym[k]] == want
                    else:
                        ok = sorted([sym[j], sym[k]]) == sorted(want)
                    if not ok:
                        continue
                    rij, rik = pos[j] - pos[i], pos[k] - pos[i]
                    a, b, c = np.linalg.norm(rij), np.linalg.norm(rik), np.linalg.norm(pos[k] - pos[j])
                    cos = rij @ rik / (a * b)
                    val += (2 ** (1 - f.zeta) * (1 + f.lam * cos) ** f.zeta
                            * math.exp(-f.eta * (a * a + b * b + c * c)) * fc(a) * fc(b) * fc(c))
            row.append(val)
        out.append(row)
    return out


@pytest.mark.parametrize("convention", ["n2p2", "ordered"])
def test_raw_functions_match_brute_force(convention):
    atoms = water_cluster(3)
    functions = [G2("O", "H", 0.5, 0.3), G2("O", "O", 0.1), G2("H", "O", 0.2, 1.0), G2("H", "H", 0.05),
                 G3("O", ("H", "H"), 0.05, 1.0, 1.0), G3("O", ("H", "O"), 0.03, -1.0, 4.0),
                 G3("H", ("H", "O"), 0.07, -1.0, 2.0), G3("H", ("O", "O"), 0.01, 1.0, 1.0),
                 G3("O", ("O", "O"), 0.02, 1.0, 1.0)]
    rc = 5.0
    rep = BehlerParrinello(["H", "O"], functions, cutoff=rc, angular_convention=convention).double()
    model = water_bpnn(symmetry_functions=functions, cutoff=rc, dtype=torch.float64)
    model.representation = rep
    batch = converter(model)(atoms)
    rij = batch["_positions"][batch["_idx_j"]] - batch["_positions"][batch["_idx_i"]] + batch["_offsets"]
    g = rep.raw_features({"_atomic_numbers": batch["_atomic_numbers"], "_Rij": rij,
                          "_idx_i": batch["_idx_i"], "_idx_j": batch["_idx_j"]})
    ref = _brute_force(atoms, functions, rc, ordered=convention == "ordered")
    for i, row in enumerate(ref):
        np.testing.assert_allclose(g[i, : len(row)].numpy(), row, rtol=1e-10, atol=1e-14)
        assert torch.all(g[i, len(row):] == 0)


def _energy_forces_stress(model, atoms):
    out = model(converter(model)(atoms))
    return out["energy"].item(), out["forces"].detach().numpy(), out["stress"].detach().numpy()[0]


@pytest.fixture(scope="module")
def model():
    m = water_bpnn(dtype=torch.float64, seed=3)
    randomise_scaling(m)
    return m


def test_forces_and_stress_match_finite_differences(model):
    atoms = water_pair(pbc=True)
    _, forces, stress = _energy_forces_stress(model, atoms)
    h = 1e-5
    fd = np.zeros_like(forces)
    for i, k in itertools.product(range(len(atoms)), range(3)):
        e = []
        for sign in (1, -1):
            a = atoms.copy()
            a.positions[i, k] += sign * h
            e.append(_energy_forces_stress(model, a)[0])
        fd[i, k] = -(e[0] - e[1]) / (2 * h)
    np.testing.assert_allclose(forces, fd, atol=1e-8)
    sfd = np.zeros((3, 3))
    for i, j in itertools.product(range(3), range(3)):
        e = []
        for sign in (1, -1):
            eps = np.eye(3)
            eps[i, j] += sign * h
            a = atoms.copy()
            a.set_cell(atoms.cell[:] @ eps, scale_atoms=True)
            e.append(_energy_forces_stress(model, a)[0])
        sfd[i, j] = (e[0] - e[1]) / (2 * h) / atoms.get_volume()
    np.testing.assert_allclose(stress, sfd, atol=1e-9)
    assert np.abs(forces).max() > 1e-3 and np.abs(stress).max() > 1e-5  # not trivially zero


def test_rotation_translation_permutation_invariance(model):
    atoms = water_cluster(3, seed=4)
    e0, f0, _ = _energy_forces_stress(model, atoms)
    rot = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T + [1.3, -2.0, 0.7]
    e1, f1, _ = _energy_forces_stress(model, moved)
    assert e1 == pytest.approx(e0, abs=1e-10)
    np.testing.assert_allclose(f1, f0 @ rot.T, atol=1e-10)
    perm = np.random.default_rng(2).permutation(len(atoms))
    e2, f2, _ = _energy_forces_stress(model, atoms[perm])
    assert e2 == pytest.approx(e0, abs=1e-10)
    np.testing.assert_allclose(f2, f0[perm], atol=1e-10)


def test_periodic_translation_invariance(model):
    atoms = water_pair(pbc=True)
    e0, f0, s0 = _energy_forces_stress(model, atoms)
    shifted = atoms.copy()
    shifted.positions += [2.0, 3.1, -1.4]
    shifted.wrap()
    e1, f1, s1 = _energy_forces_stress(model, shifted)
    assert e1 == pytest.approx(e0, abs=1e-10)
    np.testing.assert_allclose(f1, f0, atol=1e-10)
    np.testing.assert_allclose(s1, s0, atol=1e-12)


def test_smooth_at_cutoff(model):
    """Energy and force of an O–O dimer go continuously to the isolated-atom values at r_c."""
    from ase import Atoms

    rc = float(model.representation.cutoff)
    e_far, _, _ = _energy_forces_stress(model, Atoms("OO", positions=[[0, 0, 0], [rc + 0.5, 0, 0]]))
    for delta in (1e-2, 1e-3):
        e, f, _ = _energy_forces_stress(model, Atoms("OO", positions=[[0, 0, 0], [rc - delta, 0, 0]]))
        assert abs(e - e_far) < 50 * delta**3  # f_c ~ (δ/r_c)^3
        assert np.abs(f).max() < 50 * delta**2
    r = torch.tensor([rc - 1e-4, rc, rc + 1e-3], dtype=torch.float64, requires_grad=True)
    fc = model.representation.sf.cutoff_fn(r)
    (grad,) = torch.autograd.grad(fc.sum(), r)
    assert fc[1:].abs().max() == 0 and grad[1:].abs().max() == 0
    assert fc[0] < 1e-11 and grad[0].abs() < 1e-7


def test_isolated_atom_has_zero_features_and_forces(model):
    from ase import Atoms

    atoms = Atoms("O", positions=[[0, 0, 0]])
    batch = converter(model)(atoms)
    assert batch["_idx_i"].numel() == 0
    out = model(batch)
    assert torch.isfinite(out["energy"]).all()
    assert torch.all(out["forces"] == 0)
    rij = torch.zeros(0, 3, dtype=torch.float64)
    g = model.representation.raw_features({"_atomic_numbers": batch["_atomic_numbers"], "_Rij": rij,
                                           "_idx_i": batch["_idx_i"], "_idx_j": batch["_idx_j"]})
    assert g.shape == (1, 30) and torch.all(g == 0)


def test_batched_equals_one_by_one(model):
    from schnetpack.data.loader import _atoms_collate_fn

    systems = [water_pair(pbc=True), water_cluster(2, seed=5), water_pair(pbc=True, seed=7)]
    conv = converter(model)
    single = [model(conv(a)) for a in systems]
    items = []
    for a in systems:
        b = conv(a)
        b = {k: (v.squeeze(0) if k in ("_cell",) else v) for k, v in b.items()}
        items.append(b)
    batch = conv(systems)
    out = model(batch)
    np.testing.assert_allclose(out["energy"].detach().numpy(), [s["energy"].item() for s in single], rtol=1e-12)
    np.testing.assert_allclose(out["forces"].detach().numpy(), np.concatenate([s["forces"].detach().numpy() for s in single]),
                               atol=1e-12)
    np.testing.assert_allclose(out["stress"][0].detach().numpy(), single[0]["stress"][0].detach().numpy(), atol=1e-14)


def test_unknown_element_raises_naming_it(model):
    from ase import Atoms

    atoms = Atoms("OHC", positions=[[0, 0, 0], [0.96, 0, 0], [0, 1.5, 0]])
    with pytest.raises(ValueError, match=r"\bC\b.*not built for"):
        model(converter(model)(atoms))


def test_ordered_convention_doubles_same_element_triplets():
    atoms = water_cluster(2)
    functions = [G3("O", ("H", "H"), 0.05, 1.0, 1.0), G3("O", ("H", "O"), 0.05, 1.0, 1.0), G2("H", "O", 0.1)]
    vals = {}
    for conv in ("n2p2", "ordered"):
        rep = BehlerParrinello(["H", "O"], functions, cutoff=5.0, angular_convention=conv).double()
        pos = torch.tensor(atoms.positions)
        i, j = zip(*[(a, b) for a in range(len(atoms)) for b in range(len(atoms)) if a != b])
        i, j = torch.tensor(i), torch.tensor(j)
        vals[conv] = rep.raw_features({"_atomic_numbers": torch.tensor(atoms.numbers), "_Rij": pos[j] - pos[i],
                                       "_idx_i": i, "_idx_j": j})
    o = torch.tensor(atoms.numbers) == 8
    torch.testing.assert_close(vals["ordered"][o, 0], 2 * vals["n2p2"][o, 0])
    torch.testing.assert_close(vals["ordered"][o, 1], vals["n2p2"][o, 1])


def test_fast_angular_gradient_matches_autograd_including_force_training():
    """The hand-written triple gradient gives the same forces, stress and d(force loss)/d(weights)."""
    atoms = water_pair(pbc=True)
    model = water_bpnn(dtype=torch.float64, seed=11)
    randomise_scaling(model, seed=4)
    batch = converter(model)(atoms)
    results = {}
    for fast in (True, False):
        model.representation.sf.fast_angular = fast
        model.train()  # forces with create_graph=True, as in training
        model.zero_grad()
        out = model(dict(batch))
        loss = (out["forces"] ** 2).sum() + out["energy"].sum() ** 2 + (out["stress"] ** 2).sum() * 1e4
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        results[fast] = (out["energy"].detach(), out["forces"].detach(), out["stress"].detach(), grads)
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert results[True][3].abs().max() > 0
