"""ekf_plugin.model_errors: per-frame errors, the energy error's trend with volume and the pressure bias."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator

from ekf_plugin.model_errors import density_factor, energy_volume_trend, error_summary, frame_errors


def test_trend_of_an_error_linear_in_volume_is_the_pressure_error():
    rng = np.random.default_rng(0)
    v = rng.uniform(8.0, 14.0, 200)  # Å³/atom (liquid water: ~10)
    slope = -2.0e-4  # eV/Å³: the error falls with volume, so the model pushes the box outward
    e = 0.019 + slope * v  # eV/atom
    t = energy_volume_trend(v, e)
    assert t["energy_error_volume_slope_meV_per_A3"] == pytest.approx(slope * 1e3)
    assert t["pressure_bias_bar"] == pytest.approx(-slope / units.bar)  # ΔP = −d(ΔE)/dV
    assert t["pressure_bias_bar"] == pytest.approx(320.4, rel=1e-3)  # 2e-4 eV/Å³ = 32.04 MPa
    assert t["energy_error_mean_meV_per_atom"] == pytest.approx(1e3 * e.mean())
    assert t["energy_error_volume_r"] == pytest.approx(-1.0)
    assert t["energy_error_std_about_trend_meV_per_atom"] == pytest.approx(0.0, abs=1e-9)
    assert t["pressure_bias_err_bar"] == pytest.approx(0.0, abs=1e-6)


def _frame(n_atoms: int, box: float, energy: float, forces=None) -> Atoms:
    rng = np.random.default_rng(n_atoms)
    atoms = Atoms("H" * n_atoms, positions=rng.uniform(0, box, (n_atoms, 3)), cell=[box] * 3, pbc=True)
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((n_atoms, 3)) if forces is None else forces)
    return atoms


def test_a_model_that_adds_c_times_volume_has_pressure_bias_minus_c():
    """Model = reference + c·V (total energy): its pressure −dE/dV differs from the reference's by −c exactly,
    whatever the number of atoms of each frame; forces are untouched, so the force RMSE is zero."""
    c = 3.0e-4  # eV/Å³
    frames = [_frame(n, box, energy=-1.0 * n) for n, box in ((96, 10.0), (150, 12.5), (200, 12.0), (300, 15.5))]

    def model(numbers, positions, cell, pbc=None):  # the reference plus c·V
        volume = abs(np.linalg.det(cell))
        return SimpleNamespace(energy=-1.0 * len(numbers) + c * volume, forces=np.zeros((len(numbers), 3)))

    err = frame_errors(model, frames)
    assert err.volume == pytest.approx([f.get_volume() / len(f) for f in frames])
    s = error_summary(err)
    assert s["pressure_bias_bar"] == pytest.approx(-c / units.bar, rel=1e-9) and s["pressure_bias_bar"] < 0
    assert s["forces_rmse_meV_per_A"] == 0.0 and s["frames"] == 4
    assert s["energy_rmse_meV_per_atom"] == pytest.approx(1e3 * np.sqrt(np.mean((c * err.volume) ** 2)))
    assert density_factor(s["pressure_bias_bar"]) > 1  # it compresses the liquid


def test_force_errors_per_frame_and_over_all_components():
    frames = [_frame(4, 6.0, 0.0, forces=np.zeros((4, 3))), _frame(8, 7.0, 0.0, forces=np.ones((8, 3)))]

    def model(numbers, positions, cell, pbc=None):
        return SimpleNamespace(energy=0.0, forces=np.full((len(numbers), 3), 0.5))

    err = frame_errors(model, frames)
    assert err.forces_rmse == pytest.approx([0.5, 0.5]) and err.forces.shape == (36,)
    s = error_summary(err)  # two volumes only: no trend, and it says why
    assert s["forces_rmse_meV_per_A"] == pytest.approx(500.0) and s["pressure_bias_bar"] is None
    assert "different volumes" in s["pressure_bias_note"]


def test_standard_error_of_the_bias_follows_the_noise():
    rng = np.random.default_rng(2)
    v = rng.uniform(8.0, 14.0, 400)
    sigma = 5e-3  # eV/atom of scatter about the trend
    biases, errs = [], []
    for _ in range(200):
        t = energy_volume_trend(v, 1e-4 * v + rng.normal(0, sigma, v.size))
        biases.append(t["pressure_bias_bar"]), errs.append(t["pressure_bias_err_bar"])
    expected = sigma / np.sqrt(((v - v.mean()) ** 2).sum()) / units.bar  # the least-squares slope's s.e.
    assert np.mean(errs) == pytest.approx(expected, rel=0.05)
    assert np.std(biases) == pytest.approx(expected, rel=0.15)  # the spread over repeats is what it claims
    assert np.mean(biases) == pytest.approx(-1e-4 / units.bar, abs=3 * expected / np.sqrt(200))


def test_a_constant_offset_gives_no_pressure_bias():
    t = energy_volume_trend(np.linspace(9.0, 13.0, 30), np.full(30, 0.035))
    assert abs(t["pressure_bias_bar"]) < 1e-6 and t["energy_error_mean_meV_per_atom"] == pytest.approx(35.0)
    assert t["energy_error_volume_r"] == 0.0


@pytest.mark.parametrize("v, e", [(np.ones(10), np.arange(10.0)), (np.arange(2.0), np.arange(2.0)),
                                  (np.arange(5.0), np.arange(4.0)), (np.array([1.0, np.nan, 3.0]), np.arange(3.0))])
def test_trend_needs_periodic_frames_at_different_volumes(v, e):
    with pytest.raises(ValueError, match="different volumes"):
        energy_volume_trend(v, e)


def test_density_factor_is_linear_response_of_water():
    assert density_factor(0.0) == 1.0
    assert density_factor(4179.0) == pytest.approx(0.8286, abs=1e-4)  # Adam 659 k's bias: ran 0.733 / 0.92 = 0.797
    assert density_factor(-1000.0, compressibility_per_bar=1e-4) == pytest.approx(np.exp(0.1))


def test_no_frames_is_an_error():
    with pytest.raises(ValueError, match="no frames"):
        frame_errors(lambda *a, **k: None, [])
