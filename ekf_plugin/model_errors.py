"""Errors of a model on labelled structures, and the pressure error its energy errors imply.

Units: structures in Å, labels in eV and eV/Å (convert at the file boundary, :mod:`ekf_plugin.data`); errors
are model − reference, energies per atom. Besides the RMSEs a user needs before NPT molecular dynamics the
**pressure bias**: where a model's energy error changes with the volume of the structures, its pressure is
wrong by ΔP = −d(ΔE)/dV, a derivative along the cell that a force RMSE (derivatives along atoms) cannot see. For
structures of N atoms, ΔE = N·e and V = N·v with e the error per atom and v the volume per atom, so
d(ΔE)/dV = de/dv: the slope of e against v over the frames (:func:`energy_volume_trend`). It needs frames at
different densities (the revPBE0-D3 water set spans 0.70–1.23 g/mL). On the committed water models it
predicts the direction of every NPT density more than 3 % off the reference (docs/results.md, session 9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional

import numpy as np

# a liquid's density under a pressure error ΔP: ρ ≈ ρ₀·exp(−κ·ΔP); water near 320 K: κ ≈ 4.5e-5 /bar
WATER_COMPRESSIBILITY_PER_BAR = 4.5e-5


@dataclass
class FrameErrors:
    """Per-frame errors, model − reference: ``energy`` (n,) eV/atom, ``forces_rmse`` (n,) eV/Å per frame,
    ``forces`` (3·Σ atoms,) every component (eV/Å), ``volume`` (n,) Å³/atom (NaN for a frame without a cell)."""

    energy: np.ndarray
    forces_rmse: np.ndarray
    forces: np.ndarray
    volume: np.ndarray


def frame_errors(evaluate: Callable, frames: Iterable, progress: Optional[Callable] = None) -> FrameErrors:
    """Errors of ``evaluate`` (an :class:`ekf_plugin.evaluation.ModelEvaluator` or anything called as
    ``evaluate(numbers, positions, cell, pbc=...)`` returning ``.energy`` eV and ``.forces`` eV/Å) on ASE
    ``frames`` whose calculators hold the reference energy (eV) and forces (eV/Å). ``progress`` wraps the
    frame iterator (e.g. ``tqdm``)."""
    de, df, vol = [], [], []
    for atoms in (progress(frames) if progress else frames):
        res = evaluate(atoms.numbers, atoms.positions, atoms.cell.array, pbc=atoms.pbc)
        n = len(atoms)
        de.append((res.energy - atoms.get_potential_energy()) / n)  # eV/atom
        df.append((np.asarray(res.forces) - atoms.get_forces()).ravel())  # (3n,) eV/Å
        vol.append(atoms.get_volume() / n if atoms.pbc.all() and atoms.cell.rank == 3 else np.nan)  # Å³/atom
    if not de:
        raise ValueError("no frames to evaluate")
    return FrameErrors(np.array(de), np.array([np.sqrt((f**2).mean()) for f in df]), np.concatenate(df),
                       np.array(vol))


def energy_volume_trend(volume: np.ndarray, energy_error: np.ndarray) -> Dict[str, float]:
    """The linear trend of a model's energy error e (eV/atom) with the volume per atom v (Å³/atom) over frames:
    the mean error (a common offset, which moves no atom; meV/atom), the slope de/dv (meV/Å³), its correlation
    coefficient r, the pressure bias ΔP = −de/dv (bar) with its standard error (bar; the least-squares slope's,
    frames taken as independent) and the error's standard deviation about the line (meV/atom). ΔP > 0: the model pushes the box outward, an NPT run at the reference pressure ends less dense;
    ΔP < 0: it compresses. Needs at least 3 frames at different volumes (``ValueError`` otherwise)."""
    from ase import units

    v, e = np.asarray(volume, dtype=float), np.asarray(energy_error, dtype=float)
    if v.shape != e.shape or v.size < 3 or not np.isfinite(v).all() or np.ptp(v) <= 1e-9 * abs(v).max():
        spread = np.ptp(v) if v.size and np.isfinite(v).all() else float("nan")
        raise ValueError(f"need >= 3 periodic frames at different volumes, got {v.size} (volume range {spread} Å³/atom)")
    slope, intercept = np.polyfit(v, e, 1)  # eV/Å³, eV/atom
    resid = e - (intercept + slope * v)  # (n,) eV/atom
    slope_err = np.sqrt((resid**2).sum() / (v.size - 2) / ((v - v.mean()) ** 2).sum()) if v.size > 2 else np.inf
    return {"energy_error_mean_meV_per_atom": float(e.mean() * 1e3),
            "energy_error_volume_slope_meV_per_A3": float(slope * 1e3),
            "energy_error_volume_r": float(np.corrcoef(v, e)[0, 1]) if e.std() > 0 else 0.0,
            "pressure_bias_bar": float(-slope / units.bar),
            "pressure_bias_err_bar": float(slope_err / units.bar),
            "energy_error_std_about_trend_meV_per_atom": float(resid.std() * 1e3)}


def error_summary(err: FrameErrors) -> Dict[str, object]:
    """RMSEs (meV/atom, meV/Å), frame count and, where the frames allow it, the energy–volume trend
    (:func:`energy_volume_trend`); otherwise ``pressure_bias_bar`` is None and ``pressure_bias_note`` says why."""
    out: Dict[str, object] = {"frames": int(err.energy.size),
                              "energy_rmse_meV_per_atom": float(np.sqrt((err.energy**2).mean()) * 1e3),
                              "forces_rmse_meV_per_A": float(np.sqrt((err.forces**2).mean()) * 1e3)}
    try:
        out.update(energy_volume_trend(err.volume, err.energy))
    except ValueError as exc:
        out.update(energy_error_mean_meV_per_atom=float(err.energy.mean() * 1e3), pressure_bias_bar=None,
                   pressure_bias_note=str(exc))
    return out


def density_factor(pressure_bias_bar: float, compressibility_per_bar: float = WATER_COMPRESSIBILITY_PER_BAR) -> float:
    """ρ/ρ₀ = exp(−κ·ΔP): the density an NPT run at the reference pressure ends at, relative to the reference,
    for a liquid of isothermal compressibility κ (default: water, 4.5e-5 /bar) and a pressure bias ΔP (bar).
    A linear-response estimate: on the water models it was within 7 % for |ΔP| ≤ 5000 bar."""
    return float(np.exp(-compressibility_per_bar * pressure_bias_bar))
