"""What the MD client and the EKF cost on an accelerator (issues #11 item 5 and #12 item 3), measured the way
users run them, on ``--device`` (CUDA where one is lent; CPU gives the same table for comparison).

- MD step: :class:`ekf_plugin.evaluation.ModelEvaluator` (what ``ekf-plugin ipi --device`` calls per step:
  neighbour list, energy, forces and virial) of the n2p2 RPBE-D3 water potential (``--model``, default from
  ``../shared/data`` or ``$EKF_PLUGIN_SHARED_DATA``), float64 and float32, on water boxes of 64 and 512 molecules
  (192 and 1536 atoms, 1 g/cm³), each atom moved by 0.01 Å between calls as in MD; median ms per step and steps/s.
- EKF filter: one update of a dense P (n = 2827, the study's BPNN, float64, m = 1 and 10) and of a blocked P
  (n = 10⁵ in blocks of 5120, m = 5, float32) through :class:`ekf_plugin.optim.EKF` (``_update``), median ms.

    python -m benchmarks --only gpu --device cuda            # on the device (scripts/device_check.sh)
    python -m benchmarks --only gpu --quick                  # the same on this CPU
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from benchmarks.bench_ekf import _sync  # the host-device synchronisation the other timings use

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("EKF_PLUGIN_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def md_step_figures(model: Path, device: torch.device, quick: bool) -> Dict[str, float]:
    """Median ms per MD step (energy, forces, virial) and steps/s for 192 and 1536 water atoms, float64/32."""
    from ekf_plugin.demo import water_box
    from ekf_plugin.evaluation import ModelEvaluator

    out: Dict[str, float] = {}
    steps = 10 if quick else 50
    for n_side in (4, 8):
        atoms = water_box(n_side=n_side, density=1.0, seed=0)
        nat = len(atoms)
        for dtype in (torch.float64, torch.float32):
            ev = ModelEvaluator(str(model), device=device, dtype=dtype)
            rng = np.random.default_rng(0)
            r, h = atoms.positions.copy(), atoms.cell.array.copy()
            for _ in range(3):  # warm-up: kernels, allocator, the first neighbour list
                ev(atoms.numbers, r, h, pbc=atoms.pbc)
            times = []
            for _ in range(steps):
                r = r + rng.normal(0.0, 0.01, r.shape)
                _sync(device)
                t = time.perf_counter()
                res = ev(atoms.numbers, r, h, pbc=atoms.pbc)
                _sync(device)
                times.append(time.perf_counter() - t)
            assert np.isfinite(res.energy) and np.isfinite(res.forces).all()
            name = f"md_step_{nat}_atoms_{str(dtype).split('.')[-1]}"
            out[f"{name}_ms"] = 1e3 * statistics.median(times)
            out[f"{name}_steps_per_s"] = 1.0 / statistics.median(times)
    return out


def filter_figures(device: torch.device, quick: bool) -> Dict[str, float]:
    """Median ms of one EKF filter update (``EKF._update``) for the dense and the blocked P."""
    from ekf_plugin.optim import EKF

    out: Dict[str, float] = {}
    reps = 5 if quick else 20
    cases = [("dense_n2827_m1_f64", 2827, 1, "dense", torch.float64), ("dense_n2827_m10_f64", 2827, 10, "dense",
                                                                        torch.float64)]
    if not quick:
        cases.append(("blocked5120_n100000_m5_f32", 100_000, 5, 5120, torch.float32))
    for name, n, m, blocks, dtype in cases:
        w = torch.nn.Parameter(torch.zeros(n, device=device))
        opt = EKF([w], lr=1e-3, blocks=blocks, dtype=dtype)
        g = torch.Generator(device="cpu").manual_seed(0)
        times = []
        for _ in range(reps + 2):
            J = (torch.randn(m, n, generator=g, dtype=dtype) / n**0.5).to(device)  # (m, n)
            xi = (torch.randn(m, generator=g, dtype=dtype) * 1e-3).to(device)  # (m,)
            _sync(device)
            t = time.perf_counter()
            opt._update(xi, J)
            _sync(device)
            times.append(time.perf_counter() - t)
        out[f"ekf_filter_{name}_ms"] = 1e3 * statistics.median(times[2:])
        del opt, w
    return out


def run(quick: bool = False, device: Optional[str] = None) -> dict:
    dev = torch.device(device or "cpu")
    if dev.type == "cpu":
        torch.set_num_threads(1)
    out: dict = {"device": str(dev)}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    model = _data_root() / "n2p2-h2o-potentials" / "H2O_RPBE-D3"
    if model.exists():
        out.update(md_step_figures(model, dev, quick))
    else:
        out["md_skipped"] = f"needs {model}"
    out.update(filter_figures(dev, quick))
    return out
