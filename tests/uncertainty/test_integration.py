"""σ through the ASE calculator (calc.results) and the i-PI client's extras (AtomicUnitsModel + monitor)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError
from ase.io import write

from ekf_plugin import calculator
from ekf_plugin.models import save_model
from ekf_plugin.uncertainty import PredictiveUncertainty, default_path, save_covariance
from tests.bpnn._systems import water_pair
from tests.uncertainty._models import random_covariance, tiny_bpnn


@pytest.fixture()
def model_file(tmp_path):
    model = tiny_bpnn()
    path = save_model(model, tmp_path / "model.pt")
    save_covariance(random_covariance(model, seed=3), default_path(path))
    return path


def test_ase_calculator_puts_the_uncertainty_into_results(model_file):
    atoms = water_pair(pbc=True)
    atoms.calc = calculator(model_file, covariance=True, compile=False)
    energy = atoms.get_potential_energy()
    ref = PredictiveUncertainty(tiny_bpnn(), default_path(model_file)).atoms(atoms, forces=True)
    assert energy == pytest.approx(ref.energy, rel=1e-10)
    assert atoms.calc.results["energy_uncertainty"] == pytest.approx(ref.energy_std, rel=1e-10)
    assert "forces_uncertainty" not in atoms.calc.results  # forces σ only on request (3N rows)
    f = atoms.calc.get_property("forces_uncertainty", atoms)
    np.testing.assert_allclose(f, ref.forces_std_atoms, rtol=1e-9)
    np.testing.assert_allclose(atoms.calc.results["forces_uncertainty_components"], ref.forces_std, rtol=1e-9)
    plain = water_pair(pbc=True)
    plain.calc = calculator(model_file, compile=False)
    assert plain.get_potential_energy() == pytest.approx(energy, rel=1e-12)
    assert "energy_uncertainty" not in plain.calc.results
    with pytest.raises(PropertyNotImplementedError, match="covariance"):
        plain.calc.get_property("energy_uncertainty", plain)


def test_ipi_extras_carry_the_uncertainty_every_n_calls(model_file, tmp_path):
    from ekf_plugin.md.ipi_client import run_client
    from ekf_plugin.md.pes import BOHR, AtomicUnitsModel
    from ekf_plugin.uncertainty.monitor import UncertaintyMonitor

    atoms = water_pair(pbc=True)
    template = tmp_path / "init.xyz"
    write(str(template), atoms)
    pes = AtomicUnitsModel(str(template), str(model_file), threads=1)
    assert json.loads(pes(atoms.cell.array.T / BOHR, atoms.positions / BOHR)[3]) == {}
    pes.monitor = UncertaintyMonitor(pes.evaluator, default_path(model_file), every=2)
    extras = [json.loads(pes(atoms.cell.array.T / BOHR, atoms.positions / BOHR)[3]) for _ in range(3)]
    assert [e["ekf_uncertainty_call"] for e in extras] == [0, 0, 2]
    ref = PredictiveUncertainty(tiny_bpnn(), default_path(model_file)).atoms(atoms)
    assert extras[0]["ekf_sigma_E_eV"] == pytest.approx(ref.energy_std, rel=1e-9)
    # a missing covariance stops the client before it connects (exit 1, one line)
    default_path(model_file).unlink()
    assert run_client(str(model_file), str(template), unix="no-such-socket", uncertainty_every=5,
                      connect_timeout=0.1) == 1


def test_ipi_command_needs_uncertainty_every_for_its_options(model_file, capsys):
    from ekf_plugin.cli import main

    assert main(["ipi", "--model", str(model_file), "--template", "x.xyz", "--unix", "none",
                 "--uncertainty-threshold", "5"]) == 1
    assert "need --uncertainty-every" in capsys.readouterr().out
