"""i-PI MD speed for the 192-atom water box (64 H2O, NPT, 0.5 fs): steps/s with our socket client
(``ekf-plugin ipi``), with ``<ffdirect>`` (same PES class in-process, no socket) and with i-PI's own
python driver (``i-pi-py_driver -m custom -P ekf_plugin/md/pes.py``); socket overhead per step;
torch threads 1 vs 2 for the client.

Per-step cost = Δ(wall time of the whole i-PI run) / Δ(steps) between a short and a long run, so
start-up (imports, model loading, i-PI set-up) cancels; best of two repeats. Models: none (zero
forces: i-PI's ffdirect dummy, our client loop, i-PI's py_driver dummy — the pure protocol
overhead), a small SchNet (light; run NVT so that its weak forces do not let the box expand) and the trained n2p2 RPBE-D3 water BPNN from ../shared/data
(real cost), if present. The machine is shared (2 cores, other jobs running): expect ±30 % noise.
For the n2p2 potential also the client's own cycle time per force call (after the first, which
compiles the BPNN step's kernels) against the time the same calls spent in the model (the client
logs both): the socket + i-PI share; the in-process median model step is printed beside it.

    python benchmarks/bench_ipi.py [--quick]
    python benchmarks/bench_ipi.py --round-trip 400     # only the n2p2 client round trip
    python benchmarks/bench_ipi.py --round-trip 300 --threading-ab 4   # i-PI threading on/off, alternating
    python benchmarks/bench_ipi.py --pimd-batch 40      # 8 beads: one call per batch vs one per bead

``--pimd-batch STEPS`` isolates the batched evaluation in-process (no i-PI): 8 beads of the 192-atom box
(each atom's beads spread by 0.1 Å, moving at 320 K thermal speeds, 0.25 fs steps) through
``AtomicUnitsModel.compute_batch`` (one ``evaluate_batch`` call per step) and through one call per bead
(each bead its own slot and Verlet list, as before), alternating step by step; CPU ms per bead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
N2P2 = DATA / "n2p2-h2o-potentials" / "H2O_RPBE-D3"
FRAMES = DATA / "revpbe0-d3-cheng2019" / "dataset_1400_au.extxyz"
BIN = Path(sys.executable).parent


def light_model_file(path: Path) -> Path:
    """A small SchNet (16 features, 2 interactions, 4 Å) with tiny output weights, saved with torch.save."""
    import schnetpack as spk
    import torch

    from ekf_plugin.compat import ContiguousForces

    torch.manual_seed(0)
    rep = spk.representation.SchNet(n_atom_basis=16, n_interactions=2, radial_basis=spk.nn.GaussianRBF(16, 4.0),
                                    cutoff_fn=spk.nn.CosineCutoff(4.0))
    out = spk.atomistic.Atomwise(n_in=16, output_key="energy")
    with torch.no_grad():
        out.outnet[-1].weight.mul_(1e-3)
    model = spk.model.NeuralNetworkPotential(
        representation=rep, input_modules=[spk.atomistic.Strain(), spk.atomistic.PairwiseDistances()],
        output_modules=[out, ContiguousForces(calc_stress=True)])
    torch.save(model.double().eval(), path)
    return path


def start_structure(path: Path):
    """192-atom water: revPBE0-D3 frame 0 if the shared data is there, else the demo water box."""
    from ase import units

    from ekf_plugin.md.runner import write_ipi_xyz

    if FRAMES.exists():
        from ase.io import read

        atoms = read(FRAMES, index=0)
        pos, cell, source = atoms.positions * units.Bohr, atoms.cell.array * units.Bohr, "revPBE0-D3 frame 0"
    else:
        from ekf_plugin.demo import water_box

        atoms = water_box(4, density=1.0)
        pos, cell, source = atoms.positions, atoms.cell.array, "demo water box"
    pos = write_ipi_xyz(path, atoms.get_chemical_symbols(), pos, cell)
    return atoms.numbers, pos, cell, source


def null_client(name: str) -> int:
    """Our client loop with a zero-cost model (zero energy, forces, virial): protocol overhead only."""
    from ekf_plugin.md.ipi_client import Address, IPIClient

    def zero(cell_h, pos):
        return 0.0, np.zeros_like(pos), np.zeros((3, 3)), ""

    return IPIClient(zero, Address(unix=name)).run()


def run_ipi(workdir: Path, route: str, model: Optional[Path], steps: int, threads: int, npt: bool = True) -> float:
    """Wall time (s) of one i-PI run of ``steps`` NPT steps via ``route``: ``ffdirect``, ``client``,
    ``py_driver`` with ``model``; ``ffdirect_null``, ``client_null``, ``py_driver_null`` with zero forces."""
    import ekf_plugin.md.pes as pes_module
    from ekf_plugin.md.runner import FORCEFIELD_DIRECT, FORCEFIELD_SOCKET, IPIServer, npt_xml

    name = f"ekfb_{uuid.uuid4().hex[:10]}"
    if route == "ffdirect_null":
        ff = "  <ffdirect name='nnp'> <pes>dummy</pes> </ffdirect>"
    elif route == "ffdirect":
        ff = FORCEFIELD_DIRECT.format(pes_path=pes_module.__file__, template="init.xyz", model=model,
                                      extra=f", threads: {threads}")
    else:
        ff = FORCEFIELD_SOCKET.format(address=name, timeout=0)
    xml = npt_xml("init.xyz", ff, steps=steps, temperature=320.0, stride=1000, barostat=npt)
    t0 = time.perf_counter()
    socket_path = None if route.startswith("ffdirect") else "/tmp/ipi_" + name
    server = IPIServer(workdir, xml, socket_path=socket_path).start()
    try:
        if route == "client_null":
            cmd = [sys.executable, __file__, "--null-client", name]
        elif route == "py_driver_null":
            cmd = [str(BIN / "i-pi-py_driver"), "-u", "-a", name, "-m", "dummy"]
        elif route == "client":
            cmd = [str(BIN / "ekf-plugin"), "ipi", "--model", str(model), "--template", "init.xyz", "--unix", name,
                   "--threads", str(threads)]
        elif route == "py_driver":
            cmd = [str(BIN / "i-pi-py_driver"), "-u", "-a", name, "-m", "custom", "-P", pes_module.__file__,
                   "-o", f"template=init.xyz,model={model},threads={threads}"]
        else:
            cmd = None
        if cmd:
            proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"{route} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        if server.wait(1800) != 0:
            raise RuntimeError(f"i-PI failed:\n{server.log.read_text()[-2000:]}")
    finally:
        server.stop()
    return time.perf_counter() - t0


def per_step(workdir: Path, route: str, model: Optional[Path], short: int, long: int, threads: int = 1,
             repeats: int = 2, npt: bool = True) -> float:
    """Seconds per MD step from runs of two lengths (best of ``repeats``: the machine is shared)."""
    best = float("inf")
    for _ in range(repeats):
        t_short = run_ipi(workdir, route, model, short, threads, npt)
        t_long = run_ipi(workdir, route, model, long, threads, npt)
        best = min(best, max(t_long - t_short, 1e-9) / (long - short))
    return best


def direct_cost(model_path: Path, numbers, positions, cell, repeats: int) -> Dict[str, float]:
    """In-process model call and neighbor-list times (ms), 1 torch thread."""
    import torch

    from ekf_plugin.evaluation import ModelEvaluator, neighbor_pairs

    torch.set_num_threads(1)
    ev = ModelEvaluator(str(model_path))
    ev(numbers, positions, cell)
    t = time.perf_counter()
    for _ in range(repeats):
        ev(numbers, positions, cell)
    call = (time.perf_counter() - t) / repeats
    t = time.perf_counter()
    for _ in range(repeats):
        neighbor_pairs(positions, cell, np.ones(3, bool), ev.cutoff, ev.neighbor_list)
    nl = (time.perf_counter() - t) / repeats
    return {"model_call_ms": call * 1e3, "neighbor_list_ms": nl * 1e3}


def client_round_trip(work: Path, model: Path, steps: int, numbers, positions, cell,
                      dtype: str = "float64", threading: bool = False) -> Dict[str, float]:
    """One NPT run of ``steps`` steps through ``ekf-plugin ipi``: the client's own cycle time per force
    call after the first (model step + socket + i-PI's work until the next request), and the model
    step of a ModelEvaluator in this process on the same structure, moved as in MD (median)."""
    import re

    import torch

    from ekf_plugin.evaluation import ModelEvaluator
    from ekf_plugin.md.runner import FORCEFIELD_SOCKET, IPIServer, npt_xml

    name = f"ekfb_{uuid.uuid4().hex[:10]}"
    xml = npt_xml("init.xyz", FORCEFIELD_SOCKET.format(address=name, timeout=0), steps=steps, temperature=320.0,
                  stride=1000, barostat=True, threading=threading)
    server = IPIServer(work, xml, socket_path="/tmp/ipi_" + name).start()
    try:
        cmd = [str(BIN / "ekf-plugin"), "ipi", "--model", str(model), "--template", "init.xyz", "--unix", name,
               "--threads", "1", "--dtype", dtype]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"client failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        server.wait(600)
    finally:
        server.stop()
    log = proc.stderr + proc.stdout
    m = re.search(r"([0-9.]+) ms per call", log)
    mm = re.search(r"model ([0-9.]+) ms per call, socket and i-PI (-?[0-9.]+) ms", log)
    if not (m and mm):
        raise RuntimeError(f"no rate in the client log:\n{proc.stderr[-1000:]}")
    cycle, in_model = float(m.group(1)), float(mm.group(1))
    turn = re.search(r"i-PI's turn ([0-9.]+) ms \(forces to its STATUS ([0-9.]+) ms, then to the next positions "
                     r"([0-9.]+) ms\)", log)
    torch.set_num_threads(1)
    ev = ModelEvaluator(str(model), dtype=getattr(torch, dtype), threads=1)
    rng = np.random.default_rng(0)
    r, h = np.array(positions, float), np.array(cell, float)
    ev(numbers, r, h)
    times = []
    for _ in range(min(steps, 60)):
        r = r + rng.normal(0.0, 0.01, r.shape)
        t = time.perf_counter()
        ev(numbers, r, h)
        times.append(time.perf_counter() - t)
    step = 1e3 * float(np.median(times))
    # the overhead is measured on the same calls: the client's cycle (mean over the run, neighbour-list
    # rebuilds included) against the time those calls spent in the model; the in-process median step
    # (no rebuilds: random 0.01 Å moves from one frame) is reported beside it for reference only
    return {f"n2p2_{dtype}_client_cycle_ms": cycle, f"n2p2_{dtype}_client_model_ms": in_model,
            f"n2p2_{dtype}_model_step_median_ms": step,
            f"n2p2_{dtype}_socket_and_ipi_fraction": (cycle - in_model) / in_model,
            **({f"n2p2_{dtype}_ipi_turn_ms": float(turn.group(1)),
                f"n2p2_{dtype}_ipi_turn_to_status_ms": float(turn.group(2)),
                f"n2p2_{dtype}_ipi_turn_status_to_positions_ms": float(turn.group(3))} if turn else {})}


def run(quick: bool = False, device: Optional[str] = None) -> dict:
    """Headline figures (see module docstring). ``device`` is accepted for the common runner; MD runs on CPU."""
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_ipi_") as tmp:
        work = Path(tmp)
        numbers, positions, cell, source = start_structure(work / "init.xyz")
        results["structure"] = f"{len(numbers)} atoms, {source}"
        light = light_model_file(work / "light.pt")
        reps = 1 if quick else 2
        n_short, n_long = (50, 550) if quick else (100, 2100)
        for route in ("ffdirect_null", "client_null", "py_driver_null"):
            results[f"{route}_ms_per_step"] = per_step(work, route, None, n_short, n_long, repeats=reps) * 1e3
        results["socket_overhead_ms_per_step"] = results["client_null_ms_per_step"] - results["ffdirect_null_ms_per_step"]
        short, long = (10, 210) if quick else (20, 1020)
        for k, v in direct_cost(light, numbers, positions, cell, 20).items():
            results[f"light_{k}"] = v
        for route in ("ffdirect", "client", "py_driver"):
            # NVT: the weak light model would let an NPT box expand and get cheaper as it goes
            results[f"light_{route}_ms_per_step"] = per_step(work, route, light, short, long, repeats=reps,
                                                             npt=False) * 1e3
        results["light_client_2threads_ms_per_step"] = per_step(work, "client", light, short, (long + short) // 2,
                                                                threads=2, repeats=reps, npt=False) * 1e3
        if N2P2.exists():
            try:
                for k, v in direct_cost(N2P2, numbers, positions, cell, 2 if quick else 5).items():
                    results[f"n2p2_{k}"] = v
                s2, l2 = (2, 6) if quick else (3, 23)
                for route in ("ffdirect", "client", "py_driver"):
                    results[f"n2p2_{route}_ms_per_step"] = per_step(work, route, N2P2, s2, l2, repeats=reps) * 1e3
                results.update(client_round_trip(work, N2P2, 60 if quick else 400, numbers, positions, cell))
            except Exception as exc:  # the n2p2 loader belongs to another module; report, do not die
                results["n2p2_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for key in list(results):
        if key.endswith("_ms_per_step") and not key.startswith("socket"):
            results[key.replace("_ms_per_step", "_steps_per_s")] = 1e3 / results[key]
    return results


def pimd_batch(steps: int, model: Optional[Path] = None, dtype: str = "float64", beads: int = 8) -> Dict[str, float]:
    """CPU ms per bead: ``compute_batch`` (one call) against one call per bead (see the module docstring)."""
    import torch
    from ase import units

    from ekf_plugin.md.pes import AtomicUnitsModel

    model = model or REPO / "examples" / "water_revpbe0" / "models" / "ekf_lr1e-3_s0.pt"
    with tempfile.TemporaryDirectory(prefix="bench_pimd_") as tmp:
        numbers, positions, cell, _ = start_structure(Path(tmp) / "init.xyz")
        one = AtomicUnitsModel(str(Path(tmp) / "init.xyz"), str(model), threads=1, dtype=dtype)
        per = AtomicUnitsModel(str(Path(tmp) / "init.xyz"), str(model), threads=1, dtype=dtype)
    rng = np.random.default_rng(0)
    masses = np.where(np.asarray(numbers) == 1, 1.008, 15.999)[:, None]  # (N, 1) amu
    v = rng.normal(size=(beads, *positions.shape)) * np.sqrt(units.kB * 320.0 / masses)  # ASE velocity units
    pos = positions[None] + rng.normal(0, 0.1, (beads, *positions.shape))  # (B, N, 3) Å
    cells = np.repeat((np.asarray(cell).T / units.Bohr)[None], beads, 0)  # (B, 3, 3) Bohr, columns
    t_one, t_per = [], []
    for it in range(steps + 1):
        pos = pos + v * (0.25 * units.fs)
        x = pos / units.Bohr
        c = time.process_time()
        a = one.compute_batch(cells, x)
        t1 = time.process_time() - c
        c = time.process_time()
        b = [per(cells[k], x[k], slot=k) for k in range(beads)]
        t2 = time.process_time() - c
        if it:  # the first call builds the lists
            t_one.append(t1)
            t_per.append(t2)
        assert max(abs(p[0] - q[0]) for p, q in zip(a, b)) < 1e-8
    builds = sum(ev.fast.verlet.builds for ev in one.slot_evaluators) if one.evaluator.fast else 0
    return {f"pimd{beads}_{dtype}_one_call_ms_per_bead": 1e3 * float(np.median(t_one)) / beads,
            f"pimd{beads}_{dtype}_per_bead_calls_ms_per_bead": 1e3 * float(np.median(t_per)) / beads,
            f"pimd{beads}_{dtype}_one_call_mean_ms_per_bead": 1e3 * float(np.mean(t_one)) / beads,
            f"pimd{beads}_{dtype}_per_bead_calls_mean_ms_per_bead": 1e3 * float(np.mean(t_per)) / beads,
            f"pimd{beads}_{dtype}_list_builds": float(builds), "steps": float(steps)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--null-client", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--round-trip", type=int, metavar="STEPS", default=0,
                        help="only the n2p2 client round trip over STEPS NPT steps (float64 and float32)")
    parser.add_argument("--threading-ab", type=int, metavar="REPS", default=0,
                        help="with --round-trip: float64 only, i-PI's <simulation threading> True and False "
                             "alternating, REPS runs each (the socket + i-PI share of each run)")
    parser.add_argument("--model", type=lambda p: Path(p).resolve(), default=N2P2,
                        help="with --round-trip: the model the client serves (default: the n2p2 RPBE-D3 potential)")
    parser.add_argument("--pimd-batch", type=int, metavar="STEPS", default=0,
                        help="only the in-process 8-bead comparison: one call per batch vs one per bead")
    args = parser.parse_args()
    if args.pimd_batch:
        import torch

        torch.set_num_threads(1)
        out = {"load_average_start": os.getloadavg()[0]}
        for dt in ("float64", "float32"):
            out.update(pimd_batch(args.pimd_batch, dtype=dt))
        out["load_average_end"] = os.getloadavg()[0]
        print(json.dumps(out, indent=1))
        sys.exit(0)
    if args.null_client:
        sys.exit(null_client(args.null_client))
    if args.round_trip:
        with tempfile.TemporaryDirectory(prefix="bench_ipi_") as tmp:
            numbers, positions, cell, _ = start_structure(Path(tmp) / "init.xyz")
            out = {"load_average_start": os.getloadavg()[0]}
            if args.threading_ab:
                for rep in range(args.threading_ab):
                    for threading in (True, False):
                        fig = client_round_trip(Path(tmp), args.model, args.round_trip, numbers, positions, cell,
                                                "float64", threading=threading)
                        for k, v in fig.items():  # keys name the model only when it is the n2p2 potential
                            k = k if args.model == N2P2 else k.replace("n2p2_", "model_", 1)
                            out.setdefault(f"threading_{threading}_{k}", []).append(v)
            else:
                for dt in ("float64", "float32"):
                    out.update(client_round_trip(Path(tmp), args.model, args.round_trip, numbers, positions, cell, dt))
            out["load_average_end"] = os.getloadavg()[0]
        print(json.dumps(out, indent=1))
        sys.exit(0)
    out = run(quick=args.quick)
    width = max(map(len, out))
    for k, v in out.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps(out))
