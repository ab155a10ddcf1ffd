"""examples/water_revpbe0/virial_check.py: two models' pressure difference from their virials at the same frames."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests.helpers import REPO
from tests.test_model_errors_cli import MODELS, four_frames  # noqa: F401  (fixture)

spec = importlib.util.spec_from_file_location("virial_check", REPO / "examples" / "water_revpbe0" / "virial_check.py")
virial_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(virial_check)


def test_virial_difference_of_two_models_and_of_a_model_with_itself(four_frames, tmp_path):  # noqa: F811
    from ase import units

    from ekf_plugin.data import frames_to_db, read_frames
    from ekf_plugin.evaluation import ModelEvaluator

    frames = read_frames(four_frames, length_unit="Bohr", energy_unit="Hartree")
    frames_to_db(frames, tmp_path / "four.db")
    np.savez(tmp_path / "split.npz", train_idx=np.array([0]), val_idx=np.array([1, 2, 3]))
    ekf, adam = MODELS / "session8" / "ekf_lr1e-3_s0_ef0.1_thr_500k.pt", MODELS / "session9" / "adam_lr1e-3_s0_ef0.1_thr_659k.pt"
    bias = {"ekf": {"pressure_bias_bar": -32.0}, "adam": {"pressure_bias_bar": 4179.0}}
    (tmp_path / "bias.json").write_text(json.dumps(bias))
    assert virial_check.main([str(ekf), str(adam), str(ekf), "--labels", "ekf", "adam", "ekf_again", "--db",
                              str(tmp_path / "four.db"), "--split", str(tmp_path / "split.npz"), "--bias",
                              str(tmp_path / "bias.json"), "--json", str(tmp_path / "v.json")]) == 0
    out = json.loads((tmp_path / "v.json").read_text())
    assert out["frames"] == 3 and out["base"] == "ekf"
    assert out["differences"]["ekf_again"]["virial_bar"] == pytest.approx(0.0, abs=1e-6)
    assert out["differences"]["adam"]["energy_trend_bar"] == pytest.approx(4211.0)
    # the pressure of each model is −tr(σ)/3 of its own stress at the frames (σ in eV/Å³ → bar)
    direct = [np.mean([-np.trace(ModelEvaluator(str(m))(a.numbers, a.positions, a.cell.array, pbc=a.pbc).stress) / 3
                       for a in frames[1:]]) / units.bar for m in (ekf, adam)]
    assert out["mean_virial_pressure_bar"]["adam"] == pytest.approx(direct[1], rel=1e-9)
    assert out["differences"]["adam"]["virial_bar"] == pytest.approx(direct[1] - direct[0], rel=1e-9)
