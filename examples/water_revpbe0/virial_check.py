"""An independent check of the pressure bias: two models' pressures from their virials on the same frames.

    python virial_check.py BASE.pt OTHER.pt... --db work/data/water.db --split work/runs/RUN/split.npz \\
        --bias results/session9/pressure_bias.json --json results/session9/virial_check.json

For every frame of the split's validation part (Å, eV) each model's virial pressure P = −tr(σ)/3 (bar; σ the
model's stress, eV/Å³, ``ekf_plugin.evaluation``), and for each OTHER model the mean difference to BASE with its
standard error, beside the difference of their energy-trend biases (``--bias``, from ``analyze.py pressure-bias``,
entries named by ``--labels``). The virial difference is the exact pressure difference of the two models at the reference
configurations; the energy trend is the density dependence of the energy error across the frames. An NPT run
samples the model's own configurations, so neither is its equilibrium pressure exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="BASE first, then the models compared with it")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--split", type=Path, required=True)
    p.add_argument("--labels", nargs="+", help="names of the models (default: file stems), as in --bias")
    p.add_argument("--bias", type=Path, default=None, help="pressure_bias.json with entries named by the labels")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from ase import units

    from ekf_plugin.data import read_db_frames
    from ekf_plugin.evaluation import ModelEvaluator

    atoms = read_db_frames(args.db, np.load(args.split)["val_idx"])
    labels = args.labels or [m.stem for m in args.models]
    if len(labels) != len(args.models):
        raise SystemExit(f"need {len(args.models)} labels, got {len(labels)}")
    pressure = {}
    for model, label in zip(args.models, labels):
        ev = ModelEvaluator(str(model))
        pressure[label] = np.array([-np.trace(ev(a.numbers, a.positions, a.cell.array, pbc=a.pbc).stress) / 3 / units.bar
                                         for a in atoms])  # (n,) bar, virial part
    bias = json.loads(args.bias.read_text()) if args.bias else {}
    base = labels[0]
    out = {"base": base, "frames": len(atoms), "mean_virial_pressure_bar": {k: float(v.mean()) for k, v in pressure.items()},
           "differences": {}}
    for label in labels[1:]:
        d = pressure[label] - pressure[base]
        row = {"virial_bar": float(d.mean()), "virial_err_bar": float(d.std(ddof=1) / np.sqrt(d.size))}
        if label in bias and base in bias:
            row["energy_trend_bar"] = bias[label]["pressure_bias_bar"] - bias[base]["pressure_bias_bar"]
        out["differences"][label] = row
        print(f"{label} − {base}: {json.dumps({k: round(v) for k, v in row.items()})}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
