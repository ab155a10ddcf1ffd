"""Learning curves of the PaiNN EKF-vs-Adam comparison against wall clock and against updates.

    python examples/water_painn/analyze.py RUN_EKF/metrics.csv RUN_ADAM/metrics.csv [--out docs/figures/painn_ekf_vs_adam.png]

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ekf", type=Path)
    ap.add_argument("adam", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/figures/painn_ekf_vs_adam.png"))
    args = ap.parse_args(argv)
    curves = {"EKF (task=ekf)": validation_curve(args.ekf), "Adam (SchNetPack default)": validation_curve(args.adam)}
    print(f"{'run':28s} {'updates':>8s} {'wall s':>8s} {'E meV/atom':>11s} {'F meV/Å':>9s}")
    for name, c in curves.items():
        for u, t, e, f in c:
            print(f"{name:28s} {u:8d} {t:8.0f} {e:11.2f} {f:9.1f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    for name, c in curves.items():
        if not c:
            continue
        u, t, e, f = zip(*c)
        for col, x in enumerate((t, u)):
            axes[0, col].plot(x, f, "o-", label=name)
            axes[1, col].plot(x, e, "o-", label=name)
    for col, xl in enumerate(("wall clock (s, 1 thread, shared 2-core VM)", "updates")):
        axes[1, col].set_xlabel(xl)
        for row in range(2):
            axes[row, col].set_yscale("log")
            axes[row, col].grid(alpha=0.3)
    axes[0, 1].set_xscale("log"), axes[1, 1].set_xscale("log")
    axes[0, 0].set_ylabel("validation force RMSE (meV/Å)")
    axes[1, 0].set_ylabel("validation energy RMSE (meV/atom)")
    axes[0, 0].legend()
    fig.suptitle("PaiNN (157k weights) on revPBE0-D3 water: EKF vs Adam")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
