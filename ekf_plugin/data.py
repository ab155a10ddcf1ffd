"""Data sets for BPNN training: extended-XYZ (revPBE0-D3 water) and n2p2 ``input.data`` → SchNetPack.

Units: the source files are in Bohr / Hartree / Hartree per Bohr (``length_unit``/``energy_unit``
arguments); the ASE database written here is in Å, eV and eV/Å (``distance_unit="Ang"``,
``energy: eV``, ``forces: eV/Ang``), SchNetPack's working units of this package.

``WaterDataModule`` is a ``schnetpack.data.AtomsDataModule`` that converts its ``source`` file into
the database in ``prepare_data`` (once; an existing database is reused), so that
``spktrain data=water_revpbe0`` needs no manual step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

from .units import energy_factor, length_factor

PROPERTY_UNITS = {"energy": "eV", "forces": "eV/Ang"}


def read_extxyz(path: Union[str, Path], index=":", length_unit: str = "Bohr", energy_unit: str = "Hartree",
                energy_key: str = "TotEnergy", forces_key: str = "force") -> list:
    """libAtoms extended XYZ (e.g. ``dataset_1400_au.extxyz``) → ASE ``Atoms`` in Å with energy (eV)
    and forces (eV/Å) as a ``SinglePointCalculator``. Energy from ``info[energy_key]``, forces from
    ``arrays[forces_key]`` (falling back to a calculator's results)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read

    a = length_factor(length_unit)
    ev = energy_factor(energy_unit)
    frames = read(str(path), index=index, format="extxyz")
    frames = frames if isinstance(frames, list) else [frames]
    out = []
    for atoms in frames:
        if energy_key in atoms.info:
            energy = float(atoms.info[energy_key])
        else:
            energy = atoms.get_potential_energy()
        forces = atoms.arrays[forces_key] if forces_key in atoms.arrays else atoms.get_forces()
        new = atoms.copy()
        new.set_cell(np.asarray(atoms.cell) * a)
        new.positions = atoms.positions * a
        new.calc = SinglePointCalculator(new, energy=energy * ev, forces=np.asarray(forces) * ev / a)
        out.append(new)
    return out


def read_frames(path: Union[str, Path], fmt: Optional[str] = None, max_frames: Optional[int] = None,
                length_unit: str = "Bohr", energy_unit: str = "Hartree") -> list:
    """Read ``extxyz`` or ``n2p2`` (``input.data``) frames in Å/eV; ``fmt`` guessed from the name."""
    from .n2p2 import read_input_data

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} not found (set EKF_PLUGIN_SHARED_DATA or data.source=...)")
    if fmt is None:
        fmt = "n2p2" if path.name.endswith(".data") else "extxyz"
    if fmt == "extxyz":
        index = ":" if max_frames is None else f":{int(max_frames)}"
        return read_extxyz(path, index, length_unit, energy_unit)
    if fmt == "n2p2":
        frames = read_input_data(path, length_unit, energy_unit)
        return frames if max_frames is None else frames[: int(max_frames)]
    raise ValueError(f"unknown data format {fmt!r}; expected 'extxyz' or 'n2p2'")


def frames_to_db(frames: Sequence, db_path: Union[str, Path]):
    """Write frames (Å, eV, eV/Å on their calculators) into a new SchNetPack ``ASEAtomsData``.

    The database is written under a temporary name and renamed when complete, so a crash never leaves a
    truncated database that a later run would take for finished.
    """
    import ekf_plugin.compat  # noqa: F401
    from schnetpack.data import ASEAtomsData

    db_path = Path(db_path)
    if db_path.exists():
        raise FileExistsError(f"{db_path} exists; remove it first")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(db_path.name + ".partial.db")
    tmp.unlink(missing_ok=True)
    data = ASEAtomsData.create(str(tmp), distance_unit="Ang", property_unit_dict=dict(PROPERTY_UNITS))
    props = [{"energy": np.array([a.get_potential_energy()]), "forces": np.asarray(a.get_forces())} for a in frames]
    plain = [a.copy() for a in frames]  # without calculators
    data.add_systems(props, plain)
    tmp.replace(db_path)
    return ASEAtomsData(str(db_path))


def atoms_data(source: Union[str, Path], db_path: Union[str, Path], fmt: Optional[str] = None,
               max_frames: Optional[int] = None, length_unit: str = "Bohr", energy_unit: str = "Hartree"):
    """Convert ``source`` (extxyz / n2p2) into ``db_path`` (if absent) and open it as ``ASEAtomsData``."""
    import ekf_plugin.compat  # noqa: F401
    from schnetpack.data import ASEAtomsData

    if not Path(db_path).exists():
        frames_to_db(read_frames(source, fmt, max_frames, length_unit, energy_unit), db_path)
    return ASEAtomsData(str(db_path))


def _base():
    import ekf_plugin.compat  # noqa: F401
    from schnetpack.data import AtomsDataModule

    return AtomsDataModule


def __getattr__(name: str):
    if name == "WaterDataModule":
        cls = _make_datamodule()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_datamodule():
    import schnetpack.transform as trn

    AtomsDataModule = _base()

    class WaterDataModule(AtomsDataModule):
        """``AtomsDataModule`` that builds its ASE database from an extxyz / n2p2 file in ``prepare_data``.

        Args:
            datapath: the ASE database to use or create (``.db``).
            source: extxyz or n2p2 ``input.data`` file (Bohr/Hartree unless told otherwise).
            source_format: ``"extxyz"``/``"n2p2"``; guessed from the file name when ``None``.
            max_frames: use only the first ``max_frames`` frames of ``source`` (small runs).
            cutoff: neighbour-list cutoff in Å for the default transforms
                ``[MatScipyNeighborList(cutoff), CastTo32]`` (used when ``transforms`` is not given).
            source_length_unit, source_energy_unit: units of ``source``.
            **kwargs: passed to ``schnetpack.data.AtomsDataModule`` (``batch_size``, ``num_train``, ...).
        """

        def __init__(self, datapath: str, source: str, source_format: Optional[str] = None,
                     max_frames: Optional[int] = None, cutoff: float = 6.36, source_length_unit: str = "Bohr",
                     source_energy_unit: str = "Hartree", transforms=None, **kwargs) -> None:
            if transforms is None:
                transforms = [trn.MatScipyNeighborList(cutoff=float(cutoff)), trn.CastTo32()]
            kwargs.setdefault("distance_unit", "Ang")
            kwargs.setdefault("property_units", dict(PROPERTY_UNITS))
            super().__init__(datapath=datapath, transforms=transforms, **kwargs)
            self.source = str(source)
            self.source_format = source_format
            self.max_frames = max_frames
            self.source_length_unit = source_length_unit
            self.source_energy_unit = source_energy_unit

        def prepare_data(self) -> None:
            if not Path(self.datapath).exists():
                frames = read_frames(self.source, self.source_format, self.max_frames, self.source_length_unit,
                                     self.source_energy_unit)
                frames_to_db(frames, self.datapath)

    WaterDataModule.__module__ = __name__
    return WaterDataModule
