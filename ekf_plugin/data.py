"""Data sets for BPNN training: extended-XYZ (revPBE0-D3 water) and n2p2 ``input.data`` → SchNetPack.

Units: the source files are in Bohr / Hartree / Hartree per Bohr (``length_unit``/``energy_unit``
arguments); the ASE database written here is in Å, eV and eV/Å (``distance_unit="Ang"``,
``energy: eV``, ``forces: eV/Ang``), SchNetPack's working units of this package.

``WaterDataModule`` is a ``schnetpack.data.AtomsDataModule`` that converts its ``source`` file into
the database in ``prepare_data``, so that ``spktrain data=water_revpbe0`` needs no manual step. The
database records where it came from (source path and SHA-256, format, units, ``max_frames``, frame
count); an existing database is reused only if that record matches, and refused with a clear error
otherwise.

Frames are validated when read (:mod:`ekf_plugin.validation`): ≥ 1 atom, known elements, finite
positions, cell, energy and forces, no two atoms closer than 0.6 Å, every H of an H/C/N/O system within
1.3 Å of a heavier atom (both catch a Bohr/Å mix-up), and a robust (median/MAD) outlier test on E/atom and
abs(F). Errors name the file and the frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

from .units import energy_factor, length_factor
from .validation import OUTLIER_Z, DataValidationError, check_frame, check_outliers

PROPERTY_UNITS = {"energy": "eV", "forces": "eV/Ang"}
PROVENANCE_KEY = "ekf_plugin_source"  # metadata key of the database: what it was built from


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
                length_unit: str = "Bohr", energy_unit: str = "Hartree", validate: bool = True,
                outlier_threshold: Optional[float] = OUTLIER_Z, elements: Optional[Sequence[int]] = None) -> list:
    """Read ``extxyz`` or ``n2p2`` (``input.data``) frames in Å/eV; ``fmt`` guessed from the name.

    With ``validate`` (default) every frame is checked (:func:`validate_frames`); the
    :class:`~ekf_plugin.validation.DataValidationError` names the file and the frame (0-based).
    """
    from .n2p2 import read_input_data

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} not found (set EKF_PLUGIN_SHARED_DATA or data.source=...)")
    if fmt is None:
        fmt = "n2p2" if path.name.endswith(".data") else "extxyz"
    if fmt == "extxyz":
        index = ":" if max_frames is None else f":{int(max_frames)}"
        frames = read_extxyz(path, index, length_unit, energy_unit)
    elif fmt == "n2p2":
        frames = read_input_data(path, length_unit, energy_unit)
        frames = frames if max_frames is None else frames[: int(max_frames)]
    else:
        raise ValueError(f"unknown data format {fmt!r}; expected 'extxyz' or 'n2p2'")
    if validate:
        validate_frames(frames, str(path), outlier_threshold=outlier_threshold, elements=elements,
                        hint=f" (read as {length_unit}/{energy_unit})")
    return frames


def validate_frames(frames: Sequence, source: str, outlier_threshold: Optional[float] = OUTLIER_Z,
                    elements: Optional[Sequence[int]] = None, hint: str = "") -> None:
    """Check labelled frames (Å, eV, eV/Å on their calculators) before they become training data.

    Raises:
        DataValidationError: ``"<source>, frame <k>: <what>"``.
    """
    if not len(frames):
        raise DataValidationError(f"{source}: no frames")
    for k, atoms in enumerate(frames):
        where = f"{source}, frame {k}{hint}"
        calc = atoms.calc
        results = getattr(calc, "results", {}) if calc is not None else {}
        energy = results.get("energy", results.get("free_energy"))
        check_frame(atoms.numbers, atoms.positions, atoms.cell.array if atoms.pbc.any() else None, atoms.pbc,
                    energy, results.get("forces"), where, elements=elements)
    labelled = [a for a in frames if a.calc is not None and "energy" in a.calc.results and "forces" in a.calc.results]
    if len(labelled) == len(frames):
        check_outliers(frames, source, outlier_threshold)


def source_provenance(source: Union[str, Path], fmt: Optional[str], max_frames: Optional[int], length_unit: str,
                      energy_unit: str) -> dict:
    """What a database is built from: absolute source path, its SHA-256, format, units and ``max_frames``."""
    import hashlib

    path = Path(source).resolve()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"source": str(path), "sha256": digest.hexdigest(), "format": fmt or "auto",
            "max_frames": None if max_frames is None else int(max_frames), "length_unit": length_unit,
            "energy_unit": energy_unit}


def frames_to_db(frames: Sequence, db_path: Union[str, Path], provenance: Optional[dict] = None):
    """Write frames (Å, eV, eV/Å on their calculators) into a new SchNetPack ``ASEAtomsData``.

    The database is written under a temporary name and renamed when complete, so a crash never leaves a
    truncated database that a later run would take for finished. ``provenance`` (see
    :func:`source_provenance`) is stored in its metadata with the frame count.
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
    if provenance is not None:
        data.update_metadata(**{PROVENANCE_KEY: {**provenance, "n_frames": len(frames)}})
    tmp.replace(db_path)
    return ASEAtomsData(str(db_path))


def read_db_frames(db_path: Union[str, Path], indices: Optional[Sequence[int]] = None, energy_key: str = "energy",
                   forces_key: str = "forces") -> list:
    """Frames of a SchNetPack ``ASEAtomsData`` file (what :func:`frames_to_db` and ``spktrain`` write) as ASE
    ``Atoms`` in Å with the reference energy (eV) and forces (eV/Å) on a ``SinglePointCalculator``, converted
    from the units in the database's metadata (Å and eV without). ``indices``: 0-based dataset indices (row id
    − 1, as in ``split.npz``); all rows in order by default.

    Raises:
        DataValidationError: a row without ``energy_key``/``forces_key`` in its data.
    """
    import schnetpack.units as spk_units
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.db import connect

    with connect(str(db_path)) as con:
        meta = con.metadata
        units = meta.get("_property_unit_dict", {})
        a = spk_units.convert_units(meta.get("_distance_unit", "Ang"), "Ang")
        ev = spk_units.convert_units(units.get(energy_key, "eV"), "eV")
        ev_per_a = spk_units.convert_units(units.get(forces_key, "eV/Ang"), "eV/Ang")
        rows = con.select(sort="id") if indices is None else (con.get(id=int(i) + 1) for i in indices)
        frames = []
        for row in rows:
            data = row.data
            if energy_key not in data or forces_key not in data:
                raise DataValidationError(f"{db_path}, row {row.id}: no {energy_key!r}/{forces_key!r} in its data "
                                          f"(has {sorted(data)}); name the label keys (energy_key/forces_key, "
                                          "--energy-key/--forces-key)")
            atoms = row.toatoms()
            atoms.set_cell(atoms.cell.array * a)
            atoms.positions = atoms.positions * a
            atoms.calc = SinglePointCalculator(atoms, energy=float(np.asarray(data[energy_key]).reshape(-1)[0]) * ev,
                                               forces=np.asarray(data[forces_key]).reshape(-1, 3) * ev_per_a)
            frames.append(atoms)
    return frames


def check_database(db_path: Union[str, Path], provenance: dict) -> bool:
    """Whether ``db_path`` can be reused for ``provenance``: ``False`` if it does not exist, ``True`` if it
    was built from the same source, units and frame selection and holds all its frames.

    Raises:
        ValueError: it was built from something else (or is incomplete); names both and says what to do.
        A database without our record (built elsewhere) is reused with a warning.
    """
    import warnings

    import ekf_plugin.compat  # noqa: F401
    from schnetpack.data import ASEAtomsData

    db_path = Path(db_path)
    if not db_path.exists():
        return False
    data = ASEAtomsData(str(db_path))
    stored = dict(data.metadata.get(PROVENANCE_KEY) or {})
    if not stored:
        warnings.warn(f"{db_path} has no record of its source; using it as it is (delete it to rebuild from "
                      f"{provenance['source']})", stacklevel=2)
        return True
    n_frames = stored.pop("n_frames", None)
    changed = [k for k in sorted(set(stored) | set(provenance)) if stored.get(k) != provenance.get(k)]
    if changed:
        what = ", ".join(f"{k}: {stored.get(k)!r} -> {provenance.get(k)!r}" for k in changed)
        raise ValueError(f"database {db_path} was built from other data ({what}); delete it or set data.datapath "
                         "to a new file")
    if n_frames is not None and len(data) != n_frames:
        raise ValueError(f"database {db_path} holds {len(data)} frames but was built with {n_frames}: it is "
                         "incomplete; delete it to rebuild")
    return True


def atoms_data(source: Union[str, Path], db_path: Union[str, Path], fmt: Optional[str] = None,
               max_frames: Optional[int] = None, length_unit: str = "Bohr", energy_unit: str = "Hartree",
               outlier_threshold: Optional[float] = OUTLIER_Z):
    """Convert ``source`` (extxyz / n2p2) into ``db_path`` (if absent) and open it as ``ASEAtomsData``.

    An existing database is reused only if it was built from the same source (content), format, units and
    ``max_frames`` (:func:`check_database`)."""
    import ekf_plugin.compat  # noqa: F401
    from schnetpack.data import ASEAtomsData

    prov = source_provenance(source, fmt, max_frames, length_unit, energy_unit)
    if not check_database(db_path, prov):
        frames = read_frames(source, fmt, max_frames, length_unit, energy_unit, outlier_threshold=outlier_threshold)
        frames_to_db(frames, db_path, prov)
    return ASEAtomsData(str(db_path))


def cache_rows_in_memory(dataset) -> None:
    """Serve a SchNetPack ``ASEAtomsData``'s rows from memory after their first read (see ``cache_rows`` of
    ``WaterDataModule``). Fixes ``load_properties`` to the database's property list (one metadata query
    instead of one per item). Other datasets, and ones already cached, are left as they are."""
    if dataset is None or getattr(dataset, "_ekf_rows", None) is not None or not hasattr(dataset, "_get_properties"):
        return
    if getattr(dataset, "_load_properties", ()) is None:
        dataset._load_properties = list(dataset.available_properties)
    rows: dict = {}
    read = dataset._get_properties

    def cached(conn, idx, load_properties, load_structure):
        key = (int(idx), tuple(load_properties), bool(load_structure))
        hit = rows.get(key)
        if hit is None:
            hit = rows[key] = read(conn, idx, load_properties, load_structure)
        return {k: v.clone() for k, v in hit.items()}

    dataset._get_properties = cached
    dataset._ekf_rows = rows


def batch_dicts(batches: Iterable) -> Iterable[dict]:
    """The batch dicts of a loader whose batches are dicts, or lists of dicts (a training loader with several
    updates per step, :class:`~ekf_plugin.training.update_chunks.UpdateChunks`), one after the other."""
    for loaded in batches:
        if isinstance(loaded, list):
            yield from loaded
        else:
            yield loaded


def atoms_collate(batch: List[dict]) -> dict:
    """SchNetPack's ``_atoms_collate_fn`` with a fast path for a batch of one structure (the study's batch size):
    the same keys, dtypes and values, without copying the item's tensors into new ones (one copy each of the
    index keys, so ``_idx_i`` and ``_idx_i_local`` stay distinct tensors as there); ~40 against ~90 µs per
    192-atom frame on one core. For items that are new tensors at every access (``ASEAtomsData``, the row cache
    of :func:`cache_rows_in_memory`); several structures go to SchNetPack's function."""
    import schnetpack.properties as props
    import torch
    from schnetpack.data.loader import _atoms_collate_fn

    if len(batch) != 1:
        return _atoms_collate_fn(batch)
    item = batch[0]
    index_keys = (props.idx_i, props.idx_j, props.idx_i_triples)
    triple_keys = (props.idx_j_triples, props.idx_k_triples)
    out = {}
    for key, value in item.items():
        if key in index_keys:
            out[key + "_local"] = value
        elif key not in triple_keys:
            out[key] = value
    n = item[props.n_atoms]  # (1,)
    out[props.idx_m] = torch.zeros(int(n[0]), dtype=torch.long)  # repeat_interleave(arange(1), n): (N,)
    for key in index_keys + triple_keys:
        if key in item:
            out[key] = item[key].clone()  # + 0 offset for the only structure
    return out


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
                ``[MemoryCachedNeighborList(MatScipyNeighborList(cutoff), offsets_dtype=float32), CastTo32]`` (used when
                ``transforms`` is not given; each frame's list is computed once and kept in memory).
            source_length_unit, source_energy_unit: units of ``source``.
            outlier_threshold: robust z of the E/atom and abs(F) outlier test (``None``: off).
            cache_rows: keep every frame's database row (positions, numbers, cell, labels: ~10 kB per
                192-atom frame) in memory after its first read, and read the property list once, so a
                training step does no SQLite query (~2 ms per step on one core; the study's schedule
                reads each frame hundreds of times). Items are copies: transforms cannot change the cache.
            shuffle_seed: seed of the training order: epoch e visits the training frames in the order of a
                permutation drawn from (``shuffle_seed``, e), and checkpoints record the position, so a run resumed
                inside an epoch trains on the frames an uninterrupted run would (one process; under DDP the host's
                distributed sampler shuffles). The configs pass spktrain's ``seed``.
            **kwargs: passed to ``schnetpack.data.AtomsDataModule`` (``batch_size``, ``num_train``, ...).
        """

        def __init__(self, datapath: str, source: str, source_format: Optional[str] = None,
                     max_frames: Optional[int] = None, cutoff: float = 6.36, source_length_unit: str = "Bohr",
                     source_energy_unit: str = "Hartree", transforms=None,
                     outlier_threshold: Optional[float] = OUTLIER_Z, cache_rows: bool = True, shuffle_seed: int = 0,
                     **kwargs) -> None:
            if transforms is None:
                import torch

                from .transforms import MemoryCachedNeighborList

                # the offsets in float32 already: the numbers CastTo32 would make of them, without a float64 pass
                transforms = [MemoryCachedNeighborList(trn.MatScipyNeighborList(cutoff=float(cutoff)),
                                                       offsets_dtype=torch.float32), trn.CastTo32()]
            kwargs.setdefault("distance_unit", "Ang")
            kwargs.setdefault("property_units", dict(PROPERTY_UNITS))
            super().__init__(datapath=datapath, transforms=transforms, **kwargs)
            self.source = str(source)
            self.source_format = source_format
            self.max_frames = max_frames
            self.source_length_unit = source_length_unit
            self.source_energy_unit = source_energy_unit
            self.outlier_threshold = outlier_threshold
            self.cache_rows = bool(cache_rows)
            self.shuffle_seed = int(shuffle_seed)
            self.collate_fn = atoms_collate  # the resumable training loader's (install_resumable_order)

        def train_dataloader(self):
            """The training loader in a resumable order (see ``shuffle_seed``); SchNetPack's own with a
            ``train_sampler_cls`` or under a distributed strategy (DDP, also with one process), where Lightning puts
            its distributed sampler in."""
            from .training.resumable_loader import install_resumable_order

            install_resumable_order(self, getattr(self, "trainer", None), self.shuffle_seed)
            return super().train_dataloader()

        def setup(self, stage: Optional[str] = None) -> None:
            super().setup(stage)
            if self.cache_rows:
                for ds in (self.dataset, self._train_dataset, self._val_dataset, self._test_dataset):
                    cache_rows_in_memory(ds)

        def prepare_data(self) -> None:
            if not Path(self.source).exists() and Path(self.datapath).exists():
                return  # a database without its source (copied elsewhere): nothing to compare
            prov = source_provenance(self.source, self.source_format, self.max_frames, self.source_length_unit,
                                     self.source_energy_unit)
            if not check_database(self.datapath, prov):
                frames = read_frames(self.source, self.source_format, self.max_frames, self.source_length_unit,
                                     self.source_energy_unit, outlier_threshold=self.outlier_threshold)
                frames_to_db(frames, self.datapath, prov)

    WaterDataModule.__module__ = __name__
    return WaterDataModule
