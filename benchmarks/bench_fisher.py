"""Cost of the Fisher spectrum (time and peak memory) as a function of labels N and weights n.

    python -m benchmarks.bench_fisher [--quick] [--device cpu] [--threads 2]

Cases, each in a fresh subprocess so that peak RSS (``ru_maxrss``) belongs to that case alone:

* ``bpnn``: the study's BPNN (2827 weights, ``ekf_plugin.models.water_bpnn``) on the built-in flexible
  water boxes (8 H2O, 24 atoms, Å/eV), N = 100, 300, 1000 labels (half energy, half force components);
* ``bpnn192``: the same network on 64-molecule boxes (192 atoms, the study's system size), N = 100 and
  1000 on a GPU, 40 on a CPU;
* ``bpnn_revpbe0``: the same network on the study's revPBE0-D3 frames (64 H2O, 192 atoms), few labels,
  if ``../shared/data`` is present;
* ``schnet``: SchNet potentials of growing width on EMT copper, N = 200, to show the cost in n;
* ``eigen``: the linear algebra alone (random float64 rows), JJᵀ vs JᵀJ.

Figures: seconds per case, seconds per label, peak RSS increase (MiB) during the computation, and the
float64 buffer size. The machine is shared: timings are noisy (repeat for decisions).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EKF_PLUGIN_SHARED_DATA", REPO.parent / "shared" / "data"))
REVPBE0 = SHARED / "revpbe0-d3-cheng2019" / "dataset_1400_au.extxyz"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _measure(model, structs, labels, device) -> dict:
    from ekf_plugin.fisher import fisher_spectrum

    import torch

    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    before = _rss_mib()
    t0 = time.perf_counter()
    spec = fisher_spectrum(model, structs, labels, device=device)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n, N = spec.n_weights, len(labels)
    buf = (min(N, n) * n if spec.method == "JJt" else 2 * n * n) * 8 / 2**20
    return {"n_weights": n, "n_labels": N, "method": spec.method, "seconds": round(seconds, 3),
            "s_per_label": round(seconds / N, 4), "peak_rss_increase_mib": round(_rss_mib() - before, 1),
            "peak_rss_mib": round(_rss_mib(), 1), "buffer_mib": round(buf, 1),
            "log10_median": round(spec.summary()["log10_median"], 3),
            **({"peak_gpu_increase_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)} if cuda else {})}


def case_bpnn(n_labels: int, device: str, revpbe0: bool = False, n_side: int = 2) -> dict:
    import torch

    from ekf_plugin.fisher import frames_to_structures, sample_labels
    from ekf_plugin.models import model_cutoff, water_bpnn

    model = water_bpnn(seed=0, stress=False).to(device).eval()
    n_struct = max(n_labels // 2 + 1, 4)
    if revpbe0:
        from ekf_plugin.data import read_frames

        frames = read_frames(REVPBE0, max_frames=n_struct)  # Bohr/Hartree → Å/eV
    else:
        from ekf_plugin.demo import make_frames

        frames = make_frames(n_frames=n_struct, n_side=n_side)
    structs = frames_to_structures(frames, model_cutoff(model), dtype=torch.float32)
    labels = sample_labels(len(frames), lambda s: len(frames[s]), n_labels, "both", seed=0)
    warm = sample_labels(len(frames), lambda s: len(frames[s]), 2, "both", seed=1)
    _measure(model, structs, warm, device)  # first-call overheads out of the figures
    out = _measure(model, structs, labels, device)
    out["atoms_per_structure"] = len(frames[0])
    return out


def case_schnet(width: int, n_labels: int, device: str) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from ekf_plugin.fisher import sample_labels
    from tests.fisher._tiny import cu_frames, structures, tiny_model

    frames = cu_frames(n_labels // 2 + 1)
    model = tiny_model(n_atom_basis=width, n_hidden=width, dtype=torch.float32, n_rbf=20).to(device)
    structs = structures(frames, dtype=torch.float32)
    labels = sample_labels(len(frames), lambda s: len(frames[s]), n_labels, "both", seed=0)
    _measure(model, structs, sample_labels(len(frames), lambda s: len(frames[s]), 2, "both", seed=1), device)
    return _measure(model, structs, labels, device)


def case_eigen(n_labels: int, n_weights: int, method: str, device: str) -> dict:
    import torch

    from ekf_plugin.fisher import GramAccumulator

    rows = torch.randn(n_labels, n_weights, dtype=torch.float64, device=device)  # (N, n)
    before = _rss_mib()
    t0 = time.perf_counter()
    acc = GramAccumulator(n_weights, n_labels // 2, n_labels - n_labels // 2, method=method, device=device)
    acc.add(rows[: n_labels // 2], "energy")
    acc.add(rows[n_labels // 2 :], "forces")
    acc.eigenvalues()
    return {"n_labels": n_labels, "n_weights": n_weights, "method": acc.method,
            "seconds": round(time.perf_counter() - t0, 3), "buffer_mib": round(acc.nbytes / 2**20, 1),
            "peak_rss_increase_mib": round(_rss_mib() - before, 1)}


def _one(spec: list, device: str, threads: int) -> dict:
    """Run one case in a fresh interpreter; returns its JSON figures."""
    cmd = [sys.executable, "-m", "benchmarks.bench_fisher", "--case", json.dumps(spec), "--device", device,
           "--threads", str(threads)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def cases(quick: bool, device: str = "cpu") -> list:
    bpnn = [100] if quick else [100, 300, 1000]
    out = [["bpnn", n] for n in bpnn]
    gpu = str(device).startswith("cuda")
    out += [["bpnn192", n] for n in ([20] if quick else [100, 1000] if gpu else [40])]
    if REVPBE0.exists():
        out.append(["bpnn_revpbe0", 10 if quick else 40])
    out += [["schnet", w, 200] for w in ((8, 32) if quick else (8, 32, 96))]
    out += [["eigen", 1000, 2827, "JJt"], ["eigen", 1000, 2827, "JtJ"], ["eigen", 5000, 2827, "auto"]]
    return out


def run(quick: bool = False, device: str | None = None, threads: int = 2) -> dict:
    """Headline figures (name → number) plus the full table under 'cases'."""
    device = device or "cpu"
    table = []
    for spec in cases(quick, device):
        fig = _one(spec, device, threads)
        table.append({"case": spec, **fig})
        print(json.dumps(table[-1]), flush=True)
    figures = {}
    for row in table:
        if row["case"][0] == "bpnn" and "seconds" in row:
            n = row["case"][1]
            figures[f"bpnn_2827w_{n}_labels_s"] = row["seconds"]
            figures[f"bpnn_2827w_{n}_labels_peak_rss_increase_MiB"] = row["peak_rss_increase_mib"]
        if row["case"][0] == "bpnn192" and "seconds" in row:
            figures[f"bpnn_2827w_192atoms_{row['case'][1]}_labels_s"] = row["seconds"]
        if row["case"][0] == "bpnn_revpbe0" and "seconds" in row:
            figures["bpnn_revpbe0_192_atoms_s_per_label"] = row["s_per_label"]
    figures["cases"] = table
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the dev machine has 2 cores)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.case:
        spec = json.loads(args.case)
        fn = {"bpnn": lambda n: case_bpnn(n, args.device), "bpnn192": lambda n: case_bpnn(n, args.device, n_side=4),
              "bpnn_revpbe0": lambda n: case_bpnn(n, args.device, True),
              "schnet": lambda w, n: case_schnet(w, n, args.device),
              "eigen": lambda N, n, m: case_eigen(N, n, m, args.device)}[spec[0]]
        print(json.dumps(fn(*spec[1:])))
        return 0
    figures = run(args.quick, args.device, args.threads)
    print(json.dumps({k: v for k, v in figures.items() if k != "cases"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
