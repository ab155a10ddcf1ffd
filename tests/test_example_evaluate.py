"""examples/water_revpbe0/evaluate.py: the energy error's trend with volume and the pressure bias it implies."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from ase import units

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("water_evaluate", REPO / "examples" / "water_revpbe0" / "evaluate.py")
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)


def test_trend_of_an_error_linear_in_volume_is_the_pressure_error():
    rng = np.random.default_rng(0)
    v = rng.uniform(8.0, 14.0, 200)  # Å³/atom (liquid water: ~10)
    slope = -2.0e-4  # eV/Å³: the error falls with volume, so the model pushes the box outward
    e = 0.019 + slope * v  # eV/atom
    t = evaluate.energy_volume_trend(v, e)
    assert t["energy_error_volume_slope_meV_per_A3"] == pytest.approx(slope * 1e3)
    assert t["pressure_bias_bar"] == pytest.approx(-slope / units.bar)  # ΔP = −d(ΔE)/dV
    assert t["pressure_bias_bar"] == pytest.approx(320.4, rel=1e-3)  # 2e-4 eV/Å³ = 32.04 MPa
    assert t["energy_error_mean_meV_per_atom"] == pytest.approx(1e3 * e.mean())
    assert t["energy_error_volume_r"] == pytest.approx(-1.0)
    assert t["energy_error_std_about_trend_meV_per_atom"] == pytest.approx(0.0, abs=1e-9)


def test_the_bias_is_the_pressure_difference_of_two_energy_functions():
    """Model = reference + c·V (total energy): its pressure −dE/dV differs from the reference's by −c exactly;
    the per-atom error c·V/N = c·v has slope c, whatever the number of atoms of each frame."""
    rng = np.random.default_rng(1)
    c = 3.0e-4  # eV/Å³
    n_atoms = rng.integers(96, 400, 50)
    volume = n_atoms * rng.uniform(9.0, 12.0, 50)  # Å³
    e = c * volume / n_atoms + rng.normal(0, 1e-5, 50)  # eV/atom, with noise
    t = evaluate.energy_volume_trend(volume / n_atoms, e)
    assert t["pressure_bias_bar"] == pytest.approx(-c / units.bar, rel=0.02)
    assert t["pressure_bias_bar"] < 0  # error rising with volume: the model compresses the liquid


def test_a_constant_offset_gives_no_pressure_bias():
    v = np.linspace(9.0, 13.0, 30)
    t = evaluate.energy_volume_trend(v, np.full(30, 0.035))
    assert abs(t["pressure_bias_bar"]) < 1e-6 and t["energy_error_mean_meV_per_atom"] == pytest.approx(35.0)


@pytest.mark.parametrize("v, e", [(np.ones(10), np.arange(10.0)), (np.arange(2.0), np.arange(2.0)),
                                  (np.arange(5.0), np.arange(4.0))])
def test_trend_needs_frames_at_different_volumes(v, e):
    with pytest.raises(ValueError, match="different volumes"):
        evaluate.energy_volume_trend(v, e)
