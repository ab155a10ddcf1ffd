"""Data readers and the spktrain data module (units converted to Å / eV)."""

from __future__ import annotations

import numpy as np
import pytest

from ekf_plugin.data import frames_to_db, read_extxyz, read_frames
from ekf_plugin.units import BOHR, HARTREE
from tests.helpers import shared_data_path


def _extxyz():
    return shared_data_path("revpbe0-d3-cheng2019", "dataset_1400_au.extxyz")


def test_extxyz_converted_to_angstrom_and_ev():
    path = _extxyz()
    frames = read_extxyz(path, index=":2")
    with open(path) as fh:
        n = int(fh.readline())
        header = fh.readline()
        first = fh.readline().split()
    energy = float(header.split("TotEnergy=")[1].split()[0])
    assert len(frames) == 2 and len(frames[0]) == n == 192
    assert frames[0].get_potential_energy() == pytest.approx(energy * HARTREE)
    np.testing.assert_allclose(frames[0].positions[0], np.array(first[1:4], float) * BOHR)
    np.testing.assert_allclose(frames[0].get_forces()[0], np.array(first[4:7], float) * HARTREE / BOHR)
    assert frames[0].cell.lengths()[0] == pytest.approx(float(header.split('Lattice="')[1].split()[0]) * BOHR)
    assert frames[0].get_chemical_symbols()[:3] == ["O", "H", "H"] and frames[0].pbc.all()


def test_frames_to_atoms_db(tmp_path):
    import ekf_plugin.compat  # noqa: F401
    from schnetpack.data import ASEAtomsData

    frames = read_frames(shared_data_path("n2p2-h2o-rpbe-d3", "input.data"), max_frames=3)
    frames_to_db(frames, tmp_path / "x.db")
    data = ASEAtomsData(str(tmp_path / "x.db"))
    assert len(data) == 3 and data.units["energy"] == "eV" and data.units["forces"] == "eV/Ang"
    item = data[1]
    assert item["energy"].item() == pytest.approx(frames[1].get_potential_energy())
    np.testing.assert_allclose(item["_positions"].numpy(), frames[1].positions)


def test_water_datamodule_prepares_database(tmp_path):
    from ekf_plugin.data import WaterDataModule

    dm = WaterDataModule(datapath=str(tmp_path / "w.db"), source=str(_extxyz()), max_frames=4, batch_size=2,
                         num_train=2, num_val=1, num_test=1, num_workers=0, split_file=str(tmp_path / "split.npz"))
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["energy"].shape == (2,) and batch["_idx_i"].numel() > 0
    assert batch["energy"].mean().item() < -29000  # eV: ~ -1103 Ha per frame


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="EKF_PLUGIN_SHARED_DATA"):
        read_frames(tmp_path / "nope.extxyz")
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(ValueError, match="unknown data format"):
        read_frames(tmp_path / "a.txt", fmt="cif")
