"""The trained revPBE0-D3 models committed under examples/water_revpbe0/models load and evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

MODELS = sorted((Path(__file__).resolve().parents[1] / "examples" / "water_revpbe0" / "models").glob("*.pt"))


def test_both_optimizers_are_committed():
    names = {p.stem.split("_")[0] for p in MODELS}
    assert {"ekf", "adam"} <= names


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_model_loads_safely_and_gives_finite_energy_forces_stress(path):
    import ekf_plugin
    from ekf_plugin.demo import water_box

    assert torch.load(path, weights_only=True)["format"]  # our format: no pickled code
    atoms = water_box(n_side=2, density=1.0, seed=3)
    atoms.calc = ekf_plugin.calculator(path)
    energy = atoms.get_potential_energy()  # eV
    forces = atoms.get_forces()  # eV/Å
    stress = atoms.get_stress()  # eV/Å³
    assert np.isfinite(energy) and forces.shape == (24, 3) and stress.shape == (6,)
    assert np.all(np.isfinite(forces)) and np.all(np.isfinite(stress))
    assert abs(forces.sum(axis=0)).max() < 1e-6 * max(1.0, abs(forces).max()) * 24  # Newton's third law
