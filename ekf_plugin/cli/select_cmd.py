"""Rank candidate structures by the model's EKF uncertainty and write the K most uncertain ones (extxyz)
for the next round of reference calculations, plus a table (CSV) of every frame with its σ. The
uncertainty is σ = √(j P jᵀ) from the covariance file <MODEL>.cov.pt (write it with
`ekf-plugin covariance`); see docs/uncertainty.md for what the numbers mean."""

from __future__ import annotations

import argparse

NAME = "select"
HELP = "write the K structures of FRAMES the model is most uncertain about (EKF covariance J P Jᵀ)"

SCORES = ("energy_per_atom", "energy", "forces")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model file (ekf-plugin model, spktrain best_model) with <model>.cov.pt beside it")
    parser.add_argument("--data", required=True, help="candidate structures (any ASE-readable file, e.g. extxyz)")
    parser.add_argument("-n", type=int, required=True, help="how many structures to select (K)")
    parser.add_argument("--covariance", default=None, help="covariance file (default: <model>.cov.pt)")
    parser.add_argument("--output", "-o", default="selected.extxyz", help="selected structures (extxyz, Å/eV)")
    parser.add_argument("--table", default=None, help="CSV of all frames ranked (default: OUTPUT with .csv)")
    parser.add_argument("--score", choices=SCORES, default="energy_per_atom",
                        help="rank by σ_E/N (default), σ_E, or the largest per-atom force σ (3N rows: slower)")
    parser.add_argument("--units", choices=["ase", "au"], default="ase",
                        help="units of FRAMES: ase = Å/eV (default), au = Bohr/Hartree extxyz (TotEnergy, force)")
    parser.add_argument("--include-noise", action="store_true", help="add the label noise R to σ² (ranks unchanged for σ_E)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores the load average leaves idle, at least 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument("--trust-model", action="store_true", help="allow a full unpickle of a trusted best_model")


def _reference_energy(atoms):
    try:
        return float(atoms.get_potential_energy())
    except Exception:  # noqa: BLE001 - no calculator or no energy: no reference
        for key in ("energy", "TotEnergy", "Energy"):
            if key in atoms.info:
                return float(atoms.info[key])
    return None


def run(args: argparse.Namespace) -> int:
    import csv
    from pathlib import Path

    import numpy as np
    import torch

    from ..evaluation import ModelEvaluator, idle_cores, set_threads
    from ..models import ModelLoadError
    from ..progress import progress_bar
    from ..uncertainty import CovarianceError, PredictiveUncertainty, default_path, spearman

    if args.n < 1:
        print("ekf-plugin select: error: -n must be >= 1")
        return 1
    set_threads(args.threads if args.threads is not None else idle_cores())
    cov_path = Path(args.covariance) if args.covariance else default_path(args.model)
    try:
        if not cov_path.exists():
            raise FileNotFoundError(f"no covariance file {cov_path}: write it with `ekf-plugin covariance CHECKPOINT "
                                    f"--model {args.model}` (or pass --covariance)")
        if args.units == "au":
            from ..data import read_extxyz

            frames = read_extxyz(args.data, ":")
        else:
            from ase.io import read

            frames = read(args.data, index=":")
        if not frames:
            raise ValueError(f"no structures in {args.data}")
        ev = ModelEvaluator(args.model, device=args.device, dtype=torch.float64, fast_path=False,
                            trust_pickle=args.trust_model)
        unc = PredictiveUncertainty(ev, cov_path)
    except (FileNotFoundError, ModelLoadError, CovarianceError, ValueError) as exc:
        print(f"ekf-plugin select: error: {exc}")
        return 1

    rows = []
    forces = args.score == "forces"
    for i, atoms in enumerate(progress_bar(frames, desc="ekf-plugin select: uncertainty", unit="frame")):
        try:
            r = unc.atoms(atoms, forces=forces, include_noise=args.include_noise)
        except ValueError as exc:
            print(f"ekf-plugin select: error: frame {i} of {args.data}: {exc}")
            return 1
        n = len(atoms)
        ref = _reference_energy(atoms)
        rows.append({"frame": i, "n_atoms": n, "sigma_E_eV": r.energy_std, "sigma_E_per_atom_meV": 1e3 * r.energy_std / n,
                     "sigma_F_max_eV_per_A": float(r.forces_std_atoms.max()) if forces else float("nan"),
                     "E_pred_eV": r.energy, "E_ref_eV": float("nan") if ref is None else ref,
                     "abs_error_E_per_atom_meV": float("nan") if ref is None else 1e3 * abs(r.energy - ref) / n})
    key = {"energy_per_atom": "sigma_E_per_atom_meV", "energy": "sigma_E_eV", "forces": "sigma_F_max_eV_per_A"}[args.score]
    order = sorted(range(len(rows)), key=lambda k: -rows[k][key])
    k = min(args.n, len(rows))
    from ase.io import write

    selected = []
    for rank, idx in enumerate(order[:k], 1):
        a = frames[idx].copy()
        a.calc = frames[idx].calc
        a.info.update({"ekf_frame": idx, "ekf_rank": rank, "ekf_sigma_E_eV": rows[idx]["sigma_E_eV"]})
        selected.append(a)
    out = Path(args.output)
    write(str(out), selected, format="extxyz")
    table = Path(args.table) if args.table else out.with_suffix(".csv")
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["rank", "selected", *rows[0]])
        w.writeheader()
        for rank, idx in enumerate(order, 1):
            w.writerow({"rank": rank, "selected": int(rank <= k), **rows[idx]})
    print(f"wrote {k} of {len(rows)} structures to {out} (ranked by {key}) and the table {table}")
    errs = np.array([r["abs_error_E_per_atom_meV"] for r in rows])
    if len(rows) > 2 and np.isfinite(errs).all():
        rho = spearman([r["sigma_E_per_atom_meV"] for r in rows], errs)
        print(f"reference energies found: Spearman rank correlation of σ_E/N with |E_pred − E_ref|/N = {rho:.3f}")
    return 0
