"""Checks of structures and labels at the boundaries where data enter (files, i-PI, ASE).

All lengths in Å, energies in eV, forces in eV/Å (convert before calling). The checks are meant to
catch what silently ruins a model: NaN/inf labels, empty frames, unknown elements, a Bohr/Å mix-up
(distances at 0.53× the covalent radii when Å are read as Bohr; H without a covalent partner when Bohr
are read as Å), and single absurd labels (robust median/MAD test). The thresholds below were set on the
revPBE0-D3 water set (1400 frames, which include dissociated configurations), the n2p2 RPBE-D3 set and
the demo set, all of which pass.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import numpy as np

MIN_PAIR_RATIO = 0.5  # d / (r_cov,i + r_cov,j) of any pair; water data: ≥ 0.76 (coincident atoms: 0)
MIN_MEDIAN_RATIO = 0.7  # median over atoms of the nearest-neighbour ratio; real data 0.94–1.07, Å read as Bohr ≈ 0.5
H_PARTNER_MAX = 1.3  # Å: covalent X–H bonds of C, N, O are ≤ 1.1 Å; Bohr read as Å gives O–H ≈ 1.81 Å
MAX_LONELY_H = 0.25  # fraction of H without a C/N/O within H_PARTNER_MAX; revPBE0-D3 water: ≤ 0.10, Bohr as Å: 1.0
COVALENT_H_ELEMENTS = frozenset({1, 6, 7, 8})  # systems where H has a covalent partner (water, organics)
NEIGHBOUR_REACH = 3.0  # Å: nearest neighbours searched this far
OUTLIER_Z = 30.0  # robust z (|x − median| / (1.4826·MAD)); the revPBE0-D3 water set has at most 12.5
ENERGY_SCALE_FLOOR = 1e-3  # eV/atom: MAD floor for the energy outlier test
FORCE_SCALE_FLOOR = 1e-2  # eV/Å: MAD floor for the force outlier test


class DataValidationError(ValueError):
    """A structure or label that must not enter training or MD; the message names file and frame."""


def _pairs(positions: np.ndarray, cell: Optional[np.ndarray], pbc: Sequence[bool], cutoff: float):
    """(i, j, d) of all pairs within ``cutoff`` Å (minimum image along periodic axes; both directions)."""
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=float).reshape(3, 3)
    if pbc.any() and abs(np.linalg.det(cell)) < 1e-12:
        pbc = np.zeros(3, dtype=bool)
    if not pbc.any():
        lo = positions.min(0)
        cell = np.diag(np.maximum(positions.max(0) - lo, 0.0) + 2 * cutoff + 1.0)
        positions = positions - lo + cutoff
    try:
        from matscipy.neighbours import neighbour_list

        return neighbour_list("ijd", positions=positions, cell=cell, pbc=pbc, cutoff=cutoff)
    except ImportError:
        from ase.neighborlist import primitive_neighbor_list

        return primitive_neighbor_list("ijd", pbc, cell, positions, cutoff, self_interaction=False)


def check_geometry(numbers: Sequence[int], positions: np.ndarray, cell: Optional[np.ndarray] = None,
                   pbc: Sequence[bool] = (False, False, False), where: str = "structure",
                   min_pair_ratio: float = MIN_PAIR_RATIO, min_median_ratio: float = MIN_MEDIAN_RATIO,
                   max_lonely_h: Optional[float] = MAX_LONELY_H) -> None:
    """Refuse geometries no real structure has, in particular a length-unit mix-up.

    Distances are compared with sums of covalent radii (``ase.data.covalent_radii``, Å):

    * no pair closer than ``min_pair_ratio`` × (r_i + r_j) (atoms on top of each other);
    * the median over atoms of the nearest-neighbour ratio at least ``min_median_ratio`` (Å read as Bohr
      shrinks every distance to 0.53×);
    * in H/C/N/O systems at most ``max_lonely_h`` of the H atoms without a C, N or O within 1.3 Å (Bohr
      read as Å stretches O–H to 1.81 Å; H and O swapped in a template leaves half the H alone).
      ``None`` skips this test (e.g. a template without a cell, where molecules may be wrapped).

    Args:
        numbers: (N,) atomic numbers; positions: (N, 3) Å; cell: (3, 3) Å, rows; pbc: (3,) bool.
        where: prefix of the error message (file and frame, or "i-PI's first structure").

    Raises:
        DataValidationError: naming the atoms and the distances found.
    """
    from ase.data import covalent_radii

    z = np.asarray(numbers, dtype=np.int64).reshape(-1)
    r = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if z.size < 2:
        return
    i, j, d = _pairs(r, cell, pbc, NEIGHBOUR_REACH)
    if not len(d):
        return
    ratio = d / (covalent_radii[z[i]] + covalent_radii[z[j]])
    k = int(np.argmin(ratio))
    if ratio[k] < min_pair_ratio:
        raise DataValidationError(
            f"{where}: atoms {i[k]} and {j[k]} are {d[k]:.3f} Å apart ({ratio[k]:.2f} of their covalent radii; "
            f"minimum {min_pair_ratio}): atoms on top of each other, or the lengths are not in the unit you said"
        )
    nearest = np.full(z.size, np.inf)
    np.minimum.at(nearest, i, ratio)
    median = float(np.median(nearest[np.isfinite(nearest)]))
    if median < min_median_ratio:
        raise DataValidationError(
            f"{where}: nearest-neighbour distances are {median:.2f} of the covalent radii (median; real structures "
            f"≈ 1): are the lengths in the unit you said (e.g. Å read as Bohr)?"
        )
    if max_lonely_h is not None and set(np.unique(z).tolist()) <= COVALENT_H_ELEMENTS and (z == 1).any():
        partner = (z[i] == 1) & (z[j] != 1) & (d < H_PARTNER_MAX)
        has_partner = np.zeros(z.size, dtype=bool)
        has_partner[i[partner]] = True
        lonely = np.flatnonzero((z == 1) & ~has_partner)
        if lonely.size > max_lonely_h * int((z == 1).sum()):
            raise DataValidationError(
                f"{where}: {lonely.size} of {int((z == 1).sum())} H atoms (e.g. {lonely[:6].tolist()}) have no "
                f"C/N/O neighbour within {H_PARTNER_MAX} Å: wrong length unit (Bohr read as Å?) or species in the "
                "wrong order?"
            )


def check_frame(numbers: Sequence[int], positions: np.ndarray, cell: Optional[np.ndarray], pbc: Sequence[bool],
                energy: Optional[float], forces: Optional[np.ndarray], where: str,
                elements: Optional[Iterable[int]] = None) -> None:
    """One labelled frame: ≥ 1 atom, known elements, finite positions/cell/energy (eV)/forces (eV/Å, (N, 3)),
    and :func:`check_geometry`. ``elements``: allowed atomic numbers (default: any real element, 1–118)."""
    z = np.asarray(numbers, dtype=np.int64).reshape(-1)
    if z.size == 0:
        raise DataValidationError(f"{where}: no atoms")
    allowed = set(range(1, 119)) if elements is None else {int(e) for e in elements}
    unknown = sorted(set(z.tolist()) - allowed)
    if unknown:
        from ase.data import chemical_symbols

        names = [chemical_symbols[u] if 0 <= u < len(chemical_symbols) else str(u) for u in unknown]
        raise DataValidationError(f"{where}: unknown element(s) {names} (allowed: {sorted(allowed)[:10]}...)"
                                  if elements is None else f"{where}: element(s) {names} not in {sorted(allowed)}")
    r = np.asarray(positions, dtype=np.float64)
    if not np.isfinite(r).all():
        raise DataValidationError(f"{where}: non-finite positions (NaN/inf)")
    if cell is not None and not np.isfinite(np.asarray(cell, dtype=np.float64)).all():
        raise DataValidationError(f"{where}: non-finite cell (NaN/inf)")
    if energy is not None and not np.isfinite(energy):
        raise DataValidationError(f"{where}: non-finite energy {energy}")
    if forces is not None:
        f = np.asarray(forces, dtype=np.float64)
        if f.shape != (z.size, 3):
            raise DataValidationError(f"{where}: forces have shape {f.shape}, expected ({z.size}, 3)")
        if not np.isfinite(f).all():
            raise DataValidationError(f"{where}: non-finite forces (NaN/inf)")
    check_geometry(z, r, cell, pbc, where)


def robust_z(values: np.ndarray, floor: float) -> np.ndarray:
    """abs(x − median) / max(1.4826·MAD, floor) for a 1-d array."""
    x = np.asarray(values, dtype=np.float64)
    med = np.median(x)
    scale = max(1.4826 * float(np.median(np.abs(x - med))), floor)
    return np.abs(x - med) / scale


def check_outliers(frames: Sequence, source: str, threshold: Optional[float] = OUTLIER_Z, first_index: int = 0) -> None:
    """Refuse single absurd labels: robust z of E/atom (eV/atom; needs ≥ 5 frames) and of every abs(F) (eV/Å).

    ``frames``: ASE ``Atoms`` with energy/forces on their calculators. ``threshold=None`` switches the test off.
    """
    if threshold is None or not len(frames):
        return
    if len(frames) >= 5:
        e = np.array([a.get_potential_energy() / len(a) for a in frames])
        z = robust_z(e, ENERGY_SCALE_FLOOR)
        k = int(np.argmax(z))
        if z[k] > threshold:
            raise DataValidationError(
                f"{source}, frame {first_index + k}: energy {e[k]:.6g} eV/atom is an outlier (median {np.median(e):.6g}; "
                f"robust z {z[k]:.3g} > {threshold:g}); fix the frame or set outlier_threshold"
            )
    norms: List[np.ndarray] = [np.linalg.norm(np.asarray(a.get_forces()), axis=1) for a in frames]
    flat = np.concatenate(norms)
    if flat.size < 5:
        return
    z = robust_z(flat, FORCE_SCALE_FLOOR)
    if z.max() > threshold:
        frame_of = np.repeat(np.arange(len(frames)), [len(n) for n in norms])
        k = int(np.argmax(z))
        raise DataValidationError(
            f"{source}, frame {first_index + frame_of[k]}: a force of {flat[k]:.6g} eV/Å is an outlier (median |F| "
            f"{np.median(flat):.6g}; robust z {z[k]:.3g} > {threshold:g}); fix the frame or set outlier_threshold"
        )
