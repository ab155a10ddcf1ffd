"""Energy and force errors of trained models on labelled structures, and the pressure bias the energy errors
imply (check it before NPT molecular dynamics).

    ekf-plugin errors model.pt --data val.extxyz --length-unit Bohr --energy-unit Hartree --json errors.json
    ekf-plugin errors runs/a/best_model --data data/water.db --split runs/a/split.npz   # spktrain's own frames

Prints one row per model: frames, energy RMSE (meV/atom), force RMSE (meV/Å), the mean energy error (a common
offset, meV/atom) and the **pressure bias** (bar): from how the model's energy error per atom changes with the
volume per atom over the frames, ΔP = −d(ΔE)/dV. A force RMSE does not see it; it decides the density of an
NPT run (ΔP > 0: too dilute, ΔP < 0: too dense; for liquid water ρ/ρ₀ ≈ exp(−4.5e-5·ΔP/bar)). It needs
periodic frames at different densities. Models: anything ``ekf_plugin.models.load_model`` reads. Data: extxyz
(energy in ``TotEnergy`` or a calculator, forces in ``force`` or a calculator) and n2p2 ``input.data`` in the
units given; a SchNetPack database (``.db``: labels in each row's data, units from its metadata, as ``spktrain``
writes it); or any ASE-readable file with energies and forces on its calculators (converted from the units
given). ``--split`` takes the frames of a ``split.npz`` (``spktrain``'s, 0-based indices into the file).
Evaluation in float64.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from . import default_model_name

NAME = "errors"
HELP = "energy and force RMSE of models on labelled frames, with the pressure bias of their energy errors"
WARN_BAR = 500.0  # |ΔP| above which (and above twice its standard error) the command warns (water: ~2 % density)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", type=Path, help="model files or n2p2 directories")
    parser.add_argument("--data", type=Path, required=True, help="labelled structures: extxyz, n2p2 input.data, ASE db ...")
    parser.add_argument("--index", default=":", help="ASE index of the frames to use (default ':')")
    parser.add_argument("--length-unit", default="Angstrom", help="length unit of the data, an ase.units name (e.g. Bohr)")
    parser.add_argument("--energy-unit", default="eV", help="energy unit of the data, an ase.units name (e.g. Hartree)")
    parser.add_argument("--split", type=Path, default=None,
                        help="a split.npz (spktrain's): evaluate its --part frames only (0-based indices into the data)")
    parser.add_argument("--part", choices=("val", "train", "test"), default="val", help="which frames of --split (default val)")
    parser.add_argument("--energy-key", default="energy", help="energy property of a SchNetPack database (default energy)")
    parser.add_argument("--forces-key", default="forces", help="forces property of a SchNetPack database (default forces)")
    parser.add_argument("--names", default=None, help="comma-separated names for the models (default: file or folder names; a run's best_model: its run folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the table as JSON (one entry per model)")
    parser.add_argument("--per-frame", type=Path, default=None,
                        help="write a CSV of every frame: model, frame, volume (Å³/atom), energy error (meV/atom), "
                             "force RMSE (meV/Å)")
    parser.add_argument("--device", default=None, help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the cores the load average leaves idle, at least 1)")
    parser.add_argument("--trust-model", action="store_true",
                        help="allow a full unpickle of a best_model that needs classes outside the allow-list: "
                             "this can run code from the file, use it only for files you trust")


def read_labelled_frames(path: Path, index: str, length_unit: str, energy_unit: str, energy_key: str = "energy",
                         forces_key: str = "forces") -> list:
    """Frames of ``path`` in Å with reference energies (eV) and forces (eV/Å) on their calculators."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io.formats import string2index

    from ekf_plugin.data import read_db_frames, read_frames, validate_frames
    from ekf_plugin.units import energy_factor, length_factor

    if not path.exists():
        raise SystemExit(f"error: no data file {path}")
    try:
        a, ev = length_factor(length_unit), energy_factor(energy_unit)  # ValueError names the known units
        if path.suffix == ".db":  # a SchNetPack database: labels in the rows' data, units from its metadata
            frames = read_db_frames(path, energy_key=energy_key, forces_key=forces_key)
            validate_frames(frames, str(path))
        elif path.suffix in (".xyz", ".extxyz") or path.name.endswith(".data"):
            frames = read_frames(path, length_unit=length_unit, energy_unit=energy_unit)
        else:
            frames = []
            for k, atoms in enumerate(ase.io.read(str(path), index=":")):
                try:
                    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
                except Exception as exc:  # no calculator or no stored results
                    raise SystemExit(f"error: {path}, frame {k}: no reference energy and forces ({exc})") from None
                new = atoms.copy()
                new.set_cell(atoms.cell.array * a)
                new.positions = atoms.positions * a
                new.calc = SinglePointCalculator(new, energy=energy * ev, forces=forces * ev / a)
                frames.append(new)
    except ValueError as exc:  # unknown unit, data validation (NaN labels, unit mix-up, a row without labels)
        raise SystemExit(f"error: {exc}") from None
    picked = frames[string2index(index)]
    return picked if isinstance(picked, list) else [picked]


COLUMNS = (("model", None, "{}"), ("frames", "frames", "{}"), ("E RMSE (meV/atom)", "energy_rmse_meV_per_atom", "{:.3f}"),
           ("F RMSE (meV/Å)", "forces_rmse_meV_per_A", "{:.2f}"), ("E mean (meV/atom)", "energy_error_mean_meV_per_atom", "{:+.3f}"),
           ("pressure bias (bar)", "pressure_bias_bar", "{:+.0f}"), ("±", "pressure_bias_err_bar", "{:.0f}"))


def _print_table(table: dict) -> None:
    cells = [[h for h, _, _ in COLUMNS]]
    for name, row in table.items():
        cells.append([name] + ["n/a" if row.get(k) is None else f.format(row[k]) for _, k, f in COLUMNS[1:]])
    width = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width))))


def _split_frames(frames: list, split: Path, part: str) -> list:
    """The ``part`` frames of ``split`` (``<part>_idx``: 0-based indices into ``frames``)."""
    import numpy as np

    try:
        idx = np.load(split)[f"{part}_idx"]
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"error: {split}: no {part}_idx ({exc})") from None
    if len(idx) and (idx.min() < 0 or idx.max() >= len(frames)):
        raise SystemExit(f"error: {split}: {part}_idx reaches frame {int(idx.max())}, the data has {len(frames)} frames")
    return [frames[int(i)] for i in idx]


def run(args: argparse.Namespace) -> int:
    from ekf_plugin.evaluation import ModelEvaluator, idle_cores
    from ekf_plugin.model_errors import density_factor, error_summary, frame_errors
    from ekf_plugin.progress import progress_bar

    names = args.names.split(",") if args.names else [default_model_name(p) for p in args.models]
    if len(names) != len(args.models) or len(set(names)) != len(names):
        raise SystemExit(f"error: need {len(args.models)} distinct names, got {names}")
    frames = read_labelled_frames(args.data, args.index, args.length_unit, args.energy_unit, args.energy_key,
                                  args.forces_key)
    if args.split is not None:
        frames = _split_frames(frames, args.split, args.part)
    table, per_frame = {}, []
    threads = args.threads if args.threads is not None else idle_cores()
    for name, path in zip(names, args.models):
        try:
            ev = ModelEvaluator(str(path), device=args.device, threads=threads, trust_pickle=args.trust_model)
        except ValueError as exc:  # missing, unreadable or untrusted model file
            raise SystemExit(f"error: {exc}") from None
        err = frame_errors(ev, frames, progress=lambda it: progress_bar(it, total=len(frames), desc=name, unit="frame"))
        table[name] = error_summary(err)
        per_frame += [(name, k, v, 1e3 * e, 1e3 * f)
                      for k, (v, e, f) in enumerate(zip(err.volume, err.energy, err.forces_rmse))]
    _print_table(table)
    for name, row in table.items():
        bias = row.get("pressure_bias_bar")
        if bias is None:
            print(f"{name}: no pressure bias: {row['pressure_bias_note']}")
        elif abs(bias) > max(WARN_BAR, 2 * row["pressure_bias_err_bar"]):
            print(f"{name}: pressure bias {bias:+.0f} bar: an NPT run at the reference pressure will end "
                  f"{'less' if bias > 0 else 'more'} dense (liquid water: about {100 * (density_factor(bias) - 1):+.0f} %)")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    if args.per_frame:
        with open(args.per_frame, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["model", "frame", "volume_A3_per_atom", "energy_error_meV_per_atom", "forces_rmse_meV_per_A"])
            w.writerows(per_frame)
    return 0
