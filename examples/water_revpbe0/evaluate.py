"""Export trained models to ekf-plugin's own format and measure their validation errors.

    python evaluate.py RUN_DIR... --db data/water.db --models models --max-frames 100 --json errors.json

For each spktrain run directory: loads ``best_model``, writes ``<models>/<run id>.pt`` (ekf-plugin format,
loads with ``torch.load(weights_only=True)`` and with ``ekf_plugin.calculator``), and evaluates energy
(meV/atom) and force (meV/Å) RMSE on the run's own validation split (``split.npz``), in float64.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def validation_frames(db: Path, run_dir: Path, max_frames: int):
    from ase.db import connect

    idx = np.load(run_dir / "split.npz")["val_idx"][:max_frames]
    with connect(str(db)) as con:
        return [con.get(int(i) + 1) for i in idx]


def rmse_on(model_path: Path, rows, device: str) -> dict:
    from ekf_plugin.evaluation import ModelEvaluator

    ev = ModelEvaluator(str(model_path), device=device)
    de, df = [], []
    for row in rows:
        atoms = row.toatoms()
        res = ev(atoms.numbers, atoms.positions, atoms.cell.array, pbc=atoms.pbc)
        de.append((res.energy - float(row.data["energy"][0])) / len(atoms))
        df.append((res.forces - row.data["forces"]).ravel())
    de, df = np.array(de), np.concatenate(df)
    return {"energy_rmse_meV_per_atom": float(np.sqrt((de**2).mean()) * 1e3),
            "forces_rmse_meV_per_A": float(np.sqrt((df**2).mean()) * 1e3), "frames": len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--db", type=Path, required=True, help="the ASE database the runs trained on (Å, eV)")
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--max-frames", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=Path("errors.json"))
    args = p.parse_args(argv)
    from ekf_plugin.models import load_model, save_model

    args.models.mkdir(parents=True, exist_ok=True)
    table = {}
    for run in args.runs:
        out = args.models / f"{run.name}.pt"
        save_model(load_model(run / "best_model", stress=False), out)
        table[run.name] = rmse_on(out, validation_frames(args.db, run, args.max_frames), args.device)
        print(f"{run.name}: {table[run.name]}  -> {out}", flush=True)
    args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
