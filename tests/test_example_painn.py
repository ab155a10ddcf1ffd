"""examples/water_painn/analyze.py: validation curves of the PaiNN EKF-vs-Adam logs, one EKF/Adam pair per seed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# loaded by path under its own name: examples/water_revpbe0/analyze.py is the `analyze` other tests import
_spec = importlib.util.spec_from_file_location("water_painn_analyze", REPO / "examples" / "water_painn" / "analyze.py")
painn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(painn)


def _log(path: Path, rows) -> Path:
    """A SchNetPack CSV log: training rows without validation, validation rows with the wall clock (eV, eV/Å)."""
    lines = ["epoch,step,train_loss,val_energy_rmse,val_forces_rmse,wall_time_s"]
    for step, e, f, t in rows:
        lines.append(f"0,{step},1.0,,,")
        lines.append(f"0,{step},,{e},{f},{t}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_validation_curve_converts_to_per_atom_mev_and_counts_updates(tmp_path):
    log = _log(tmp_path / "m.csv", [(39, 1.92, 0.745, 60.0), (79, 0.96, 0.5, 120.0)])
    assert painn.validation_curve(log) == [(40, 60.0, pytest.approx(10.0), pytest.approx(745.0)),
                                           (80, 120.0, pytest.approx(5.0), pytest.approx(500.0))]


def test_pairs_are_labelled_by_seed_and_odd_lists_are_refused(tmp_path):
    a = _log(tmp_path / "a.csv", [(39, 1.92, 0.7, 60.0)])
    b = _log(tmp_path / "b.csv", [(199, 0.96, 0.6, 61.0)])
    assert list(painn.pair_curves([a, b])) == ["EKF (task=ekf)", "Adam (SchNetPack default)"]
    two = painn.pair_curves([a, b, b, a], ["0", "1"])
    assert list(two) == ["EKF (task=ekf), seed 0", "Adam (SchNetPack default), seed 0",
                         "EKF (task=ekf), seed 1", "Adam (SchNetPack default), seed 1"]
    assert two["EKF (task=ekf), seed 1"][0][0] == 200  # the second pair's EKF log is b
    with pytest.raises(SystemExit, match="pairs"):
        painn.pair_curves([a, b, a])


def test_the_figure_is_written_for_two_seeds(tmp_path, capsys):
    a = _log(tmp_path / "a.csv", [(39, 1.92, 0.7, 60.0), (79, 0.96, 0.5, 120.0)])
    b = _log(tmp_path / "b.csv", [(199, 0.96, 0.6, 61.0), (399, 0.9, 0.55, 119.0)])
    out = tmp_path / "fig.png"
    painn.main([str(a), str(b), str(a), str(b), "--seeds", "0,1", "--out", str(out)])
    assert out.stat().st_size > 10_000
    assert "EKF (task=ekf), seed 1" in capsys.readouterr().out
