"""PaperScheduleTask logs ``val_pressure_bias_bar`` from the validation frames: the pressure error that the energy
errors imply (ekf_plugin.model_errors), for periodic frames at more than one density only."""

from __future__ import annotations

import pytest
import schnetpack.properties as props
import torch
from ase import units

from ekf_plugin.models import water_bpnn
from ekf_plugin.training import PaperScheduleTask


def _batch(boxes, n_atoms=6, periodic=True):
    """A validation batch of len(boxes) structures (cubic cells of side ``box`` Å), reference energy −1 eV/atom."""
    b = len(boxes)
    return {props.n_atoms: torch.full((b,), n_atoms), props.idx_m: torch.arange(b).repeat_interleave(n_atoms),
            props.cell: torch.stack([torch.eye(3) * L for L in boxes]).double(),
            props.pbc: torch.full((b, 3), periodic), "energy": torch.full((b,), -1.0 * n_atoms).double()}


@pytest.fixture
def task(monkeypatch):
    t = PaperScheduleTask(water_bpnn(stress=False), [], seed=0)
    logged = {}
    monkeypatch.setattr(t, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    t.logged = logged
    return t


def test_energy_error_c_times_volume_logs_pressure_bias_minus_c(task):
    c = 2.0e-4  # eV/Å³: the model's total energy is the reference's plus c·V
    task.on_validation_epoch_start()
    for boxes in ([8.0, 9.0], [10.0, 11.5, 12.0]):  # two validation batches, five densities
        batch = _batch(boxes)
        volume = torch.tensor(boxes).double() ** 3
        task._collect_volume_error(batch, batch["energy"] + c * volume)
    task._log_pressure_bias()
    assert task.logged["val_pressure_bias_bar"] == pytest.approx(-c / units.bar, rel=1e-9)
    assert task._val_volume_error == []  # consumed: the next validation starts empty


def test_non_finite_energies_are_left_out(task):
    task.on_validation_epoch_start()
    batch = _batch([8.0, 9.0, 10.0, 11.0])
    energy = batch["energy"] + 1e-4 * torch.tensor([8.0, 9.0, 10.0, 11.0]).double() ** 3
    energy[1] = float("nan")
    task._collect_volume_error(batch, energy)
    task._log_pressure_bias()
    assert task.logged["val_pressure_bias_bar"] == pytest.approx(-1e-4 / units.bar, rel=1e-9)


@pytest.mark.parametrize("boxes, periodic", [([10.0, 10.0, 10.0], True),  # one density: no trend
                                             ([8.0, 10.0, 12.0], False),  # molecules: no volume
                                             ([8.0, 10.0], True)])  # fewer than 3 frames
def test_no_bias_without_periodic_frames_at_several_densities(task, boxes, periodic):
    task.on_validation_epoch_start()
    batch = _batch(boxes, periodic=periodic)
    task._collect_volume_error(batch, batch["energy"] + 0.01)
    task._log_pressure_bias()
    assert "val_pressure_bias_bar" not in task.logged
