"""Learning curves of the PaiNN EKF-vs-Adam comparison against wall clock and against updates.

    python examples/water_painn/analyze.py RUN_EKF/metrics.csv RUN_ADAM/metrics.csv [EKF2 ADAM2 ...] [--out FIGURE.png]

One pair of logs per seed (EKF first, then Adam, same seed and wall clock); with several pairs the curves of
seed k are labelled "seed k" in the order given (``--seeds`` names them otherwise).

Reads the CSV logs of ``spktrain experiment=water_painn_ekf`` / ``water_painn_adam`` (``logger=csv``), prints a table of
the validation errors (energy per atom in meV/atom from ``val_energy_rmse`` / 192 atoms, forces in meV/Å from
``val_forces_rmse``; the data are in eV and Å) and draws both curves.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

N_ATOMS = 192  # revPBE0-D3 frames: 64 H2O


def validation_curve(path: Path):
    """[(update, wall s, E meV/atom, F meV/Å)] of every validation in a SchNetPack CSV log."""
    out = []
    for r in csv.DictReader(open(path)):
        if r.get("val_forces_rmse") and r.get("wall_time_s"):
            out.append((int(r["step"]) + 1, float(r["wall_time_s"]),
                        1e3 * float(r["val_energy_rmse"]) / N_ATOMS, 1e3 * float(r["val_forces_rmse"])))
    return out


def pair_curves(logs, seeds=None):
    """{label: curve} of EKF/Adam log pairs ``[ekf_0, adam_0, ekf_1, adam_1, ...]``, one pair per seed; a single
    pair keeps the plain labels, several get " seed k" (``seeds``: the names of the pairs' seeds)."""
    if len(logs) % 2:
        raise SystemExit(f"give the logs in pairs, EKF then Adam, per seed (got {len(logs)})")
    seeds = list(seeds) if seeds is not None else list(range(len(logs) // 2))
    if len(seeds) != len(logs) // 2:
        raise SystemExit(f"{len(seeds)} seed names for {len(logs) // 2} pairs of logs")
    curves = {}
    for k, seed in enumerate(seeds):
        tail = f", seed {seed}" if len(seeds) > 1 else ""
        curves[f"EKF (task=ekf){tail}"] = validation_curve(logs[2 * k])
        curves[f"Adam (SchNetPack default){tail}"] = validation_curve(logs[2 * k + 1])
    return curves


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", type=Path, nargs="+", help="metrics.csv of the EKF run, then of the Adam run, per seed")
    ap.add_argument("--seeds", help="comma-separated seed names of the pairs (default 0, 1, ...)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures/painn_ekf_vs_adam.png"))
    args = ap.parse_args(argv)
    curves = pair_curves(args.logs, args.seeds.split(",") if args.seeds else None)
    print(f"{'run':38s} {'updates':>8s} {'wall s':>8s} {'E meV/atom':>11s} {'F meV/Å':>9s}")
    for name, c in curves.items():
        for u, t, e, f in c:
            print(f"{name:38s} {u:8d} {t:8.0f} {e:11.2f} {f:9.1f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    styles = ["o-", "s--", "^:", "d-."]
    for k, (name, c) in enumerate(curves.items()):
        if not c:
            continue
        u, t, e, f = zip(*c)
        kw = dict(color="C0" if name.startswith("EKF") else "C1", ms=4)
        for col, x in enumerate((t, u)):
            axes[0, col].plot(x, f, styles[(k // 2) % len(styles)], label=name, **kw)
            axes[1, col].plot(x, e, styles[(k // 2) % len(styles)], label=name, **kw)
    for col, xl in enumerate(("wall clock (s, 1 thread, shared 2-core VM)", "updates")):
        axes[1, col].set_xlabel(xl)
        for row in range(2):
            axes[row, col].set_yscale("log")
            axes[row, col].grid(alpha=0.3)
    axes[0, 1].set_xscale("log"), axes[1, 1].set_xscale("log")
    axes[0, 0].set_ylabel("validation force RMSE (meV/Å)")
    axes[1, 0].set_ylabel("validation energy RMSE (meV/atom)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("PaiNN (157k weights) on revPBE0-D3 water: EKF vs Adam")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
