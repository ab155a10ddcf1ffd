"""UncertaintyMonitor: σ every N calls, same keys on every call, warning above the threshold."""

from __future__ import annotations

import json

import pytest

from ekf_plugin.evaluation import ModelEvaluator
from ekf_plugin.uncertainty.monitor import UncertaintyMonitor
from tests.bpnn._systems import water_pair
from tests.uncertainty._models import random_covariance, tiny_bpnn


def test_every_n_calls_with_threshold_warning():
    model = tiny_bpnn()
    cov = random_covariance(model)
    ev = ModelEvaluator(model, fast_path=False)
    messages = []
    mon = UncertaintyMonitor(ev, cov, every=3, forces=True, threshold=1e-6, log_fn=messages.append)
    atoms = water_pair(pbc=True)
    out = []
    for k in range(7):
        atoms.positions[0, 0] += 0.01 * k
        out.append(mon(atoms.numbers, atoms.positions, atoms.cell.array))
    assert [o["ekf_uncertainty_call"] for o in out] == [0, 0, 0, 3, 3, 3, 6]
    assert all(set(o) == set(out[0]) for o in out) and json.dumps(out[-1])
    ref = mon.unc.atoms(atoms, forces=True)
    assert out[-1]["ekf_sigma_E_eV"] == pytest.approx(ref.energy_std, rel=1e-12)
    assert out[-1]["ekf_sigma_E_per_atom_meV"] == pytest.approx(1e3 * ref.energy_std / 6, rel=1e-12)
    assert out[-1]["ekf_sigma_F_max_eV_per_A"] == pytest.approx(ref.forces_std_atoms.max(), rel=1e-12)
    assert len(messages) == 3 and "outside the region" in messages[0] and mon.warnings == 3
    quiet = UncertaintyMonitor(ev, cov, every=1, threshold=1e9, log_fn=messages.append)
    assert "ekf_sigma_F_max_eV_per_A" not in quiet(atoms.numbers, atoms.positions, atoms.cell.array)
    assert len(messages) == 3
    with pytest.raises(ValueError):
        UncertaintyMonitor(ev, cov, every=0)
