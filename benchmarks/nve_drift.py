"""NVE energy drift of the BPNN MD step, float32 vs float64 (192-atom revPBE0-D3 water, n2p2 RPBE-D3 potential).

ASE velocity Verlet, 0.5 fs, Maxwell-Boltzmann velocities at 320 K (same seed for both precisions),
``ekf_plugin.calculator`` (the MD step, native kernels by default). Prints the drift of the total energy as
the slope of a least-squares line (meV/atom/ps) and its RMS fluctuation about the line (meV/atom);
``--out F.json`` also writes the series (time, total energy, temperature every 10 steps) for plotting.

    python benchmarks/nve_drift.py --steps 2000                                   # 1 ps per precision
    python benchmarks/nve_drift.py --steps 20000 --dtypes float32 --out f32.json  # 10 ps, one precision
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def run(dtype: str, steps: int, every: int = 10, seed: int = 0) -> dict:
    import torch
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    import ekf_plugin
    from ekf_plugin.data import read_extxyz

    torch.set_num_threads(1)
    atoms = read_extxyz(DATA / "revpbe0-d3-cheng2019" / "dataset_1400_au.extxyz", index="0")[0]
    atoms.calc = ekf_plugin.calculator(str(DATA / "n2p2-h2o-potentials" / "H2O_RPBE-D3"), dtype=getattr(torch, dtype),
                                       threads=1)
    MaxwellBoltzmannDistribution(atoms, temperature_K=320, rng=np.random.default_rng(seed))
    Stationary(atoms)
    md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    t, e, temp = [], [], []

    def record():
        t.append(md.nsteps * 0.5e-3)  # ps
        e.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        temp.append(atoms.get_temperature())

    md.attach(record, interval=every)
    t0 = time.perf_counter()
    md.run(steps)
    wall = time.perf_counter() - t0
    t, e = np.array(t), np.array(e) / len(atoms) * 1e3  # ps, meV/atom
    slope, icpt = np.polyfit(t, e, 1)
    resid = e - (slope * t + icpt)
    return {"dtype": dtype, "steps": steps, "ps": steps * 0.5e-3, "drift_meV_per_atom_per_ps": float(slope),
            "fluct_rms_meV_per_atom": float(resid.std()), "max_minus_min_meV_per_atom": float(e.max() - e.min()),
            "wall_s": wall, "ms_per_step": 1e3 * wall / steps,
            "temperature_end_K": float(atoms.get_temperature()),
            "list_builds": int(atoms.calc.evaluator.fast.verlet.builds) if atoms.calc.evaluator.fast else None,
            "kernels": str(atoms.calc.evaluator.fast.compile) if atoms.calc.evaluator.fast else None,
            "series": {"t_ps": t.tolist(), "e_meV_per_atom": e.tolist(), "temperature_K": temp}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--dtypes", default="float64,float32")
    p.add_argument("--out", help="write the results with the series to this JSON file")
    a = p.parse_args()
    out = [run(dt, a.steps) for dt in a.dtypes.split(",")]
    if a.out:
        Path(a.out).write_text(json.dumps(out))
    print(json.dumps([{k: v for k, v in o.items() if k != "series"} for o in out], indent=1))
