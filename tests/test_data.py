"""Data readers and the spktrain data module (units converted to Å / eV)."""

from __future__ import annotations

import numpy as np
import torch
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


def test_db_frames_read_back_in_angstrom_and_ev_from_any_stored_units(tmp_path):
    """read_db_frames: what frames_to_db wrote (Å, eV) comes back with its labels, by 0-based dataset index; a
    database in Bohr/Hartree (its metadata says so) is converted; a row without the labels is refused."""
    import ekf_plugin.compat  # noqa: F401
    from schnetpack.data import ASEAtomsData

    from ekf_plugin.data import read_db_frames
    from ekf_plugin.validation import DataValidationError

    frames = read_frames(shared_data_path("n2p2-h2o-rpbe-d3", "input.data"), max_frames=3)
    frames_to_db(frames, tmp_path / "x.db")
    back = read_db_frames(tmp_path / "x.db", [2, 0])
    for got, ref in zip(back, [frames[2], frames[0]]):
        np.testing.assert_allclose(got.positions, ref.positions)
        np.testing.assert_allclose(got.cell.array, ref.cell.array)
        assert got.get_potential_energy() == pytest.approx(ref.get_potential_energy())
        np.testing.assert_allclose(got.get_forces(), ref.get_forces())
    assert len(read_db_frames(tmp_path / "x.db")) == 3
    au = ASEAtomsData.create(str(tmp_path / "au.db"), distance_unit="Bohr",
                             property_unit_dict={"energy": "Hartree", "forces": "Hartree/Bohr"})
    plain = frames[0].copy()
    plain.positions, plain.cell = frames[0].positions / BOHR, frames[0].cell.array / BOHR
    au.add_systems([{"energy": np.array([frames[0].get_potential_energy() / HARTREE]),
                     "forces": frames[0].get_forces() / (HARTREE / BOHR)}], [plain])
    (conv,) = read_db_frames(tmp_path / "au.db")
    np.testing.assert_allclose(conv.positions, frames[0].positions, rtol=1e-6)
    assert conv.get_potential_energy() == pytest.approx(frames[0].get_potential_energy(), rel=1e-6)
    np.testing.assert_allclose(conv.get_forces(), frames[0].get_forces(), rtol=1e-6, atol=1e-9)
    with pytest.raises(DataValidationError, match="no 'E'/'forces'"):
        read_db_frames(tmp_path / "x.db", [0], energy_key="E")


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


# ------------------------------------------------------------------ validation when read (demo water: Å, eV)


def _write_demo(path, n=12, edit=None):
    """Flexible-water frames (Å, eV, eV/Å) written as extxyz, after ``edit(frames)``."""
    from ase.io import write

    from ekf_plugin.demo import make_frames

    frames = make_frames(n_frames=n, seed=1)
    if edit is not None:
        edit(frames)
    write(path, frames, format="extxyz")
    return path


def _set_label(frame, energy=None, forces=None):
    from ase.calculators.singlepoint import SinglePointCalculator

    e = frame.get_potential_energy() if energy is None else energy
    f = frame.get_forces() if forces is None else forces
    frame.calc = SinglePointCalculator(frame, energy=e, forces=f)


def test_clean_data_passes_validation(tmp_path):
    frames = read_frames(_write_demo(tmp_path / "ok.extxyz"), length_unit="Angstrom", energy_unit="eV")
    assert len(frames) == 12


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda fr: _set_label(fr[7], energy=float("nan")), r"frame 7.*: non-finite energy"),
        (lambda fr: _set_label(fr[3], energy=1e12), r"frame 3: energy 4.16667e\+10 eV/atom is an outlier"),
        (lambda fr: _set_label(fr[5], forces=np.where(np.arange(24)[:, None] == 4, 1e20, fr[5].get_forces())),
         r"frame 5: a force of 1.7\d*e\+20 eV/Å is an outlier"),
        (lambda fr: _set_label(fr[2], forces=np.full((24, 3), np.inf)), r"frame 2.*: non-finite forces"),
    ],
    ids=["nan-energy", "energy-outlier", "force-outlier", "inf-forces"],
)
def test_bad_labels_are_refused_naming_file_and_frame(tmp_path, edit, message):
    from ekf_plugin.validation import DataValidationError

    path = _write_demo(tmp_path / "bad.extxyz", edit=edit)
    with pytest.raises(DataValidationError, match=rf"bad\.extxyz, {message}"):
        read_frames(path, length_unit="Angstrom", energy_unit="eV")


def test_unit_mix_up_is_refused(tmp_path):
    """An Å/eV file read with the water experiment's Bohr default (O–H 0.51 Å), and a Bohr file read as Å."""
    from ekf_plugin.validation import DataValidationError

    path = _write_demo(tmp_path / "water.extxyz")
    with pytest.raises(DataValidationError, match=r"water\.extxyz, frame 0 \(read as Bohr/Hartree\): .*unit you said"):
        read_frames(path)  # defaults: Bohr, Hartree

    def to_bohr(frames):
        for a in frames:
            e, f = a.get_potential_energy(), a.get_forces()
            a.set_cell(a.cell.array / BOHR, scale_atoms=True)
            _set_label(a, energy=e, forces=f)

    bohr = _write_demo(tmp_path / "bohr.extxyz", edit=to_bohr)
    with pytest.raises(DataValidationError, match=r"frame 0 .*: 16 of 16 H atoms .* have no C/N/O neighbour"):
        read_frames(bohr, length_unit="Angstrom", energy_unit="eV")


def test_empty_frame_and_unknown_element_are_refused():
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from ekf_plugin.data import validate_frames
    from ekf_plugin.validation import DataValidationError

    empty = Atoms(cell=[5, 5, 5], pbc=True)
    empty.calc = SinglePointCalculator(empty, energy=0.0, forces=np.zeros((0, 3)))
    with pytest.raises(DataValidationError, match="src, frame 0: no atoms"):
        validate_frames([empty], "src")
    ghost = Atoms("XH", positions=[[0, 0, 0], [1.0, 0, 0]])
    ghost.calc = SinglePointCalculator(ghost, energy=-1.0, forces=np.zeros((2, 3)))
    with pytest.raises(DataValidationError, match=r"src, frame 0: unknown element\(s\) \['X'\]"):
        validate_frames([ghost], "src")


def test_database_is_refused_when_source_units_or_frames_change(tmp_path):
    """The database records its source (path, SHA-256), format, units and max_frames."""
    from ekf_plugin.data import atoms_data

    a = _write_demo(tmp_path / "a.extxyz")
    b = _write_demo(tmp_path / "b.extxyz", edit=lambda fr: _set_label(fr[0], energy=fr[0].get_potential_energy() + 0.1))
    db = tmp_path / "data.db"
    kw = dict(length_unit="Angstrom", energy_unit="eV")
    assert len(atoms_data(a, db, max_frames=10, **kw)) == 10
    assert len(atoms_data(a, db, max_frames=10, **kw)) == 10  # same source: reused
    with pytest.raises(ValueError, match=r"built from other data \(sha256: .*source: .*a\.extxyz' -> .*b\.extxyz'"):
        atoms_data(b, db, max_frames=10, **kw)
    with pytest.raises(ValueError, match=r"max_frames: 10 -> 12"):
        atoms_data(a, db, max_frames=12, **kw)
    with pytest.raises(ValueError, match=r"energy_unit: 'eV' -> 'kcal/mol'"):
        atoms_data(a, db, max_frames=10, length_unit="Angstrom", energy_unit="kcal/mol")
    from ase.db import connect

    with connect(str(db)) as conn:
        conn.delete([1])  # a database that lost a frame
    with pytest.raises(ValueError, match="holds 9 frames but was built with 10"):
        atoms_data(a, db, max_frames=10, **kw)


def test_water_datamodule_serves_rows_from_memory_after_the_first_read(tmp_path):
    """cache_rows: the second epoch reads no database row; items equal the database's and are copies."""
    from ekf_plugin.data import WaterDataModule

    dm = WaterDataModule(datapath=str(tmp_path / "w.db"), source=str(_extxyz()), max_frames=4, batch_size=1,
                         num_train=3, num_val=1, num_test=0, num_workers=0, split_file=str(tmp_path / "split.npz"))
    dm.prepare_data()
    dm.setup()
    train = dm.train_dataset
    reads = []
    conn_get = train.conn.get
    train.conn.get = lambda *a, **k: reads.append(a) or conn_get(*a, **k)
    first = [train[i] for i in range(3)]
    assert len(reads) == 3
    first[0]["_positions"] += 1.0  # a transform that edits in place cannot reach the cache
    again = [train[i] for i in range(3)]
    assert len(reads) == 3, "rows come from memory the second time"
    uncached = WaterDataModule(datapath=str(tmp_path / "w.db"), source=str(_extxyz()), max_frames=4, batch_size=1,
                               num_train=3, num_val=1, num_test=0, num_workers=0,
                               split_file=str(tmp_path / "split.npz"), cache_rows=False)
    uncached.setup()
    for i, item in enumerate(again):
        ref = uncached.train_dataset[i]
        assert set(item) == set(ref)
        for k in ref:
            assert torch.equal(item[k], ref[k]), k


def test_one_structure_collate_equals_schnetpacks_and_shares_nothing_between_batches(tmp_path):
    """atoms_collate (the water data module's training loader under a trainer): one structure gives SchNetPack's
    batch (keys, dtypes, values), without aliasing between two batches of the same frame; several structures
    are SchNetPack's own function."""
    import pytorch_lightning as pl
    from schnetpack.data.loader import _atoms_collate_fn

    from ekf_plugin.data import WaterDataModule, atoms_collate

    dm = WaterDataModule(datapath=str(tmp_path / "w.db"), source=str(_extxyz()), max_frames=4, batch_size=1,
                         num_train=3, num_val=1, num_test=0, num_workers=0, split_file=str(tmp_path / "split.npz"))
    dm.prepare_data()
    dm.setup()
    train = dm.train_dataset
    ref = _atoms_collate_fn([train[1]])
    got = atoms_collate([train[1]])
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert got["_idx_i"].data_ptr() != got["_idx_i_local"].data_ptr()
    again = atoms_collate([train[1]])
    got["_positions"] += 1.0
    got["_idx_i"] += 1
    assert torch.equal(again["_positions"], ref["_positions"]) and torch.equal(again["_idx_i"], ref["_idx_i"])
    two = [train[0], train[2]]
    ref2, got2 = _atoms_collate_fn(two), atoms_collate(two)
    assert set(ref2) == set(got2) and all(torch.equal(ref2[k], got2[k]) for k in ref2)
    dm.trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert dm.train_dataloader().collate_fn is atoms_collate
