"""Analysis helpers for the revPBE0-D3 reproduction: learning curves, i-PI density traces, block averages.

    python analyze.py curves RUN_DIR... --out learning_curves.png
    python analyze.py density IPI_OUT... --labels ekf adam --skip-ps 0.5 --out density.png
    python analyze.py table RUN_DIR... --errors errors.json --fisher fisher/fisher_table.csv --density density.json

Units: energies per atom in meV/atom, forces in meV/Å, density in g/cm³ (= g/mL), time in ps.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

REFERENCE_DENSITY = 0.92  # g/mL, revPBE0-D3 at 320 K, 1 bar (the study)


def read_ipi_properties(path: Path) -> Dict[str, np.ndarray]:
    """Columns of an i-PI ``*.out`` properties file, keyed by name without the unit (``density``)."""
    names: List[str] = []
    rows = []
    for line in Path(path).read_text().splitlines():
        m = re.match(r"#\s*column\s+(\d+)(?:-\d+)?\s+-->\s+([A-Za-z_]+)", line)
        if m:
            names.append(m.group(2))
        elif line.strip() and not line.startswith("#"):
            rows.append([float(x) for x in line.split()])
    data = np.array(rows)
    return {name: data[:, i] for i, name in enumerate(names)} if len(rows) else {n: np.array([]) for n in names}


def block_average(x: np.ndarray, n_blocks: int = 5) -> Tuple[float, float]:
    """Mean and standard error from ``n_blocks`` contiguous blocks (correlated MD samples)."""
    if len(x) < n_blocks:
        raise ValueError(f"need at least {n_blocks} samples for {n_blocks} blocks, got {len(x)}")
    blocks = np.array_split(np.asarray(x, dtype=float), n_blocks)
    means = np.array([b.mean() for b in blocks])
    return float(means.mean()), float(means.std(ddof=1) / np.sqrt(n_blocks))


def read_metrics(run_dir: Path) -> Dict[str, np.ndarray]:
    """Validation curves from a Lightning CSV log under ``run_dir`` (step -> metric)."""
    files = sorted(Path(run_dir).rglob("metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}")
    with open(files[-1]) as fh:
        rows = list(csv.DictReader(fh))
    out: Dict[str, List[Tuple[float, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "epoch") and value not in ("", None):
                out.setdefault(key, []).append((float(row["step"]), float(value)))
    return {k: np.array(v) for k, v in out.items()}


def plot_curves(run_dirs: List[Path], out: Path, energy_key: str, force_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    setups = list(dict.fromkeys(re.sub(r"_s\d+$", "", Path(run).name) for run in run_dirs))  # one colour per setup
    for run in run_dirs:
        m = read_metrics(run)
        name = Path(run).name
        setup = re.sub(r"_s\d+$", "", name)
        seed = re.search(r"_s(\d+)$", name)
        style = dict(color=f"C{setups.index(setup)}", ls=["-", "--", ":", "-."][int(seed.group(1)) % 4 if seed else 0])
        for ax, key in zip(axes, (energy_key, force_key)):
            if key in m:
                ax.loglog(m[key][:, 0] + 1, m[key][:, 1] * 1000, marker=".", label=name, **style)
    axes[0].set(xlabel="updates", ylabel="validation energy RMSE / meV/atom")
    axes[1].set(xlabel="updates", ylabel="validation force RMSE / meV/Å")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"written: {out}")


def plot_density(files: List[Path], labels: List[str], out: Path, skip_ps: float) -> Dict[str, dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    summary = {}
    for f, label in zip(files, labels):
        p = read_ipi_properties(f)
        t, rho = p["time"], p["density"]
        ax.plot(t, rho, label=label)
        keep = t >= skip_ps
        mean, err = block_average(rho[keep]) if keep.sum() >= 5 else (float("nan"), float("nan"))
        temp = float(p["temperature"][keep].mean()) if keep.any() else float("nan")
        summary[label] = {"density_mean": mean, "density_err": err, "temperature_mean_K": temp,
                          "time_ps": float(t[-1]) if len(t) else 0.0, "averaged_from_ps": skip_ps}
    ax.axhline(REFERENCE_DENSITY, color="k", ls="--", label="revPBE0-D3 reference 0.92")
    ax.set(xlabel="time / ps", ylabel="density / g mL⁻¹", title="NPT, 320 K, 1 bar, 64 H₂O")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"written: {out}")
    return summary


def results_table(runs: List[Path], errors: Path, fisher: Path, density: Path) -> str:
    """Markdown table: model, optimizer, η, updates, RMSEs, Fisher median, density (all inputs the workflow writes)."""
    err = json.loads(Path(errors).read_text()) if Path(errors).exists() else {}
    fis = {r["model"]: r for r in csv.DictReader(open(fisher))} if Path(fisher).exists() else {}
    den = json.loads(Path(density).read_text()) if Path(density).exists() else {}
    lines = ["| model | optimizer | η | updates | E RMSE (meV/atom) | F RMSE (meV/Å) | Fisher median (log10) "
             "| density (g/mL) | T (K) | MD (ps) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        name = Path(run).name
        m = re.match(r"(ekf|adam)_lr([0-9.e-]+)_s(\d+)$", name)
        opt, lr = (m.group(1).upper() if m.group(1) == "ekf" else "Adam", m.group(2)) if m else ("?", "?")
        steps = max((int(v[-1, 0]) + 1 for v in read_metrics(run).values() if len(v)), default=0)
        e, f, d = err.get(name, {}), fis.get(name, {}), den.get(name, {})
        fmt = lambda x, spec: format(float(x), spec) if x not in (None, "") else "—"  # noqa: E731
        rho = f"{d['density_mean']:.3f} ± {d['density_err']:.3f}" if d else "—"
        if d and not np.isfinite(d["density_mean"]):
            rho, d = f"no average (run ended at {d['time_ps']:.2f} ps)", {**d, "temperature_mean_K": None}
        lines.append(f"| `{name}` | {opt} | {lr} | {steps:,} | {fmt(e.get('energy_rmse_meV_per_atom'), '.2f')} | "
                     f"{fmt(e.get('forces_rmse_meV_per_A'), '.0f')} | {fmt(f.get('log10_median'), '.2f')} | {rho} | "
                     f"{fmt(d.get('temperature_mean_K'), '.0f')} | {fmt(d.get('time_ps'), '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curves", help="learning curves of several spktrain runs, one figure")
    c.add_argument("runs", nargs="+", type=Path)
    c.add_argument("--out", type=Path, default=Path("learning_curves.png"))
    c.add_argument("--energy-key", default="val_energy_per_atom_rmse")
    c.add_argument("--force-key", default="val_forces_rmse")
    d = sub.add_parser("density", help="density traces of i-PI runs with block averages")
    d.add_argument("files", nargs="+", type=Path)
    d.add_argument("--labels", nargs="+")
    d.add_argument("--skip-ps", type=float, default=0.0, help="equilibration time left out of the average (ps)")
    d.add_argument("--out", type=Path, default=Path("density.png"))
    d.add_argument("--json", type=Path, default=None)
    tb = sub.add_parser("table", help="markdown results table from errors.json, the Fisher table and density.json")
    tb.add_argument("runs", nargs="+", type=Path)
    tb.add_argument("--errors", type=Path, default=Path("errors.json"))
    tb.add_argument("--fisher", type=Path, default=Path("fisher/fisher_table.csv"))
    tb.add_argument("--density", type=Path, default=Path("density.json"))
    args = parser.parse_args(argv)
    if args.cmd == "table":
        print(results_table(args.runs, args.errors, args.fisher, args.density))
    elif args.cmd == "curves":
        plot_curves(args.runs, args.out, args.energy_key, args.force_key)
    else:
        labels = args.labels or [f.parent.name for f in args.files]
        summary = plot_density(args.files, labels, args.out, args.skip_ps)
        for k, v in summary.items():
            print(f"{k}: rho = {v['density_mean']:.3f} ± {v['density_err']:.3f} g/mL over t >= {args.skip_ps} ps (run {v['time_ps']:.2f} ps)")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
