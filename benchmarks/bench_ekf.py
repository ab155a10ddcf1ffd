"""EKF speed: the filter against its memory-traffic bound, the study's water BPNN per update and inside
``spktrain``, and ``task=ekf`` on a 157k-weight PaiNN. One thread throughout (``torch.set_num_threads(1)``,
``OMP/MKL/OPENBLAS_NUM_THREADS=1`` for the spktrain subprocess); medians.

    python -m benchmarks --only ekf [--quick]        (or python benchmarks/bench_ekf.py [--quick])

Figures:

* copy bandwidth (GB/s, read + write bytes) and float64 matmul peak (GFLOP/s) of this machine;
* filter step for n = 2827 (the study's BPNN), m = 1 and m = 10, per kernel (``torch``: full P, 3 passes;
  ``blas``: one triangle, 1.5 passes) and as a ratio to that kernel's traffic bound at the measured bandwidth;
  blocked (≤ 5120) steps for n = 1e4, 1e5 with m = 5 in float64 and float32;
* water BPNN on 192-atom revPBE0-D3 frames through ``PaperScheduleTask._errors``: features computed once per
  frame, the 10 force columns, energy/force update time (means) split into labels + Jacobian rows and filter,
  with closed-form rows and deferred P rows (default), every update applied at once (``immediate_``, the
  filter before deferral) and autograd rows; updates/s of the study's half/half mix;
* ``spktrain experiment=water_bpnn_ekf`` on 400 frames (320 train / 80 val), 3 epochs: time to the first
  update, steady-state updates/s of the whole Lightning loop, validation time (after the first, which computes the validation features) over the training time of an epoch;
* ``spktrain`` with two processes sharing one EKF (Lightning DDP, gloo, P split by rows) against one process:
  updates/s and labels/s, the same update split between the processes and one structure per process
  (``spktrain_2proc_*``, :func:`spktrain_2proc_figures`);
* PaiNN (n_atom_basis 64, 157k weights), ``task=ekf``'s reduced-row update: forward, 5 Jacobian rows, filter
  (float32 P, blocks of 5120), updates/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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


def filter_step(n: int, m: int, blocks="dense", device="cpu", reps: int = 5, kernel: str = "auto",
                dtype=torch.float64) -> float:
    """Median seconds per EKF filter update (algebra only: given ξ (m,) and J (m, n))."""
    from ekf_plugin.optim import EKF

    w = torch.nn.Parameter(torch.zeros(n, device=device))
    opt = EKF([w], lr=1e-3, blocks=blocks, symmetrize_every=0, max_dense_bytes=64 * 2**30, kernel=kernel, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(0)
    J = 1e-2 * torch.randn(m, n, dtype=dtype, device=device, generator=g)
    xi = 1e-3 * torch.randn(m, dtype=dtype, device=device, generator=g)
    t = _median(lambda: opt._update(xi, J), reps, device)
    del opt
    gc.collect()
    return t


def _median(fn, reps: int, device) -> float:
    """Median wall time (s) of ``fn()`` over ``reps`` calls after one warm-up."""
    fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def filter_figures(device="cpu", quick=False) -> Dict[str, float]:
    """Filter step of the study's BPNN (n = 2827) per kernel, against the memory traffic it needs.

    Traffic bound: the bytes a kernel must move through memory at the measured copy bandwidth: the torch
    kernel streams P three times (read for X = PJᵀ, read + write for P −= VᵀV), the BLAS kernel touches one
    triangle, i.e. 1.5 passes.
    """
    from ekf_plugin.optim.kernels import select_kernel

    bw, peak = copy_bandwidth(device), matmul_peak(device)
    out = _Figures()
    out["copy_bandwidth_GBps"], out["matmul_f64_peak_GFLOPs"] = bw, peak
    n = 2827
    full_bound = 3 * n * n * 8 / (bw * 1e9)
    out["filter_traffic_bound_ms_n2827_full"] = 1e3 * full_bound
    out["filter_traffic_bound_ms_n2827_triangle"] = 1e3 * full_bound / 2
    kernels = ["torch"] + (["blas"] if select_kernel("auto", torch.device(device), torch.float64).name == "blas" else [])
    reps = 5 if quick else 25
    for kernel in kernels:
        bound = full_bound / 2 if kernel == "blas" else full_bound
        for m in (1, 10):
            t = filter_step(n, m, device=device, reps=reps, kernel=kernel)
            out[f"filter_step_ms_n2827_m{m}_{kernel}"] = 1e3 * t
            out[f"filter_step_over_its_bound_m{m}_{kernel}"] = t / bound
    if "blas" in kernels:
        for m in (1, 10):
            out[f"filter_blas_speedup_m{m}"] = out[f"filter_step_ms_n2827_m{m}_torch"] / out[f"filter_step_ms_n2827_m{m}_blas"]
    sizes = (10000,) if quick else (10000, 100000)
    for n in sizes:
        out[f"blocked5120_step_ms_n{n}_m5_f64"] = 1e3 * filter_step(n, 5, blocks=5120, device=device, reps=2 if n > 5000 else 5)
        out[f"blocked5120_step_ms_n{n}_m5_f32"] = 1e3 * filter_step(n, 5, blocks=5120, device=device, reps=2 if n > 5000 else 5,
                                                                     dtype=torch.float32)
    return out


def shard_piece_figures(quick=False, n: int = 2827) -> Dict[str, float]:
    """The two passes over P of each process of a 2-process sharded filter (``trainer=ddp_cpu_split``), timed
    in this one process without communication, against the single-process passes on the same P: X = P Jᵀ
    (``ShardPlan.xt_and_diag``) and P −= VᵀV (``ShardPlan.sub_gram_``), float64, the default kernel, one
    thread, m = 1 and 10. Rank 0 owns the first rows (a small triangle and the rectangle right of it), rank 1
    the rest (a large triangle)."""
    from ekf_plugin.optim.kernels import select_kernel
    from ekf_plugin.optim.sharded import ShardPlan

    kernel = select_kernel("auto", torch.device("cpu"), torch.float64)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    P = A @ A.T / n + torch.eye(n, dtype=torch.float64)  # (n, n) symmetric positive definite
    del A
    reps = 5 if quick else 25
    out = _Figures()
    for name, rank, world in (("rank0", 0, 2), ("rank1", 1, 2), ("1proc", 0, 1)):
        plan = ShardPlan([(0, n)], rank, world, None, kernel)
        plan._all_reduce = lambda t: None  # the passes alone
        local = plan.scatter([P], torch.float64, "cpu")
        out[f"shard_{name}_rows"] = float(plan.pieces[0].rows)
        for m in (1, 10):
            J = torch.randn(m, n, generator=g, dtype=torch.float64)  # (m, n)
            V = 1e-4 * torch.randn(m, n, generator=g, dtype=torch.float64)  # (m, n), small: P stays positive
            xt = _median(lambda: plan.xt_and_diag(local, J), reps, "cpu")
            sg = _median(lambda: plan.sub_gram_(local, V), reps, "cpu")
            out[f"shard_{name}_xt_ms_m{m}"], out[f"shard_{name}_sub_gram_ms_m{m}"] = 1e3 * xt, 1e3 * sg
    for m in (1, 10):
        one = out[f"shard_1proc_xt_ms_m{m}"] + out[f"shard_1proc_sub_gram_ms_m{m}"]
        busiest = max(out[f"shard_rank{r}_xt_ms_m{m}"] + out[f"shard_rank{r}_sub_gram_ms_m{m}"] for r in (0, 1))
        out[f"shard_passes_speedup_m{m}"] = one / busiest  # the filter passes' share of the 2-process target
    return out


def _concurrent_passes(rank: int, world: int, P: torch.Tensor, barrier, queue, reps: int) -> None:
    """In a child process: this rank's passes of a ``world``-process sharded P (X = P Jᵀ, m = 1 and 10, and
    P −= VᵀV with m = 10), each repetition started with the other processes (``barrier``); medians (s) to
    ``queue``."""
    from ekf_plugin.optim.kernels import select_kernel
    from ekf_plugin.optim.sharded import ShardPlan

    torch.set_num_threads(1)
    n = P.shape[0]
    plan = ShardPlan([(0, n)], rank, world, None, select_kernel("auto", torch.device("cpu"), torch.float64))
    plan._all_reduce = lambda t: None  # the passes alone
    local = plan.scatter([P], torch.float64, "cpu")
    g = torch.Generator().manual_seed(rank)
    got = {}
    for name, m in (("xt_m1", 1), ("xt_m10", 10), ("sub_gram_m10", 10)):
        J = torch.randn(m, n, generator=g, dtype=torch.float64)  # (m, n)
        V = 1e-4 * J  # (m, n), small: P stays positive
        times = []
        for _ in range(reps):
            barrier.wait()
            t = time.perf_counter()
            plan.xt_and_diag(local, J) if name.startswith("xt") else plan.sub_gram_(local, V)
            times.append(time.perf_counter() - t)
        got[name] = statistics.median(times)
    queue.put((rank, got))


def shard_concurrent_figures(quick=False, n: int = 2827) -> Dict[str, float]:
    """What two cores give the filter passes alone: the 2-process sharded passes run at the same time in two
    processes (each repetition started together; no labels, no communication) against one process doing all
    of P, float64, one thread each. Memory bandwidth is shared: X = P Jᵀ with m = 1 reads P once at ~1
    flop per 8 bytes, so it speeds up by what a second core adds to the bandwidth, not 2× (``copy_bandwidth``
    of one process against two at once is measured beside it). Figures: ``shard_concurrent_*``."""
    import multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    P = A @ A.T / n + torch.eye(n, dtype=torch.float64)  # (n, n) symmetric positive definite
    del A
    reps = 5 if quick else 25
    ctx = mp.get_context("fork")
    out = _Figures()
    for world in (1, 2):
        barrier, queue = ctx.Barrier(world), ctx.Queue()
        procs = [ctx.Process(target=_concurrent_passes, args=(r, world, P, barrier, queue, reps)) for r in range(world)]
        for p in procs:
            p.start()
        res = dict(queue.get(timeout=600) for _ in procs)
        for p in procs:
            p.join()
        for name in res[0]:
            out[f"shard_concurrent_{world}proc_{name}_ms"] = 1e3 * max(r[name] for r in res.values())  # the slower rank
    for name in ("xt_m1", "xt_m10", "sub_gram_m10"):
        out[f"shard_concurrent_speedup_{name}"] = (out[f"shard_concurrent_1proc_{name}_ms"]
                                                   / out[f"shard_concurrent_2proc_{name}_ms"])
    # the copy bandwidth of one process against two copying at once (each its own 256 MiB; medians)
    for world in (1, 2):
        barrier, queue = ctx.Barrier(world), ctx.Queue()

        def copy_at_once(barrier=barrier, queue=queue) -> None:
            torch.set_num_threads(1)
            src = torch.ones(32 * 2**20, dtype=torch.float64)  # 256 MiB
            dst = torch.empty_like(src)
            times = []
            for _ in range(7):
                barrier.wait()
                t = time.perf_counter()
                dst.copy_(src)
                times.append(time.perf_counter() - t)
            queue.put(2 * src.numel() * 8 / statistics.median(times[1:]) / 1e9)

        procs = [ctx.Process(target=copy_at_once) for _ in range(world)]
        for p in procs:
            p.start()
        out[f"shard_concurrent_copy_bandwidth_{world}proc_GBps"] = sum(queue.get(timeout=600) for _ in procs)
        for p in procs:
            p.join()
    out["shard_concurrent_copy_bandwidth_ratio"] = (out["shard_concurrent_copy_bandwidth_2proc_GBps"]
                                                    / out["shard_concurrent_copy_bandwidth_1proc_GBps"])
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


def _update_times(opt, batches, closure_for, device, k_updates: int):
    """Mean wall time (s) of energy and force updates and of their filter part; alternating kinds, 2 warm-up.
    Means, not medians: with deferred rows (``EKF(defer_rows=...)``) every few updates also applies them to
    P, and the mean carries that cost."""
    from ekf_plugin.training.schedule import ENERGY, FORCES

    t_filter = {ENERGY: [], FORCES: []}
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
            t_filter[kind].append(timed_update.dt)
    opt._update = orig_update
    mean = statistics.fmean
    return {kind: (mean(t_all[kind]), mean(t_filter[kind])) for kind in (ENERGY, FORCES)}


def bpnn_figures(device="cpu", quick=False) -> Dict[str, float]:
    """EKF updates of the study's water BPNN through ``PaperScheduleTask._errors`` (what ``spktrain
    experiment=water_bpnn_ekf`` runs per step, without Lightning's loop): closed-form rows with deferred
    P rows (default), the same with every update applied at once (``immediate_``), and autograd rows; the force
    label's dG/dr columns timed on their own; 192-atom revPBE0-D3 frames."""
    import schnetpack.properties as props
    from ekf_plugin.models import water_bpnn
    from ekf_plugin.optim import EKF
    from ekf_plugin.training import PaperScheduleTask
    from ekf_plugin.training.schedule import ENERGY, FORCES

    if not DATA.exists():
        return {"bpnn_skipped_no_data": 1.0}
    frames = _frames(8 if quick else 40)
    model = water_bpnn(stress=False).to(device)  # float32 model and data, float64 P: as spktrain
    model.train()
    cutoff = float(getattr(model, "cutoff", 6.350124))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out: Dict[str, float] = _Figures()
    out["bpnn_weights"] = float(n)
    batches = []
    for k, atoms in enumerate(frames):
        b = _batch(atoms, cutoff, device)
        b[props.idx] = torch.tensor([k], device=device)
        batches.append(b)
    task = PaperScheduleTask(model, [], seed=0)
    predictor = task.label_predictor
    t = time.perf_counter()
    predictor.prepare(batches, fit_scaling=True)
    out["features_once_s_per_frame"] = (time.perf_counter() - t) / len(batches)
    g = torch.Generator().manual_seed(1)
    picks = [torch.randperm(3 * 192, generator=g)[:10] for _ in range(10)]
    st = [predictor._structure(b, 0) for b in batches[:10]]
    rep = predictor.representation
    t_cols = [_median(lambda s=s, p=p: rep.feature_columns(s, p // 3, p % 3), 3, device) for s, p in zip(st, picks)]
    out["force_columns_ms_10_labels"] = 1e3 * statistics.median(t_cols)
    # the closed-form Jacobian rows alone (compiled on CPU), and labels with rows as the task computes them, with a
    # warm cache (the same frames in turn; inside the EKF loop below a filter step has just streamed P through it)
    params = [p for p in model.parameters() if p.requires_grad]  # the column order of an EKF over the model
    rows = predictor.closed_form(params)
    fs = [predictor._features_and_species(b, 0) for b in batches[:10]]
    tables = [rep.feature_column_table(s, p // 3, p % 3, sp) for s, p, (_, sp) in zip(st, picks, fs)]
    out["force_rows_ms_10_labels"] = 1e3 * statistics.median(
        [_median(lambda f=f, c=c: rows.forces(f[0], f[1], c), 5, device) for f, c in zip(fs, tables)])
    out["energy_row_ms"] = 1e3 * statistics.median([_median(lambda f=f: rows.energy(*f), 5, device) for f in fs])
    for kind, name in ((ENERGY, "energy"), (FORCES, "force")):
        out[f"{name}_labels_and_rows_warm_ms"] = 1e3 * statistics.median(
            [_median(lambda b=b: task._errors(b, [kind], {}, params), 5, device) for b in batches[:10]])
    k_updates = 10 if quick else 40
    # default (closed-form rows, deferred rows), every update applied at once (as before), autograd rows
    for name, closed, defer in (("", True, 32), ("immediate_", True, 0), ("autograd_rows_", False, 32)):
        opt = EKF(model.parameters(), lr=1e-3, defer_rows=defer)

        def closure_for(b, kind, opt=opt, closed=closed):
            return lambda: task._errors(b, [kind], {}, opt.params if closed else None)

        times = _update_times(opt, batches, closure_for, device, k_updates)
        (e_all, e_filt), (f_all, f_filt) = times[ENERGY], times[FORCES]
        out[f"{name}energy_update_ms"] = 1e3 * e_all
        out[f"{name}force_update_ms"] = 1e3 * f_all
        out[f"{name}energy_labels_and_rows_ms"] = 1e3 * (e_all - e_filt)
        out[f"{name}force_labels_and_rows_ms"] = 1e3 * (f_all - f_filt)
        out[f"{name}energy_filter_ms"] = 1e3 * e_filt
        out[f"{name}force_filter_ms"] = 1e3 * f_filt
        out[f"{name}updates_per_s_study_mix"] = 2 / (e_all + f_all)
        out[f"{name}labels_per_s_study_mix"] = 11 / (e_all + f_all)
    # threshold selection of the force labels (task.force_selection=threshold: 3 candidates per component), the
    # chosen columns gathered from the candidates' (default) or computed again (as before session 7)
    thr = PaperScheduleTask(model, [], seed=0, force_selection="threshold")
    thr.label_predictor = predictor  # the same feature cache
    for name, reuse in (("threshold_", True), ("threshold_recomputed_", False)):
        if not reuse:
            predictor._candidate_columns = lambda *a: None  # instance attribute: no gather
        opt = EKF(model.parameters(), lr=1e-3)

        def closure_for(b, kind, opt=opt):
            return lambda: thr._errors(b, [kind], {}, opt.params)

        times = _update_times(opt, batches, closure_for, device, k_updates)
        predictor.__dict__.pop("_candidate_columns", None)
        out[f"{name}force_update_ms"] = 1e3 * times[FORCES][0]
        out[f"{name}force_labels_and_rows_ms"] = 1e3 * (times[FORCES][0] - times[FORCES][1])
    out["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def spktrain_first_update_full(quick=False) -> Dict[str, float]:
    """Time from starting ``spktrain experiment=water_bpnn_ekf`` on all 1400 revPBE0-D3 frames (database already
    built, as on every run after the first) to the end of its first update: imports, split, the one pass
    over the 1120 training frames (scaling fit + feature cache) and one update. One thread."""
    if quick or not DATA.exists():
        return {}
    root = Path(__file__).resolve().parents[1]
    exe = Path(sys.executable).with_name("spktrain")
    with tempfile.TemporaryDirectory() as tmp:
        steps_json = Path(tmp) / "steps.json"
        args = [str(exe), "experiment=water_bpnn_ekf", f"data.source={DATA.resolve()}", f"data.datapath={tmp}/water.db",
                f"run.path={tmp}/runs", "run.id=b", "logger=csv", "+trainer.enable_progress_bar=false",
                "trainer.num_sanity_val_steps=0", "trainer.max_steps=1"]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        from ekf_plugin.data import WaterDataModule  # noqa: PLC0415

        WaterDataModule(datapath=f"{tmp}/water.db", source=str(DATA.resolve()), batch_size=1).prepare_data()  # as spktrain
        t0 = time.time()
        res = subprocess.run(args + ["+callbacks.step_timer._target_=benchmarks.step_timer.StepTimer",
                                     f"+callbacks.step_timer.path={steps_json}"],
                             cwd=tmp, env=env, capture_output=True, text=True, timeout=3600)
        # one update and no validation: spktrain's closing test finds no best checkpoint; the timing is in
        if not steps_json.exists() or json.loads(steps_json.read_text()).get("first_update_time") is None:
            raise RuntimeError(res.stderr[-3000:])
        rec = json.loads(steps_json.read_text())
    return {"spktrain_1400_first_update_s": rec["first_update_time"] - t0}


# the protocol of the README's headline run (one energy update in ten, force labels chosen by their error)
README_PROTOCOL = ("task.energy_fraction=0.1", "task.force_selection=threshold")


def spktrain_figures(quick=False, overrides=(), prefix="spktrain_", experiment="water_bpnn_ekf") -> Dict[str, float]:
    """What a user's ``spktrain experiment=water_bpnn_ekf`` does, timed by a callback inside the run
    (:mod:`benchmarks.step_timer`): time to the first update, steady-state updates/s of the whole loop
    (data loading, ``training_step``, logging, callbacks), validation time against epoch time. One thread.
    ``overrides``: further Hydra overrides (e.g. :data:`README_PROTOCOL`); the figures' names start with ``prefix``;
    ``experiment``: e.g. ``water_bpnn_adam``, the Adam baseline of the same protocol."""
    if not DATA.exists():
        return {f"{prefix}skipped_no_data": 1.0}
    frames = 60 if quick else 400
    root = Path(__file__).resolve().parents[1]
    exe = Path(sys.executable).with_name("spktrain")
    with tempfile.TemporaryDirectory() as tmp:
        steps_json = Path(tmp) / "steps.json"
        args = [str(exe), f"experiment={experiment}", f"data.source={DATA.resolve()}", f"data.max_frames={frames}",
                f"data.datapath={tmp}/water.db", "trainer.max_epochs=3", f"run.path={tmp}/runs", "run.id=b",
                "logger=csv", "trainer.num_sanity_val_steps=0",  # progress bar on, as a user's run has it
                "+callbacks.step_timer._target_=benchmarks.step_timer.StepTimer",
                f"+callbacks.step_timer.path={steps_json}", *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # the database is built once before timing (ASE db from the extxyz); this warm-up run's ending
        # (no validation within one update, so no best checkpoint) does not matter
        subprocess.run(args[:1] + [a for a in args[1:] if "step_timer" not in a] + ["trainer.max_steps=1"],
                       cwd=tmp, env=env, capture_output=True, timeout=3600)
        if not (Path(tmp) / "water.db").exists():
            raise RuntimeError("spktrain did not build the database")
        import shutil

        shutil.rmtree(Path(tmp) / "runs")
        t0 = time.time()
        res = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        rec = json.loads(steps_json.read_text())
    out = _Figures()
    steps, updates, first = _timed_updates(rec)
    out[f"{prefix}frames"] = float(frames)
    out[f"{prefix}first_update_s"] = rec["first_update_time"] - t0
    out[f"{prefix}updates_per_training_step"] = sum(updates) / len(updates)
    # the study's mix is bimodal (energy updates ~5 ms, force updates ~20 ms): the rate is 1/mean, medians per kind
    out[f"{prefix}step_ms_median"] = 1e3 * statistics.median(t / n for t, n in zip(steps, updates))  # per update
    out[f"{prefix}step_ms_mean"] = 1e3 * sum(steps) / sum(updates)  # per update
    out[f"{prefix}updates_per_s"] = sum(updates) / sum(steps)
    opt_steps = rec.get("optimizer_steps_s", [])
    if len(opt_steps) > first:  # the first step's updates are left out of steps_s too
        out[f"{prefix}optimizer_step_ms_mean"] = 1e3 * statistics.fmean(opt_steps[first:])
        out[f"{prefix}loop_ms_per_update"] = out[f"{prefix}step_ms_mean"] - out[f"{prefix}optimizer_step_ms_mean"]
        out.update(_labels_in_loop(rec, first, prefix))
    train_steps = rec.get("training_steps_s", [])
    if len(train_steps) > 1 and len(opt_steps) > first:  # the loop split: the task's own work / Lightning and data
        task_ms = 1e3 * sum(train_steps[1:]) / sum(updates) - out[f"{prefix}optimizer_step_ms_mean"]
        out[f"{prefix}task_ms_per_update"] = task_ms
        out[f"{prefix}lightning_and_data_ms_per_update"] = out[f"{prefix}loop_ms_per_update"] - task_ms
    # an epoch's time includes its validation (Lightning validates before on_train_epoch_end): split them;
    # the first validation also computes the validation frames' features (cached for the later ones)
    vals = rec["validations_s"]
    train_s = [e - v for e, v in zip(rec["epochs_s"], vals)] if len(vals) == len(rec["epochs_s"]) else rec["epochs_s"]
    out[f"{prefix}epoch_s"] = statistics.median(train_s)
    if vals:
        out[f"{prefix}first_validation_s"] = vals[0]
        out[f"{prefix}validation_s"] = statistics.median(vals[1:] or vals)
        out[f"{prefix}validation_over_epoch"] = out[f"{prefix}validation_s"] / out[f"{prefix}epoch_s"]
    return out


def _labels_in_loop(rec: Dict, first: int, prefix: str) -> Dict[str, float]:
    """An EKF's labels and Jacobian rows inside ``spktrain`` (ms): each optimizer step's time minus its filter's
    (:mod:`benchmarks.step_timer`), means over the timed updates (the first step's left out) of the energy
    updates (one label), of the force updates (more) and of all of them (the study's mix as it was drawn:
    item 1's per-update budget); {} without filter records (not an EKF)."""
    steps, filters, labels = rec.get("optimizer_steps_s", []), rec.get("filters_s", []), rec.get("filter_labels", [])
    if not filters or len(filters) != len(steps) or len(steps) <= first:
        return {}
    rest = [(s - f, m) for s, f, m in zip(steps[first:], filters[first:], labels[first:])]
    out = {f"{prefix}labels_and_rows_ms_per_update": 1e3 * statistics.fmean(r for r, _ in rest)}
    for name, pick in (("energy", lambda m: m == 1), ("force", lambda m: m > 1)):
        sel = [r for r, m in rest if pick(m)]
        if sel:
            out[f"{prefix}{name}_labels_and_rows_ms"] = 1e3 * statistics.fmean(sel)
    return out


def _timed_updates(rec: Dict) -> Tuple[List[float], List[int], int]:
    """(wall seconds of each timed training step, updates each made, updates of the untimed first step) from a
    :mod:`benchmarks.step_timer` record; one update per step in records without the counts."""
    steps = rec["steps_s"]
    return steps, rec.get("updates") or [1] * len(steps), int(rec.get("first_step_updates", 1))


def _cpu_step_timer():
    """:class:`benchmarks.step_timer.StepTimer` that also records the process CPU time of each step
    (``steps_cpu_s``; validation excluded): on a machine shared with other jobs, the work per update of each
    process, whatever CPU share it got."""
    from benchmarks.step_timer import StepTimer, timed

    class CpuStepTimer(StepTimer):
        def __init__(self, path: str) -> None:
            super().__init__(path)
            self.steps_cpu, self._cpu_last, self._cpu_val0 = [], None, None
            self.phases: Dict[str, list] = {}  # name -> wall seconds of each call
            self._in_step = False  # between on_train_batch_start and on_train_batch_end

        def on_train_start(self, trainer, pl_module) -> None:
            """Also time the EKF's phases on its instance (nothing changes for other processes): the filter
            (``_update`` or ``_update_sharded``), the force rows (``split_rows``, one call per force update) and,
            with a shared P, X = P Jᵀ with its all-reduce (``xt_and_diag``) and the all-reduce alone. Only calls
            inside a training step count: a checkpoint's assembly of the full P goes through the same all-reduce
            (tens of ms at an epoch's end), which is not an update's."""
            super().on_train_start(trainer, pl_module)

            def phase(obj, attr: str, name: str) -> None:
                if obj is not None and hasattr(obj, attr):
                    inner, record = getattr(obj, attr), self.phases.setdefault(name, [])
                    during_step = timed(inner, record)
                    setattr(obj, attr, lambda *a, **k: (during_step if self._in_step else inner)(*a, **k))

            for opt in trainer.optimizers:
                phase(opt, "_update", "filter")
                phase(opt, "_update_sharded", "filter")
                phase(opt, "split_rows", "force_rows")
                shard = getattr(opt, "shard", None)
                phase(shard, "xt_and_diag", "xt_and_diag")
                phase(shard, "_all_reduce", "all_reduce")
                comm = getattr(opt, "process_group", None)  # a SharedMemoryGroup: the waits for the other process
                phase(comm if hasattr(comm, "_wait") else None, "_wait", "shm_wait")
            # Lightning's per-step check that no process got SIGTERM (a collective under DDP)
            phase(trainer.fit_loop.epoch_loop, "_broadcast_sigterm_tensor", "sigterm_broadcast")

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            super().on_train_epoch_start(trainer, pl_module)
            self._cpu_last = time.process_time()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._in_step = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._in_step = False
            now, first = time.process_time(), self.first_update_s is None
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if not first:
                self.steps_cpu.append(now - self._cpu_last)
            self._cpu_last = now

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            super().on_validation_epoch_start(trainer, pl_module)
            self._cpu_val0 = time.process_time()

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            super().on_validation_epoch_end(trainer, pl_module)
            if self._cpu_last is not None:
                self._cpu_last += time.process_time() - self._cpu_val0

        def _dump(self) -> None:
            super()._dump()
            rec = json.loads(self.path.read_text())
            rec["steps_cpu_s"] = self.steps_cpu
            rec["phases_s"] = self.phases
            self.path.write_text(json.dumps(rec))

    return CpuStepTimer


def CpuStepTimer(path: str):  # noqa: N802 - a Hydra target that builds the callback
    return _cpu_step_timer()(path)


def spktrain_2proc_figures(quick=False, frames: Optional[int] = None, pause=None, overrides=(),
                           prefix="spktrain_2proc_", runs=("1proc", "split", "streams"),
                           run_overrides=(), repeats: Optional[int] = None) -> Dict[str, float]:
    """One process against two (Lightning DDP, gloo, one thread each) sharing one EKF, through ``spktrain
    experiment=water_bpnn_ekf`` on the revPBE0-D3 frames (80 % training frames), the study's mix,
    validation on 2 frames (not timed), updates timed by :mod:`benchmarks.step_timer` (mean step after the first, 2 epochs):

    * ``1proc``: the plain run (shuffled by the same ``SameBatchDDPStrategy`` sampler with one process, so
      it sees the frames and label draws of ``split``);
    * ``split`` (``trainer=ddp_cpu_split``): the SAME update as one process (one structure, m = 1 or 10),
      its force rows split between the two processes, P split by rows: the honest updates/s comparison;
    * ``streams`` (``trainer=ddp_cpu``): each process its own structure, one update carries both (m = 2,
      11 or 20; multistream), P split by rows: more labels per update, not more updates.

    Labels/s use the expected labels per update of the mix (5.5 per structure). ``pause``: a callable run
    as ``pause(True)`` before and ``pause(False)`` after the timed runs (e.g. to stop a background job).
    ``overrides``: further Hydra overrides for every run (e.g. :data:`README_PROTOCOL`, whose labels per update
    are 0.1·1 + 0.9·10); the figures' names start with ``prefix``; ``runs``: which of the three to time;
    ``run_overrides``: overrides of the timed (DDP) runs only, e.g. ``("task.optimizer_args.comm=torch",
    "trainer.strategy.shared_memory_check=false")`` for the exchanges through gloo as before session 25.
    ``repeats``: the runs are made this many times in turn (1proc, split, ..., 1proc, split, ...; default 3, 1
    when ``quick``): each figure is the median over the repeats and each ratio the median of the repeats' ratios
    (one run times ~2.5 s of updates; this VM's speed drifts by 10–15 % between minutes).
    """
    if not DATA.exists():
        return {f"{prefix}skipped_no_data": 1.0}
    frames = frames or (40 if quick else 300)
    root = Path(__file__).resolve().parents[1]
    exe = Path(sys.executable).with_name("spktrain")
    out = _Figures()
    with tempfile.TemporaryDirectory() as tmp:
        base = [str(exe), "experiment=water_bpnn_ekf", f"data.source={DATA.resolve()}", f"data.max_frames={frames}",
                f"data.datapath={tmp}/water.db", "trainer.max_epochs=2", f"run.path={tmp}/runs", "logger=csv",
                "+trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=2",
                "+seed=0", "+callbacks.step_timer._target_=benchmarks.bench_ekf.CpuStepTimer", *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        all_runs = {"1proc": ["trainer=ddp_cpu_split", "trainer.devices=1"], "split": ["trainer=ddp_cpu_split"],
                    "streams": ["trainer=ddp_cpu"]}
        runs = {name: all_runs[name] for name in runs}
        e_frac = next((float(o.split("=", 1)[1]) for o in overrides if o.startswith("task.energy_fraction=")), 0.5)
        labels = e_frac * 1 + (1 - e_frac) * 10  # expected labels per structure
        warm = [a for a in base if "step_timer" not in a] + ["trainer.max_steps=1", "run.id=warm"]
        subprocess.run(warm, cwd=tmp, env=env, capture_output=True, timeout=3600)  # builds the database once
        if not (Path(tmp) / "water.db").exists():
            raise RuntimeError("spktrain did not build the database")
        if pause:
            pause(True)
        repeats = repeats or (1 if quick else 3)
        per_rep: List[Dict[str, float]] = []
        try:
            for rep in range(repeats):  # the runs in turn, repeats times
                out = _Figures()
                for name, extra in runs.items():
                    path = f"{tmp}/steps_{name}_r{rep}_" + "${oc.env:LOCAL_RANK,0}.json"  # one file per process
                    res = subprocess.run(base + extra + list(run_overrides) + [f"run.id={name}_r{rep}",
                                                                               f"+callbacks.step_timer.path={path}"],
                                         cwd=tmp, env=env, capture_output=True, text=True, timeout=3600)
                    if res.returncode != 0:
                        raise RuntimeError(res.stderr[-3000:])
                    recs = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob(f"steps_{name}_r{rep}_*.json"))]
                    steps, updates, first = _timed_updates(recs[0])  # rank 0; the processes wait for each other every update
                    per_update = 2 * labels if name == "streams" else labels
                    step_s = sum(steps) / sum(updates)  # per update
                    out[f"{prefix}{name}_updates"] = float(sum(updates) + first)
                    out[f"{prefix}{name}_step_ms_mean"] = 1e3 * step_s
                    out[f"{prefix}{name}_updates_per_s"] = 1 / step_s
                    out[f"{prefix}{name}_labels_per_s"] = per_update / step_s
                    # CPU time per update of the busiest process: the step time of a machine with a free core each
                    out[f"{prefix}{name}_cpu_ms_per_update"] = 1e3 * max(sum(r["steps_cpu_s"]) / sum(_timed_updates(r)[1])
                                                                         for r in recs)
                    # where each process's update goes (wall ms per update, mean over the run): training_step, and in it
                    # the filter, the force rows, X = P Jᵀ with its all-reduce and the all-reduce alone
                    for rank, r in enumerate(recs):
                        n_up = sum(_timed_updates(r)[1]) + int(r.get("first_step_updates", 1))  # all calls' updates
                        out[f"{prefix}{name}_rank{rank}_training_step_ms"] = 1e3 * sum(r["training_steps_s"]) / n_up
                        for phase_name, calls in sorted(r.get("phases_s", {}).items()):
                            out[f"{prefix}{name}_rank{rank}_{phase_name}_ms"] = 1e3 * sum(calls) / n_up
                for name in runs:
                    if name != "1proc" and "1proc" in runs:
                        one = out[f"{prefix}1proc_updates_per_s"]
                        out[f"{prefix}{name}_over_1proc_updates_per_s"] = out[f"{prefix}{name}_updates_per_s"] / one
                        out[f"{prefix}{name}_over_1proc_labels_per_s"] = (out[f"{prefix}{name}_labels_per_s"]
                                                                         / out[f"{prefix}1proc_labels_per_s"])
                        out[f"{prefix}{name}_over_1proc_cpu_per_update"] = (out[f"{prefix}1proc_cpu_ms_per_update"]
                                                                           / out[f"{prefix}{name}_cpu_ms_per_update"])
                per_rep.append(out)
        finally:
            if pause:
                pause(False)
    out = _Figures({key: statistics.median(r[key] for r in per_rep)  # medians over the repeats
                    for key in per_rep[0] if all(key in r for r in per_rep)})
    for i, r in enumerate(per_rep):  # each repeat's ratio, as measured
        for key in r:
            if key.endswith("_over_1proc_updates_per_s"):
                out[f"{key}_repeat{i}"] = r[key]
    out[f"{prefix}repeats"] = float(repeats)
    out[f"{prefix}frames"] = float(frames)
    out[f"{prefix}load_average_1min"] = os.getloadavg()[0]
    return out


def gnn_figures(device="cpu", quick=False) -> Dict[str, float]:
    """``task=ekf`` on SchNetPack's PaiNN with 192-atom water (5 Å cosine cutoff, 20 Gaussians, float32 model):
    one reduced-row update (1 energy + 4 group rows of 6 atoms), blocked P (≤ 5120) in float32.

    ``painn_64x2_*``: n_atom_basis 64, 2 interactions (108 k weights; ``experiment=water_painn_ekf``'s
    model) and ``painn_64x3_*``: 3 interactions (157 k), through what ``task=ekf`` runs now: the forward,
    force pass and the five rows as one compiled function (:class:`~ekf_plugin.training.compiled_rows.
    CompiledReducedRows`, ``compile_rows: true``; ``*_compile_s``: its first call, which compiles), then
    ``EKF._update`` with ``kernel="native"``. ``*_eager_*``: the same update without compiling (``task.compile_rows=
    false``: :func:`~ekf_plugin.training.schedule.reduced_rows_with_jacobian`, the energy row from the force pass,
    one backward per force row), in the same run. Breakdown per update: ``forward_ms`` (eager: forward with the
    force pass and the energy row; compiled: forward and all rows), ``rows_ms`` (eager: the 4 force rows;
    compiled: 0, they are in the forward figure), medians after one warm-up update; filter (mean of 14 updates:
    P rows are deferred by 32, i.e. applied every 7 updates of 5 rows)."""
    import schnetpack as spk
    import ekf_plugin.jacobian as jac
    from ekf_plugin.optim import EKF
    from ekf_plugin.training.compiled_rows import CompiledReducedRows
    from ekf_plugin.training.schedule import reduced_rows_with_jacobian

    if not DATA.exists():
        return {"gnn_skipped_no_data": 1.0}
    frames = _frames(3)
    out = _Figures()
    med = statistics.median
    runs = [("painn_64x2", 2, True), ("painn_64x2_eager", 2, False), ("painn_64x3", 3, True)]
    if not quick:
        runs.append(("painn_64x3_eager", 3, False))
    for tag, n_int, compiled in runs:
        torch.manual_seed(0)
        rep = spk.representation.PaiNN(n_atom_basis=64, n_interactions=n_int, radial_basis=spk.nn.GaussianRBF(20, 5.0),
                                       cutoff_fn=spk.nn.CosineCutoff(5.0))
        model = spk.model.NeuralNetworkPotential(
            representation=rep, input_modules=[spk.atomistic.PairwiseDistances()],
            output_modules=[spk.atomistic.Atomwise(n_in=64, output_key="energy"), spk.atomistic.Forces()],
        ).to(device)
        model.train()
        batches = [_batch(a, 5.0, device) for a in frames]
        opt = EKF(model.parameters(), lr=1.0, fading_lambda=0.98, fading_nu=0.9987, blocks=5120, dtype=torch.float32,
                  kernel="native", defer_rows=32)
        rows = CompiledReducedRows(model, opt.params) if compiled else None
        g = torch.Generator().manual_seed(0)
        t_rows = []
        real = jac.flat_jacobian

        def timed(*a, **k):
            t = time.perf_counter()
            r = real(*a, **k)
            t_rows.append(time.perf_counter() - t)
            return r

        tf, tj, tu = [], [], []
        if not compiled:  # the eager force rows go through flat_jacobian; the compiled ones are inside the graph
            jac.flat_jacobian = timed
        try:
            for i in range(3 if quick else 15):  # 14 timed: P rows deferred by 32 are applied every 7 updates
                b = batches[i % len(batches)]
                t_rows.clear()
                t0 = time.perf_counter()
                if compiled:
                    res = rows(b, g, n_force_groups=4, force_group_size=6)
                    if res is None:
                        raise RuntimeError(f"the compiled rows did not run: {rows.reason}")
                    xi, J, _ = res  # (5,), (5, n)
                else:
                    xi, J, _ = reduced_rows_with_jacobian(model, lambda: model(dict(b)), b, g, opt.params,
                                                          n_force_groups=4, force_group_size=6)  # (5,), (5, n)
                _sync(device)
                t2 = time.perf_counter()
                opt._update(xi.detach().to(opt.dtype), J.to(opt.dtype))
                _sync(device)
                t3 = time.perf_counter()
                if i:
                    tf.append(t2 - t0 - sum(t_rows)), tj.append(sum(t_rows)), tu.append(t3 - t2)
                elif compiled:
                    out[f"{tag}_compile_s"] = t2 - t0
        finally:
            jac.flat_jacobian = real
        out[f"{tag}_weights"] = float(sum(p.numel() for p in model.parameters()))
        out[f"{tag}_P_blocks"] = float(len(opt.blocks))
        out[f"{tag}_P_GiB_f32"] = opt.memory_bytes / 2**30
        out[f"{tag}_forward_ms"] = 1e3 * med(tf)  # eager: forward with its force pass and the energy row; compiled: all
        out[f"{tag}_rows_ms"] = 1e3 * med(tj)  # eager: the 4 force rows; compiled: 0 (inside the forward figure)
        out[f"{tag}_filter_ms"] = 1e3 * statistics.fmean(tu)  # mean: carries the deferred rows' passes over P
        out[f"{tag}_updates_per_s"] = 1 / (med(tf) + med(tj) + statistics.fmean(tu))
        del model, opt, batches, rows
        gc.collect()
    out["gnn_load_average_1min"] = os.getloadavg()[0]
    return out


def run(quick: bool = False, device: Optional[str] = None) -> dict:
    device = device or "cpu"
    torch.set_num_threads(1)
    out = _Figures(filter_figures(device, quick))
    out.update(bpnn_figures(device, quick))
    if (device or "cpu") == "cpu":
        out.update(shard_piece_figures(quick))
        out.update(shard_concurrent_figures(quick))
        out.update(spktrain_figures(quick))
        out.update(spktrain_figures(quick, README_PROTOCOL, "spktrain_readme_protocol_"))
        out.update(spktrain_figures(quick, README_PROTOCOL, "spktrain_adam_readme_protocol_", "water_bpnn_adam"))
        out.update(spktrain_first_update_full(quick))
        out.update(spktrain_2proc_figures(quick))
        out.update(spktrain_2proc_figures(quick, overrides=README_PROTOCOL, prefix="spktrain_2proc_readme_protocol_",
                                          runs=("1proc", "split")))
    out.update(gnn_figures(device, quick))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    global VERBOSE
    VERBOSE = True
    run(args.quick, args.device)


if __name__ == "__main__":
    main()
