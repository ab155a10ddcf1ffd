"""Write the i-PI start structure ``init.xyz`` (Å) from one frame of the revPBE0-D3 water set.

The data set (Cheng et al., PNAS 2019; Bohr and Hartree) is read from ``../shared/data`` beside the
checkout and never copied into the repository: this script converts one 192-atom frame
(64 H2O, O H H order) to an i-PI xyz file with a ``# CELL(abcABC)`` line.

    python make_init.py [--frame 0] [--data PATH] [--out init.xyz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ase import units
from ase.io import read

from ekf_plugin.md.runner import write_ipi_xyz

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "revpbe0-d3-cheng2019" / "dataset_1400_au.extxyz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frame", type=int, default=0, help="frame index in the data set")
    p.add_argument("--data", type=Path, default=DATA, help="extxyz file in Bohr")
    p.add_argument("--out", type=Path, default=Path("init.xyz"))
    args = p.parse_args()
    if not args.data.exists():
        raise SystemExit(f"data set not found: {args.data} (it lives in ../shared/data beside the checkout)")
    atoms = read(args.data, index=args.frame)  # positions and Lattice in Bohr
    positions = atoms.positions * units.Bohr  # Å
    cell = atoms.cell.array * units.Bohr  # Å, rows
    write_ipi_xyz(args.out, atoms.get_chemical_symbols(), positions, cell)
    n = len(atoms)
    mass = atoms.get_masses().sum() / units.kg * 1e3  # g
    density = mass / (abs(atoms.cell.volume) * units.Bohr**3 * 1e-24)  # g/cm³
    print(f"wrote {args.out}: frame {args.frame}, {n} atoms, cell {cell.diagonal().round(4)} Å, {density:.3f} g/cm³")


if __name__ == "__main__":
    main()
