"""Write the i-PI start structure ``init.xyz`` (Å) from one frame of the revPBE0-D3 water set.

The data set (Cheng et al., PNAS 2019; Bohr and Hartree) is read from ``../shared/data`` beside the
checkout and never copied into the repository: this script converts one 192-atom frame
(64 H2O, O H H order) to an i-PI xyz file with a ``# CELL(abcABC)`` line.

By default (``--frame auto``) it takes the frame with the lowest DFT energy among those within 3 %
of 1 g/cm³: many frames of the set are hot or path-integral snapshots (frame 0 lies 17 eV higher
than frame 126 and heats a classical NPT run to ~500 K within 30 fs).

    python make_init.py [--frame auto|N] [--data PATH] [--out init.xyz]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from ase import units
from ase.io import read

from ekf_plugin.md.runner import write_ipi_xyz

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "revpbe0-d3-cheng2019" / "dataset_1400_au.extxyz"


def coolest_frame_near_1g(path: Path, tolerance: float = 0.03) -> int:
    """Index of the lowest-``TotEnergy`` frame whose density is within ``tolerance`` of 1 g/cm³."""
    energies, volumes = [], []
    with open(path) as fh:
        for line in fh:
            if line.startswith("TotEnergy="):
                energies.append(float(re.search(r"TotEnergy=(\S+)", line).group(1)))
                lattice = np.array(re.search(r'Lattice="([^"]+)"', line).group(1).split(), float).reshape(3, 3)
                volumes.append(abs(np.linalg.det(lattice)) * units.Bohr**3)  # Å³
    energies, volumes = np.array(energies), np.array(volumes)
    density = 64 * 18.015 / (units.mol * 1e-24) / volumes  # g/cm³ for 64 H2O
    candidates = np.flatnonzero(np.abs(density - 1.0) < tolerance)
    if candidates.size == 0:
        raise SystemExit("no frame near 1 g/cm3; pass --frame N")
    return int(candidates[np.argmin(energies[candidates])])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frame", default="auto", help="frame index, or 'auto' (lowest energy near 1 g/cm3)")
    p.add_argument("--data", type=Path, default=DATA, help="extxyz file in Bohr")
    p.add_argument("--out", type=Path, default=Path("init.xyz"))
    args = p.parse_args()
    if not args.data.exists():
        raise SystemExit(f"data set not found: {args.data} (it lives in ../shared/data beside the checkout)")
    frame = coolest_frame_near_1g(args.data) if args.frame == "auto" else int(args.frame)
    atoms = read(args.data, index=frame)  # positions and Lattice in Bohr
    positions = atoms.positions * units.Bohr  # Å
    cell = atoms.cell.array * units.Bohr  # Å, rows
    write_ipi_xyz(args.out, atoms.get_chemical_symbols(), positions, cell)
    n = len(atoms)
    mass = atoms.get_masses().sum() / units.kg * 1e3  # g
    density = mass / (abs(atoms.cell.volume) * units.Bohr**3 * 1e-24)  # g/cm³
    print(f"wrote {args.out}: frame {frame}, {n} atoms, cell {cell.diagonal().round(4)} Å, {density:.3f} g/cm³")


if __name__ == "__main__":
    main()
