"""BPNN speed on one 192-atom revPBE0-D3 water frame: energy + forces + stress.

Times (median of ``reps`` after warm-up) for 1 and 2 threads, float32 and float64:

* ``neighbor_list``: SchNetPack ``MatScipyNeighborList`` at 12 Bohr (in ``AtomsConverter``);
* ``symmetry_functions``: raw G2/G3 forward only;
* ``networks``: element networks forward on precomputed features;
* ``inference``: full model, energy + forces + stress (eval mode, no graph kept);
* ``*_compiled``: the per-triple math fused with ``torch.compile`` (``compile_kernels=True``);
* ``training``: same in train mode (forces with ``create_graph=True``) plus the backward pass of
  a loss on energy and forces to the weights.

Anchor (issue, this machine type): n2p2 takes 37.1 ms per frame for energy + forces (one process).
Run: ``python benchmarks/bench_bpnn.py [--quick]``. Needs ``../shared/data`` (or a 192-atom
random water box is used instead, and said so).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

N2P2_MS = 37.1
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "revpbe0-d3-cheng2019" / "dataset_1400_au.extxyz"


def _frame():
    if DATA.exists():
        from ekf_plugin.data import read_extxyz

        return read_extxyz(DATA, index="0")[0], "revPBE0-D3 frame 0"
    from ekf_plugin.demo import water_box

    return water_box(4), "demo water box (shared data absent)"


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def measure(threads: int, dtype: torch.dtype, reps: int, compile_kernels: bool = False) -> dict:
    import ekf_plugin.compat  # noqa: F401
    import schnetpack as spk
    from ekf_plugin.models import water_bpnn

    torch.set_num_threads(threads)
    atoms, _ = _frame()
    model = water_bpnn(dtype=dtype, stress=True, seed=0, compile_kernels=compile_kernels)
    rep = model.representation
    nl = spk.transform.MatScipyNeighborList(cutoff=float(rep.cutoff))
    conv = spk.interfaces.AtomsConverter(nl, dtype=dtype)
    batch = conv(atoms)
    pos = batch["_positions"]
    rij = pos[batch["_idx_j"]] - pos[batch["_idx_i"]] + batch["_offsets"]
    species = rep.species_table[batch["_atomic_numbers"]]
    feats = {"_atomic_numbers": batch["_atomic_numbers"], "_Rij": rij, "_idx_i": batch["_idx_i"], "_idx_j": batch["_idx_j"]}
    out = {}
    out["neighbor_list"] = _median_ms(lambda: conv(atoms), reps)
    with torch.no_grad():
        out["symmetry_functions"] = _median_ms(lambda: rep.sf(species, rij, batch["_idx_i"], batch["_idx_j"]), reps)
        x = rep(dict(feats))["scalar_representation"]
        nets = model.output_modules[0]
        nb = {"scalar_representation": x, "_atomic_numbers": batch["_atomic_numbers"], "_idx_m": batch["_idx_m"],
              "_n_atoms": batch["_n_atoms"]}
        out["networks"] = _median_ms(lambda: nets(dict(nb)), reps)
    model.eval()
    out["inference"] = _median_ms(lambda: model(dict(batch)), reps)

    def train_step():
        res = model(dict(batch))
        loss = res["energy"].pow(2).sum() + res["forces"].pow(2).sum()
        loss.backward()

    model.train()
    out["training"] = _median_ms(train_step, reps)
    n = len(atoms)
    out["inference_us_per_atom"] = 1e3 * out["inference"] / n
    out["training_us_per_atom"] = 1e3 * out["training"] / n
    out["pairs"] = int(batch["_idx_i"].numel())
    return out


def run(quick: bool = False) -> dict:
    """Headline figures: ms per 192-atom frame (energy + forces + stress) and µs/atom."""
    reps = 3 if quick else 20
    results = {}
    for dtype in (torch.float32, torch.float64):
        for threads in (1, 2):
            results[f"{str(dtype).split('.')[-1]}_{threads}thr"] = measure(threads, dtype, reps)
    if not quick:
        results["float32_1thr_compiled"] = measure(1, torch.float32, reps, compile_kernels=True)
    _, label = _frame()
    results["frame"] = label
    results["n2p2_anchor_ms"] = N2P2_MS
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 20")
    args = parser.parse_args()
    res = run(args.quick)
    print(f"frame: {res['frame']}  (n2p2 anchor: {N2P2_MS} ms/frame energy+forces, 1 process)")
    keys = ["neighbor_list", "symmetry_functions", "networks", "inference", "training"]
    print(f"{'config':<22}" + "".join(f"{k:>20}" for k in keys) + f"{'inf us/atom':>14}{'train us/atom':>15}")
    for name, r in res.items():
        if isinstance(r, dict):
            print(f"{name:<22}" + "".join(f"{r[k]:>17.1f} ms" for k in keys)
                  + f"{r['inference_us_per_atom']:>14.0f}{r['training_us_per_atom']:>15.0f}")


if __name__ == "__main__":
    main()
