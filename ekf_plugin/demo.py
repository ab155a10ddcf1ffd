"""A small built-in water data set for the quickstart, made on the fly with ASE (no download).

Flexible TIP3P-like water: ASE's TIP3P (Coulomb + O–O Lennard-Jones between molecules) plus harmonic
O–H bonds and H–O–H angle inside each molecule (SPC/Fw constants). Energies in eV, forces in eV/Å,
lengths in Å. It is a toy potential for demonstrating the pipeline, not a water model to trust.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

K_BOND = 45.93  # eV/Å² (SPC/Fw: 1059.162 kcal/mol/Å²)
R0_BOND = 1.012  # Å
K_ANGLE = 3.291  # eV/rad² (SPC/Fw: 75.90 kcal/mol/rad²)
THETA0 = np.deg2rad(113.24)  # rad


def _intramolecular(positions: np.ndarray, cell: np.ndarray):
    """Harmonic bond + angle energy (eV) and forces (eV/Å) for atoms ordered O H H per molecule."""
    from ase.geometry import find_mic

    pos = positions.reshape(-1, 3, 3)  # (M, 3 atoms, xyz)
    d1, _ = find_mic(pos[:, 1] - pos[:, 0], cell)  # (M, 3) O→H1
    d2, _ = find_mic(pos[:, 2] - pos[:, 0], cell)  # (M, 3) O→H2
    r1 = np.linalg.norm(d1, axis=1)  # (M,)
    r2 = np.linalg.norm(d2, axis=1)  # (M,)
    cos = np.einsum("mi,mi->m", d1, d2) / (r1 * r2)
    theta = np.arccos(np.clip(cos, -1.0, 1.0))  # (M,)
    energy = 0.5 * K_BOND * ((r1 - R0_BOND) ** 2 + (r2 - R0_BOND) ** 2).sum()
    energy += 0.5 * K_ANGLE * ((theta - THETA0) ** 2).sum()
    f = np.zeros_like(pos)  # (M, 3, 3)
    for d, r, h in ((d1, r1, 1), (d2, r2, 2)):
        fb = -K_BOND * (r - R0_BOND)[:, None] * d / r[:, None]  # (M, 3) force on H from the bond
        f[:, h] += fb
        f[:, 0] -= fb
    sin = np.maximum(np.sin(theta), 1e-8)
    dE = K_ANGLE * (theta - THETA0)  # dE/dθ
    u1, u2 = d1 / r1[:, None], d2 / r2[:, None]
    g1 = (u2 - cos[:, None] * u1) / (r1[:, None])  # dcosθ/dd1
    g2 = (u1 - cos[:, None] * u2) / (r2[:, None])  # dcosθ/dd2
    fa1 = dE[:, None] / sin[:, None] * g1  # -dE/dd1 = dE/dθ * (1/sinθ) dcosθ/dd1
    fa2 = dE[:, None] / sin[:, None] * g2
    f[:, 1] += fa1
    f[:, 2] += fa2
    f[:, 0] -= fa1 + fa2
    return energy, f.reshape(-1, 3)


def water_box(n_side: int = 2, density: float = 1.0, seed: int = 0):
    """A periodic cubic box of n_side³ water molecules (O H H order) at ``density`` g/cm³."""
    from ase import Atoms
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    n_mol = n_side**3
    length = (n_mol * 18.015 / 0.602214076 / density) ** (1 / 3)  # Å
    grid = (np.indices((n_side,) * 3).reshape(3, -1).T + 0.5) * length / n_side  # (M, 3)
    atoms = Atoms(cell=[length] * 3, pbc=True)
    for center in grid:
        w = molecule("H2O")[[0, 1, 2]]  # ASE order is O H H
        w.rotate(rng.uniform(0, 360), "z")
        w.rotate(rng.uniform(0, 360), "x")
        w.positions += center
        atoms += w
    return atoms


def make_frames(n_frames: int = 60, n_side: int = 2, rattle: float = 0.03, seed: int = 0) -> List:
    """Rattled, slightly strained water boxes labelled with flexible TIP3P (eV, eV/Å)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.calculators.tip3p import TIP3P

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n_frames):
        atoms = water_box(n_side, density=rng.uniform(0.9, 1.1), seed=seed + k)
        atoms.rattle(rattle, seed=seed + 1000 + k)
        atoms.calc = TIP3P(rc=min(atoms.cell.lengths()) / 2 - 0.05)
        e_inter = atoms.get_potential_energy()
        f_inter = atoms.get_forces()
        e_intra, f_intra = _intramolecular(atoms.positions, atoms.cell.array)
        atoms.calc = SinglePointCalculator(atoms, energy=e_inter + e_intra, forces=f_inter + f_intra)
        frames.append(atoms)
    return frames


def write_demo_extxyz(path: Path, n_frames: int = 60, seed: int = 0) -> Path:
    """Write the demo set as extended XYZ (Å, eV, eV/Å); kept if it already exists.

    Written to a temporary name first and renamed, so a crash never leaves a truncated file behind.
    """
    from ase.io import write

    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp, make_frames(n_frames=n_frames, seed=seed), format="extxyz")
    tmp.replace(path)
    return path
