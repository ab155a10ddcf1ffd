"""EKF speed: filter algebra vs its memory-traffic bound, dense vs blocked P, and the paper's water BPNN.

    python benchmarks/bench_ekf.py [--quick] [--device cuda] [--threads 2]

Figures (CPU timings on a shared 2-core VM are noisy):

* copy bandwidth (GB/s, read + write bytes) and float64 matmul peak (GFLOP/s) of this machine;
* dense filter step for n = 2827 (the paper's BPNN) with m = 1 and m = 10: time, its traffic bound
  (P streamed 3×: read for X = PJᵀ, read + write for P −= VᵀV) and achieved GFLOP/s (≈ 4n²m FLOP);
* dense vs blocked (greedy ≤ 2048) step time for n = 1e3 … 1e5 (dense only while P ≤ 4 GiB);
* water BPNN (``ekf_plugin.models.water_bpnn``) on 192-atom revPBE0-D3 frames: energy and force
  updates/s, labels/s, Jacobian vs filter time with the fast label path of ``PaperScheduleTask``
  (cached features, local dG/dr columns) and with the full model; peak RSS with the 1400 frames and
  their cached features in memory.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from pathlib import Path
from typing import Dict, Optional

import torch

VERBOSE = False


class _Figures(dict):
    """A dict that prints each figure as it is measured when ``VERBOSE`` (long runs on a busy machine)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if VERBOSE:
            print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}", flush=True)


DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "revpbe0-d3-cheng2019" / "dataset_1400_au.extxyz"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _best(fn, reps: int, device) -> float:
    """Best-of-``reps`` wall time (s) of ``fn()``."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(device="cpu", mib: int = 256, reps: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` counting read + write bytes."""
    src = torch.rand(mib * 2**20 // 8, dtype=torch.float64, device=device)
    dst = torch.empty_like(src)
    t = _best(lambda: dst.copy_(src), reps, device)
    return 2 * src.numel() * 8 / t / 1e9


def matmul_peak(device="cpu", n: int = 2048, reps: int = 3) -> float:
    """float64 GFLOP/s of an n×n matmul."""
    a = torch.rand(n, n, dtype=torch.float64, device=device)
    b = torch.rand(n, n, dtype=torch.float64, device=device)
    t = _best(lambda: a @ b, reps, device)
    return 2 * n**3 / t / 1e9


def filter_step(n: int, m: int, blocks="dense", device="cpu", reps: int = 5) -> float:
    """Seconds per EKF filter update (algebra only: given ξ (m,) and J (m, n))."""
    from ekf_plugin.optim import EKF

    w = torch.nn.Parameter(torch.zeros(n, device=device))
    opt = EKF([w], lr=1e-3, blocks=blocks, symmetrize_every=0, max_dense_bytes=64 * 2**30)
    g = torch.Generator(device=device).manual_seed(0)
    J = 1e-2 * torch.randn(m, n, dtype=torch.float64, device=device, generator=g)
    xi = 1e-3 * torch.randn(m, dtype=torch.float64, device=device, generator=g)
    t = _best(lambda: opt._update(xi, J), reps, device)
    del opt
    gc.collect()
    return t


def filter_figures(device="cpu", quick=False) -> Dict[str, float]:
    bw, peak = copy_bandwidth(device), matmul_peak(device)
    out = _Figures()
    out["copy_bandwidth_GBps"], out["matmul_f64_peak_GFLOPs"] = bw, peak
    n = 2827
    bound = 3 * n * n * 8 / (bw * 1e9)
    out["filter_traffic_bound_ms_n2827"] = 1e3 * bound
    for m in (1, 10):
        t = filter_step(n, m, device=device, reps=5 if quick else 20)
        out[f"filter_step_ms_n2827_m{m}"] = 1e3 * t
        out[f"filter_step_over_bound_m{m}"] = t / bound
        out[f"filter_GFLOPs_m{m}"] = 4 * n * n * m / t / 1e9
    sizes = (1000, 10000) if quick else (1000, 3000, 10000, 30000, 100000)
    for n in sizes:
        if n * n * 8 <= 4 * 2**30:
            out[f"dense_step_ms_n{n}_m10"] = 1e3 * filter_step(n, 10, device=device, reps=2 if n > 5000 else 5)
        out[f"blocked2048_step_ms_n{n}_m10"] = 1e3 * filter_step(n, 10, blocks=2048, device=device, reps=2 if n > 5000 else 5)
    return out


# ----------------------------------------------------------------------------- water BPNN
def _frames(limit: Optional[int] = None):
    """revPBE0-D3 frames converted once to Å, eV, eV/Å (the file is Bohr/Hartree)."""
    import ase.io
    from ase import units

    frames = ase.io.read(str(DATA), index=":" if limit is None else f":{limit}")
    for a in frames:
        e = a.info.get("TotEnergy", None)
        if e is None:
            e = a.get_potential_energy()
        f = a.arrays.get("force", None)
        if f is None:
            f = a.get_forces()
        a.set_cell(a.cell.array * units.Bohr)
        a.positions = a.positions * units.Bohr
        a.info["energy_ev"] = float(e) * units.Hartree
        a.arrays["forces_ev_ang"] = f * units.Hartree / units.Bohr
        a.calc = None
    return frames


def _batch(atoms, cutoff: float, device):
    """A SchNetPack input dict for one frame (neighbour list with ``cutoff`` Å) plus its labels."""
    import schnetpack.transform as trn
    from schnetpack.data.loader import _atoms_collate_fn
    from schnetpack.interfaces.ase_interface import AtomsConverter

    conv = AtomsConverter(neighbor_list=trn.MatScipyNeighborList(cutoff=cutoff), device=device, dtype=torch.float32)
    b = conv(atoms)
    b["energy"] = torch.tensor([atoms.info["energy_ev"]], dtype=torch.float32, device=device)
    b["forces"] = torch.tensor(atoms.arrays["forces_ev_ang"], dtype=torch.float32, device=device)
    return b


def _update_times(model, opt, batches, closure_for, device, k_updates: int):
    """Mean wall time (s) of energy and force updates and their Jacobian share; alternating kinds, 2 warm-up."""
    from ekf_plugin.training.schedule import ENERGY, FORCES

    t_jac = {ENERGY: [], FORCES: []}
    t_all = {ENERGY: [], FORCES: []}
    orig_update = opt._update

    def timed_update(xi, J):
        _sync(device)
        t = time.perf_counter()
        orig_update(xi, J)
        _sync(device)
        timed_update.dt = time.perf_counter() - t

    opt._update = timed_update
    for i in range(2 * k_updates):
        kind = ENERGY if i % 2 == 0 else FORCES
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        opt.step(closure_for(b, kind))
        _sync(device)
        dt = time.perf_counter() - t0
        if i >= 2:  # warm-up
            t_all[kind].append(dt)
            t_jac[kind].append(dt - timed_update.dt)
    opt._update = orig_update
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {kind: (mean(t_all[kind]), mean(t_jac[kind])) for kind in (ENERGY, FORCES)}


def bpnn_figures(device="cpu", quick=False) -> Dict[str, float]:
    """EKF updates of the study's water BPNN: fast label path (what ``PaperScheduleTask`` uses) and full model."""
    import schnetpack.properties as props
    from ekf_plugin.models import water_bpnn
    from ekf_plugin.optim import EKF
    from ekf_plugin.bpnn.label_predictor import BPNNLabelPredictor
    from ekf_plugin.training.schedule import ENERGY, FORCES, label_errors, weighted_errors
    from ekf_plugin.training.task import energy_only

    if not DATA.exists():
        return {"bpnn_skipped_no_data": 1.0}
    frames = _frames(8 if quick else None)
    model = water_bpnn(stress=False).to(device)
    model.train()
    cutoff = float(getattr(model, "cutoff", 6.350124))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    out: Dict[str, float] = _Figures()
    out["bpnn_weights"] = float(n)
    batches = []
    for k, atoms in enumerate(frames):
        b = _batch(atoms, cutoff, device)
        b[props.idx] = torch.tensor([k], device=device)
        batches.append(b)
    predictor = BPNNLabelPredictor(model)
    t = time.perf_counter()
    for b in batches:  # fill the feature cache (what the first training epoch does)
        predictor.features(b, 0)
    out["feature_cache_fill_s_per_frame"] = (time.perf_counter() - t) / len(batches)

    def fast_closure(b, kind):
        return lambda: label_errors(lambda: predictor.energies(b), lambda s, pick: predictor.force_components(b, s, pick),
                                    b, [kind], g)

    def full_closure(b, kind):
        def closure():
            with energy_only(model, kind == ENERGY):  # as PaperScheduleTask: no force graph for energy labels
                return weighted_errors(model(dict(b)), b, [kind], g)
        return closure

    k_updates = 5 if quick else 20
    fast = _update_times(model, EKF(model.parameters(), lr=1e-3), batches, fast_closure, device, k_updates)
    (e_all, e_jac), (f_all, f_jac) = fast[ENERGY], fast[FORCES]
    out["energy_update_ms"] = 1e3 * e_all
    out["force_update_ms"] = 1e3 * f_all
    out["energy_updates_per_s"] = 1 / e_all
    out["force_updates_per_s"] = 1 / f_all
    out["labels_per_s_1E_1F"] = 11 / (e_all + f_all)
    out["energy_jacobian_ms"] = 1e3 * e_jac
    out["force_jacobian_ms"] = 1e3 * f_jac
    out["force_filter_ms"] = 1e3 * (f_all - f_jac)
    full = _update_times(model, EKF(model.parameters(), lr=1e-3), batches, full_closure, device, 3 if quick else 5)
    out["full_model_energy_update_ms"] = 1e3 * full[ENERGY][0]
    out["full_model_force_update_ms"] = 1e3 * full[FORCES][0]
    out["full_model_labels_per_s_1E_1F"] = 11 / (full[ENERGY][0] + full[FORCES][0])
    out["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out["frames_in_memory"] = float(len(frames))
    return out


def run(quick: bool = False, device: Optional[str] = None) -> dict:
    device = device or "cpu"
    out = _Figures(filter_figures(device, quick))
    try:
        out.update(bpnn_figures(device, quick))
    except ImportError as exc:  # the BPNN model is another engineer's module
        out["bpnn_unavailable"] = str(exc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global VERBOSE
    VERBOSE = True
    run(args.quick, args.device)


if __name__ == "__main__":
    main()
