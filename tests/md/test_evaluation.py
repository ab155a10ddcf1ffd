"""Model evaluation conventions without MD: minimum image, neighbor lists, forces and virial vs
finite differences on a triclinic cell, i-PI units/cell order, the ASE calculator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units

from ekf_plugin.evaluation import ModelEvaluator, neighbor_pairs
from ekf_plugin.md.pes import AtomicUnitsModel, ModelError

from ._toy import toy_model, water_box

TRICLINIC = np.array([[6.2, 0.0, 0.0], [1.5, 6.0, 0.0], [0.7, -1.1, 5.8]])  # Å, rows


@pytest.fixture(scope="module")
def model():
    return toy_model(cutoff=4.0)


@pytest.fixture(scope="module")
def system():
    z, r, _ = water_box(2, seed=3)
    return z, r, TRICLINIC


@pytest.fixture(scope="module")
def evaluator(model):
    return ModelEvaluator(model)


def test_unwrapped_positions_give_the_same_result(evaluator, system):
    z, r, h = system
    moved = r.copy()
    moved[::2] += np.array([1, -2, 3]) @ h  # whole lattice translations of half the atoms
    moved[1::3] -= np.array([0, 5, -1]) @ h
    a, b = evaluator(z, r, h), evaluator(z, moved, h)
    assert b.energy == pytest.approx(a.energy, abs=1e-10)
    np.testing.assert_allclose(b.forces, a.forces, atol=1e-10)
    np.testing.assert_allclose(b.virial, a.virial, atol=1e-9)


@pytest.mark.parametrize("method", ["ase", "torch"])
def test_neighbor_lists_agree_with_matscipy(system, method):
    z, r, h = system
    r = r + np.array([0.3, -7.0, 13.0])  # atoms outside the cell
    ref = neighbor_pairs(r, h, np.ones(3, bool), 4.0, "matscipy")
    got = neighbor_pairs(r, h, np.ones(3, bool), 4.0, method)
    key = lambda i, j, o: sorted(zip(i.tolist(), j.tolist(), np.round(o, 6).tolist()))  # noqa: E731
    assert len(ref[0]) > 0
    assert key(*got) == key(*ref)
    d = np.linalg.norm(r[ref[1]] - r[ref[0]] + ref[2], axis=1)
    assert d.max() < 4.0


def test_small_cell_counts_several_images(model):
    """Cutoff larger than half the box: pairs with several images of the same atom."""
    z = np.array([8, 1])
    r = np.array([[0.0, 0.0, 0.0], [0.9, 0.3, 0.1]])
    h = np.eye(3) * 3.0
    i, j, off = neighbor_pairs(r, h, np.ones(3, bool), 4.0, "matscipy")
    assert np.sum((i == 0) & (j == 0)) == 6  # the six nearest images of atom 0 at 3 Å
    res = ModelEvaluator(model)(z, r, h)
    assert np.isfinite(res.energy)


def test_forces_match_finite_differences(evaluator, system):
    z, r, h = system
    res = evaluator(z, r, h)
    d = 1e-5
    for k, c in [(0, 0), (5, 1), (17, 2)]:
        rp, rm = r.copy(), r.copy()
        rp[k, c] += d
        rm[k, c] -= d
        fd = -(evaluator(z, rp, h).energy - evaluator(z, rm, h).energy) / (2 * d)
        assert res.forces[k, c] == pytest.approx(fd, rel=1e-6, abs=1e-7)


def test_virial_is_minus_strain_derivative_on_triclinic_cell(evaluator, system):
    """W_ab = −∂E/∂ε_ab with positions and cell rows deformed as x → (1 + ε) x."""
    z, r, h = system
    res = evaluator(z, r, h)
    d = 1e-6
    for a, b in [(0, 0), (1, 1), (2, 2), (0, 1), (2, 0), (1, 2)]:
        eps = np.zeros((3, 3))
        eps[a, b] = d
        ep = evaluator(z, r @ (np.eye(3) + eps).T, h @ (np.eye(3) + eps).T).energy
        em = evaluator(z, r @ (np.eye(3) - eps).T, h @ (np.eye(3) - eps).T).energy
        fd = -(ep - em) / (2 * d)
        assert res.virial[a, b] == pytest.approx(fd, rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(res.virial, res.virial.T)
    volume = abs(np.linalg.det(h))
    np.testing.assert_allclose(res.virial, -volume * 0.5 * (res.stress + res.stress.T), rtol=1e-12)


def test_float32_is_close_to_float64(model, system):
    z, r, h = system
    e64 = ModelEvaluator(model, dtype=torch.float64)(z, r, h)
    e32 = ModelEvaluator(toy_model(cutoff=4.0), dtype=torch.float32)(z, r, h)
    assert e32.energy == pytest.approx(e64.energy, rel=1e-4)
    np.testing.assert_allclose(e32.forces, e64.forces, atol=1e-3)


def test_ipi_units_and_cell_columns(tmp_path, model, system, evaluator):
    """i-PI sends h with lattice vectors as columns, in Bohr; we answer in Hartree units."""
    z, r, h = system
    template = tmp_path / "t.xyz"
    Atoms(numbers=z, positions=r, cell=h, pbc=True).write(template)
    pes = AtomicUnitsModel(str(template), model, threads=1)
    h_ipi = h.T / units.Bohr  # columns, Bohr
    energy, forces, virial, extras = pes(h_ipi, r / units.Bohr)
    ref = evaluator(z, r, h)
    assert energy == pytest.approx(ref.energy / units.Hartree, rel=1e-12)
    np.testing.assert_allclose(forces, ref.forces * units.Bohr / units.Hartree, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(virial, ref.virial / units.Hartree, rtol=1e-10, atol=1e-14)
    # a transposed cell is a different crystal: the test above can tell (a cubic box could not)
    wrong, *_ = pes(h / units.Bohr, r / units.Bohr)
    assert abs(wrong - energy) > 1e-6


def test_pes_refuses_wrong_atom_count(tmp_path, model, system):
    z, r, h = system
    template = tmp_path / "t.xyz"
    Atoms(numbers=z, positions=r, cell=h, pbc=True).write(template)
    pes = AtomicUnitsModel(str(template), model)
    with pytest.raises(ModelError, match="i-PI sent 9 atoms but the template has 24"):
        pes(h.T / units.Bohr, r[:9] / units.Bohr)


def test_pes_refuses_non_finite_results(tmp_path, model, system):
    z, r, h = system
    template = tmp_path / "t.xyz"
    Atoms(numbers=z, positions=r, cell=h, pbc=True).write(template)
    pes = AtomicUnitsModel(str(template), model)
    bad = r.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ModelError, match="non-finite positions"):
        pes(h.T / units.Bohr, bad / units.Bohr)


def test_pes_class_loads_through_ipi(tmp_path, model, system):
    """The PES file as i-PI loads it (``-m custom -P``, ``<ffdirect>``), with an extra ``verbosity``."""
    from ipi.pes import load_pes

    import ekf_plugin.md.pes as pes_module

    z, r, h = system
    template = tmp_path / "t.xyz"
    Atoms(numbers=z, positions=r, cell=h, pbc=True).write(template)
    path = tmp_path / "m.pt"
    torch.save(model, path)
    cls = load_pes("custom", pes_module.__file__)
    driver = cls(template=str(template), model=str(path), threads=1, verbosity=1)
    energy, forces, virial, extras = driver(h.T / units.Bohr, r / units.Bohr)
    ref = ModelEvaluator(model)(z, r, h)
    assert energy == pytest.approx(ref.energy / units.Hartree, rel=1e-12)
    assert forces.shape == (len(z), 3)


def test_ase_calculator_forces_and_stress(model, system):
    from ekf_plugin import calculator

    z, r, h = system
    atoms = Atoms(numbers=z, positions=r, cell=h, pbc=True)
    atoms.calc = calculator(model)
    e = atoms.get_potential_energy()
    assert atoms.get_potential_energy(force_consistent=True) == e
    num_stress = atoms.calc.calculate_numerical_stress(atoms, d=1e-6)
    np.testing.assert_allclose(atoms.get_stress(), num_stress, atol=1e-7)
    num_forces = atoms.calc.calculate_numerical_forces(atoms, d=1e-5)
    np.testing.assert_allclose(atoms.get_forces(), num_forces, atol=1e-6)


def test_calculator_without_pbc(model, system):
    from ekf_plugin import calculator

    z, r, _ = system
    atoms = Atoms(numbers=z[:6], positions=r[:6])
    atoms.calc = calculator(model)
    f = atoms.get_forces()
    assert np.abs(f.sum(0)).max() < 1e-10  # no external field: momentum conserved
    from ase.calculators.calculator import PropertyNotImplementedError

    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_bad_arguments_are_clear(model):
    with pytest.raises(ValueError, match="unknown neighbor list"):
        ModelEvaluator(model, neighbor_list="fast")
    with pytest.raises(ValueError, match="does not exist"):
        ModelEvaluator("/nonexistent/model")
    with pytest.raises(ValueError, match="atomic numbers"):
        ModelEvaluator(model)([1, 1], np.zeros((3, 3)), np.eye(3) * 5)


def test_evaluator_refuses_empty_and_non_finite_input(evaluator, system):
    from ekf_plugin import calculator

    z, r, h = system
    with pytest.raises(ValueError, match="no atoms"):
        evaluator([], np.zeros((0, 3)), h)
    bad = r.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite positions .* atom\(s\) \[5\]"):
        evaluator(z, bad, h)
    with pytest.raises(ValueError, match="non-finite cell"):
        evaluator(z, r, h * np.inf)
    same = r.copy()
    same[7] = same[2]
    with pytest.raises(ValueError, match="atoms 2 and 7 are at the same position"):
        evaluator(z, same, h)
    atoms = Atoms(numbers=z, positions=bad, cell=h, pbc=True)
    atoms.calc = calculator(evaluator.model)
    with pytest.raises(ValueError, match="non-finite positions"):
        atoms.get_potential_energy()
    empty = Atoms(cell=h, pbc=True)
    empty.calc = calculator(evaluator.model)
    with pytest.raises(ValueError, match="no atoms"):
        empty.get_potential_energy()


def test_evaluator_refuses_non_finite_output(system):
    from ekf_plugin.evaluation import NonFiniteOutputError

    z, r, h = system
    broken = toy_model(cutoff=4.0)
    with torch.no_grad():
        broken.output_modules[0].outnet[-1].bias.fill_(float("nan"))  # the energy read-out
    with pytest.raises(NonFiniteOutputError, match="non-finite energy, forces or stress"):
        ModelEvaluator(broken)(z, r, h)


def test_pes_checks_template_elements_and_first_frame(tmp_path, system):
    """A template with an element the model lacks is refused at start; species in the wrong order
    (H and O swapped, same count) are caught on i-PI's first frame, before any MD step."""
    from ekf_plugin.models import water_bpnn

    z, r, h = system
    bpnn = water_bpnn(seed=0, dtype=torch.float64)
    carbon = tmp_path / "c.xyz"
    Atoms(numbers=np.where(z == 8, 6, z), positions=r, cell=h, pbc=True).write(carbon)
    with pytest.raises(ValueError, match=r"element\(s\) \['C'\] that the model does not know"):
        AtomicUnitsModel(str(carbon), bpnn)
    swapped = z.reshape(-1, 3)[:, ::-1].reshape(-1)  # H H O per molecule, but i-PI sends O H H
    template = tmp_path / "swapped.xyz"  # a consistent structure of its own: passes the start-up check
    Atoms(numbers=swapped, positions=r.reshape(-1, 3, 3)[:, ::-1].reshape(-1, 3), cell=h, pbc=True).write(template)
    pes = AtomicUnitsModel(str(template), bpnn)
    with pytest.raises(ModelError, match="have no C/N/O neighbour within 1.3"):
        pes(h.T / units.Bohr, r / units.Bohr)
    ok = tmp_path / "ok.xyz"
    Atoms(numbers=z, positions=r, cell=h, pbc=True).write(ok)
    energy, *_ = AtomicUnitsModel(str(ok), bpnn)(h.T / units.Bohr, r / units.Bohr)
    assert np.isfinite(energy)


def test_pes_refuses_template_with_bohr_read_as_angstrom(tmp_path, model, system):
    z, r, h = system
    squeezed = tmp_path / "bohr_as_a.xyz"
    Atoms(numbers=z, positions=r * units.Bohr, cell=h * units.Bohr, pbc=True).write(squeezed)
    with pytest.raises(ValueError, match=r"of the covalent radii \(median.*Å read as Bohr"):
        AtomicUnitsModel(str(squeezed), model)


def test_idle_cores_leaves_the_busy_cores_to_the_other_processes(monkeypatch):
    """Batch analysis (`ekf-plugin fisher`, `errors`, `select`) takes the cores the load average leaves idle:
    threads beyond them spin against the other processes (a 20x slowdown measured beside two trainings)."""
    import os

    from ekf_plugin.evaluation import idle_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    for load, want in ((0.2, 4), (1.6, 2), (2.4, 2), (3.9, 1), (11.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert idle_cores() == want, load
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert idle_cores(cap=3) == 3

    def no_load():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert idle_cores() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own choice stands
    assert idle_cores() == 3
