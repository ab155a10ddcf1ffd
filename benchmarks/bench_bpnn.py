"""BPNN speed on 192-atom revPBE0-D3 water: the MD step as the i-PI client runs it, against n2p2.

Figures (1 torch thread; ms per step unless named otherwise):

* ``md_float64_*`` / ``md_float32_*``: :class:`ekf_plugin.evaluation.ModelEvaluator` on the trained n2p2
  RPBE-D3 potential (the study's 30/27 functions, 12 Bohr cutoff) — energy, forces **and virial** through
  the BPNN MD step (:mod:`ekf_plugin.bpnn.md_step`), exactly what ``ekf-plugin ipi`` and
  ``ekf_plugin.calculator`` call. The structure moves like a short stretch of MD: every atom on a
  straight line at a thermal velocity drawn at 320 K (0.5 fs steps) and the cell by random strains of
  1e-5, so the Verlet list is reused and rebuilt about as often as in water MD (every ~7 steps in a
  1 ps NVE run with the 0.5 Å skin). ``_median`` is the median wall time of a step, ``_mean`` includes
  the list rebuilds, ``_cpu_median`` is the process CPU time (less sensitive to other jobs on a shared
  machine), ``_rebuilds`` the number of list builds in the timed steps. ``_compiled`` = the triple kernels
  and the triple builder as native C++ loops (``compile=True``, the default on CPU with a C++ compiler;
  built once in about a second), ``_eager`` = torch ops.
* ``general_float64_ms``: the same potential through SchNetPack's forward with autograd forces and
  strain stress (``fast_path=False``; the path before the MD step existed).
* ``n2p2_ms`` (when ``nnp-predict`` is on PATH): n2p2's energy + forces on the same frame, timed as
  the CPU time (user + sys) of ``nnp-predict`` on the 192-atom frame minus that on a 3-atom structure
  with the same potential (start-up, file reading, set-up cancel), median of ``reps`` runs each;
  ``ratio_*`` = our step / n2p2's, measured in the same run (``_cpu``: median CPU time of a step without
  a list rebuild; ``_mean_cpu``: mean CPU time including the rebuilds, what a long MD run pays).

Run: ``python benchmarks/bench_bpnn.py [--quick]`` or ``python -m benchmarks --only bpnn``.
Needs ``../shared/data``; n2p2: ``docs/install.md`` ("Building n2p2 for the side-by-side checks").
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FRAMES = DATA / "revpbe0-d3-cheng2019" / "dataset_1400_au.extxyz"
POTENTIAL = DATA / "n2p2-h2o-potentials" / "H2O_RPBE-D3"


def _frame():
    from ekf_plugin.data import read_extxyz

    return read_extxyz(FRAMES, index="0")[0]


def md_step(dtype: torch.dtype, steps: int, compile: bool, seed: int = 0) -> Dict[str, float]:
    """Time ``steps`` MD-like steps (see module docstring) after one warm-up call (which compiles)."""
    from ase import units

    from ekf_plugin.evaluation import ModelEvaluator

    atoms = _frame()
    ev = ModelEvaluator(str(POTENTIAL), dtype=dtype, compile=compile, threads=1)
    rng = np.random.default_rng(seed)
    z, r, h = atoms.numbers, atoms.positions.copy(), atoms.cell.array.copy()
    sigma = np.sqrt(units.kB * 320.0 / atoms.get_masses())[:, None]  # (N, 1) thermal speed per component
    v = rng.normal(size=r.shape) * sigma  # (N, 3) ASE velocity units (Å per ASE time unit)
    t0 = time.perf_counter()
    res = ev(z, r, h)
    first = time.perf_counter() - t0
    if compile:  # the compiled kernels must give the eager numbers
        from ekf_plugin.bpnn.md_step import BPNNStep

        eager = BPNNStep(ev.model, compile=False)(z, r, h)
        assert np.abs(eager.forces.numpy() - res.forces).max() <= 1e-9 * np.abs(res.forces).max(), "compiled != eager"
    builds0 = ev.fast.verlet.builds
    wall, cpu = [], []
    gc_was = gc.isenabled()
    gc.disable()  # no collector pauses inside the timed steps
    for _ in range(steps):
        r = r + v * (0.5 * units.fs)  # straight lines at 320 K thermal speeds, 0.5 fs steps
        h = h @ (np.eye(3) + rng.normal(0.0, 1e-5, (3, 3)))
        t, c = time.perf_counter(), time.process_time()
        res = ev(z, r, h)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    if gc_was:
        gc.enable()
    assert res.virial is not None and np.isfinite(res.forces).all()
    return {"median": 1e3 * statistics.median(wall), "mean": 1e3 * statistics.fmean(wall),
            "cpu_median": 1e3 * statistics.median(cpu), "cpu_mean": 1e3 * statistics.fmean(cpu),
            "rebuilds": float(ev.fast.verlet.builds - builds0),
            "first_call_s": first, "triples": float(ev.fast.n_triples)}


def general_path(dtype: torch.dtype, reps: int) -> float:
    """Median ms of SchNetPack's own forward (autograd forces, strain stress) on the frame."""
    from ekf_plugin.evaluation import ModelEvaluator

    atoms = _frame()
    ev = ModelEvaluator(str(POTENTIAL), dtype=dtype, fast_path=False, threads=1)
    ev(atoms.numbers, atoms.positions, atoms.cell.array)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        ev(atoms.numbers, atoms.positions, atoms.cell.array)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _nnp_cpu(workdir: Path) -> float:
    """CPU seconds (user + sys) of one ``nnp-predict 0`` run in ``workdir``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = subprocess.run(["nnp-predict", "0"], cwd=workdir, capture_output=True, text=True, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise RuntimeError(f"nnp-predict failed:\n{run.stdout[-1500:]}{run.stderr[-1500:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def n2p2_time(reps: int) -> Optional[Dict[str, float]]:
    """n2p2's energy + forces CPU ms on the frame (192 atoms minus 3 atoms), or None without nnp-predict."""
    if shutil.which("nnp-predict") is None:
        return None
    from ase import Atoms

    from ekf_plugin.n2p2.writer import write_input_data

    atoms = _frame()
    tiny = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=atoms.cell, pbc=True)
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_n2p2_") as tmp:
        for name, structure in (("frame", atoms), ("tiny", tiny)):
            d = Path(tmp) / name
            shutil.copytree(POTENTIAL, d)
            write_input_data([structure], d / "input.data", with_labels=False)
            _nnp_cpu(d)  # warm the file cache
            out[name] = statistics.median(_nnp_cpu(d) for _ in range(reps))
    return {"n2p2_ms": 1e3 * (out["frame"] - out["tiny"]), "n2p2_process_cpu_ms": 1e3 * out["frame"],
            "n2p2_startup_cpu_ms": 1e3 * out["tiny"]}


def run(quick: bool = False) -> dict:
    """Headline figures (module docstring)."""
    if not (FRAMES.exists() and POTENTIAL.exists()):
        return {"skipped": f"needs {FRAMES} and {POTENTIAL}"}
    torch.set_num_threads(1)
    steps = 10 if quick else 100
    res: Dict[str, object] = {"frame": "revPBE0-D3 frame 0, 192 atoms", "threads": 1,
                              "load_average_start": os.getloadavg()[0]}
    from ekf_plugin.bpnn.md_step import default_compile

    modes = [("compiled", True)] if default_compile("cpu") else []
    modes.append(("eager", False))
    for label, comp in modes:
        for dtype in (torch.float64, torch.float32):
            name = f"md_{str(dtype).split('.')[-1]}_{label}"
            for k, v in md_step(dtype, steps if comp else max(steps // 4, 5), comp).items():
                unit = "" if k in ("rebuilds", "first_call_s", "triples") else "_ms"
                res[f"{name}_{k}{unit}"] = v
    res["general_float64_ms"] = general_path(torch.float64, 3 if quick else 7)
    res["general_float32_ms"] = general_path(torch.float32, 3 if quick else 7)
    n2p2 = n2p2_time(3 if quick else 9)
    if n2p2 is not None:
        res.update(n2p2)
        best = modes[0][0]
        for dt in ("float64", "float32"):
            res[f"ratio_{dt}_{best}_cpu_to_n2p2"] = res[f"md_{dt}_{best}_cpu_median_ms"] / n2p2["n2p2_ms"]
            res[f"ratio_{dt}_{best}_wall_to_n2p2"] = res[f"md_{dt}_{best}_median_ms"] / n2p2["n2p2_ms"]
            res[f"ratio_{dt}_{best}_mean_cpu_to_n2p2"] = res[f"md_{dt}_{best}_cpu_mean_ms"] / n2p2["n2p2_ms"]
    res["load_average_end"] = os.getloadavg()[0]
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 steps instead of 100")
    args = parser.parse_args()
    for k, v in run(args.quick).items():
        print(f"{k:<44} {v:.4g}" if isinstance(v, float) else f"{k:<44} {v}")


if __name__ == "__main__":
    main()
