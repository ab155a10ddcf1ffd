"""Analysis helpers for the revPBE0-D3 reproduction: learning curves, i-PI density traces, block averages.

    python analyze.py curves RUN_DIR... --out learning_curves.png
    python analyze.py density IPI_OUT... --labels ekf adam --skip-ps 0.5 --out density.png
    python analyze.py table RUN_DIR... --errors errors.json --fisher fisher/fisher_table.csv --density density.json
    python analyze.py rdf IPI_XYZ... --labels ekf adam --skip-ps 10 --stride-ps 0.1 --out goo.png --json goo.json
    python analyze.py summary RUN_DIR... --errors errors.json --fisher fisher/fisher_table.csv --density density.json \
        --md-planned-ps 10 --out models_summary.csv
    python analyze.py fisher-map results/models_summary.csv --out fisher_map.png
    python analyze.py pressure-bias MODEL.pt... --db work/data/water.db --split work/runs/RUN/split.npz \
        --json pressure_bias.json --out energy_volume.png
    python analyze.py pressure-map results/models_summary.csv --out pressure_map.png
    python analyze.py late-spread work/runs/RUN... --window 200000 --json late_spread.json   # the end's stability
    python analyze.py status work/runs/*        # how far each training is: updates, rate, time left, last errors,
                                                # and its NPT run (work/md_<run>): ps done, density so far

Units: energies per atom in meV/atom, forces in meV/Å, density in g/cm³ (= g/mL), time in ps, distances in Å,
pressure in bar.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

REFERENCE_DENSITY = 0.92  # g/mL, revPBE0-D3 at 320 K, 1 bar (the study)


def _save(fig, out: Path, dpi: int) -> None:
    """Lay out, write and report a figure."""
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    print(f"written: {out}")


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
    """Validation curves from the Lightning CSV logs under ``run_dir`` (step -> metric). A run resumed from
    its checkpoint writes a new ``version_<k>`` log each time: all are read in version order, and a step
    logged again by a later segment (the updates after the checkpoint it resumed from) takes the later value."""
    def version(path: Path) -> Tuple[int, str]:
        m = re.search(r"version_(\d+)", str(path))
        return (int(m.group(1)) if m else -1, str(path))

    files = sorted(Path(run_dir).rglob("metrics.csv"), key=version)
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}")
    merged: Dict[str, Dict[float, float]] = {}
    for path in files:
        with open(path) as fh:
            for row in csv.DictReader(fh):
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        merged.setdefault(key, {})[float(row["step"])] = float(value)
    return {k: np.array(sorted(v.items())) for k, v in merged.items()}


PRESSURE_KEY = "val_pressure_bias_bar"  # logged by the task since session 9 (bar)
# the validation columns of a run's CSV logs and their names in a kept run's validation_curves.csv (keep.py)
VALIDATION_COLUMNS = {"val_energy_per_atom_rmse": "val_energy_per_atom_rmse_eV",
                      "val_forces_rmse": "val_forces_rmse_eV_per_A",
                      PRESSURE_KEY: "val_pressure_bias_bar", "wall_time_s": "wall_time_s"}


def read_validation_curves(path: Path, run: str) -> Dict[str, np.ndarray]:
    """:func:`read_metrics` of run ``run`` from a kept ``validation_curves.csv`` (keep.py; one row per
    validation, several runs in one file), keyed by the logs' names."""
    merged: Dict[str, Dict[float, float]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            if row["run"] != run:
                continue
            for key, column in VALIDATION_COLUMNS.items():
                if row.get(column) not in ("", None):
                    merged.setdefault(key, {})[float(row["step"])] = float(row[column])
    if not merged:
        raise ValueError(f"no validations of run {run!r} in {path}")
    return {k: np.array(sorted(v.items())) for k, v in merged.items()}


def plot_curves(run_dirs: List[Path], out: Path, energy_key: str, force_key: str,
                metrics: Optional[Dict[Path, Dict[str, np.ndarray]]] = None) -> List[str]:
    """Validation energy and force RMSE against updates (log axes), and the pressure bias (bar) in a third panel
    when a run logged it. Returns the panels' metric keys. ``metrics``: :func:`read_metrics` of some of the runs,
    keyed as in ``run_dirs``, when the caller has read them already."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {run: (metrics or {}).get(run) or read_metrics(run) for run in run_dirs}
    keys = [energy_key, force_key] + ([PRESSURE_KEY] if any(PRESSURE_KEY in m for m in metrics.values()) else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    seed_re = r"_s(\d+)(?=(_ef[0-9.]+)?(_thr)?$)"  # <opt>_lr<η>_s<seed>[_ef<f>][_thr]
    setups = list(dict.fromkeys(re.sub(seed_re, "", Path(run).name) for run in run_dirs))  # one colour per setup
    for run in run_dirs:
        m = metrics[run]
        name = Path(run).name
        setup = re.sub(seed_re, "", name)
        seed = re.search(seed_re, name)
        style = dict(color=f"C{setups.index(setup)}", ls=["-", "--", ":", "-."][int(seed.group(1)) % 4 if seed else 0])
        for ax, key in zip(axes, keys):
            if key == PRESSURE_KEY and key in m:
                ax.semilogx(m[key][:, 0] + 1, m[key][:, 1], marker=".", label=name, **style)
            elif key in m:
                ax.loglog(m[key][:, 0] + 1, m[key][:, 1] * 1000, marker=".", label=name, **style)
    axes[0].set(xlabel="updates", ylabel="validation energy RMSE / meV/atom")
    axes[1].set(xlabel="updates", ylabel="validation force RMSE / meV/Å")
    if len(keys) == 3:
        axes[2].set(xlabel="updates", ylabel="pressure bias from the energy errors / bar")
        axes[2].axhline(0, color="k", lw=0.6)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, out, 120)
    return keys


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
    _save(fig, out, 120)
    return summary


RUN_ID = re.compile(r"(ekf|adam)_lr([0-9.e-]+)_s(\d+)(?:_ef([0-9.]+))?(_thr)?$")  # optimizer, η, seed, ef, thr


def read_result_files(errors: Path, fisher: Path, density: Path) -> Tuple[dict, dict, dict]:
    """errors.json, the Fisher table (rows by model) and density.json as dicts; a missing file gives {}."""
    err = json.loads(Path(errors).read_text()) if Path(errors).exists() else {}
    fis = {r["model"]: r for r in csv.DictReader(open(fisher))} if Path(fisher).exists() else {}
    den = json.loads(Path(density).read_text()) if Path(density).exists() else {}
    return err, fis, den


def results_table(runs: List[Path], errors: Path, fisher: Path, density: Path) -> str:
    """Markdown table: model, optimizer, η, updates, RMSEs, pressure bias, Fisher median, density (all inputs the
    workflow writes)."""
    err, fis, den = read_result_files(errors, fisher, density)
    lines = ["| model | optimizer | η | updates | E RMSE (meV/atom) | F RMSE (meV/Å) | pressure bias (bar) "
             "| Fisher median (log10) | density (g/mL) | T (K) | MD (ps) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        name = Path(run).name
        m = RUN_ID.match(name)
        opt, lr = (m.group(1).upper() if m.group(1) == "ekf" else "Adam", m.group(2)) if m else ("?", "?")
        steps = max((int(v[-1, 0]) + 1 for v in read_metrics(run).values() if len(v)), default=0)
        e, f, d = err.get(name, {}), fis.get(name, {}), den.get(name, {})
        fmt = lambda x, spec: format(float(x), spec) if x not in (None, "") else "—"  # noqa: E731
        rho = f"{d['density_mean']:.3f} ± {d['density_err']:.3f}" if d else "—"
        if d and not np.isfinite(d["density_mean"]):
            rho, d = f"no average (run ended at {d['time_ps']:.2f} ps)", {**d, "temperature_mean_K": None}
        bias = (f"{e['pressure_bias_bar']:+.0f} ± {e['pressure_bias_err_bar']:.0f}"
                if e.get("pressure_bias_bar") is not None and "pressure_bias_err_bar" in e else "—")
        lines.append(f"| `{name}` | {opt} | {lr} | {steps:,} | {fmt(e.get('energy_rmse_meV_per_atom'), '.2f')} | "
                     f"{fmt(e.get('forces_rmse_meV_per_A'), '.0f')} | {bias} | {fmt(f.get('log10_median'), '.2f')} | {rho} | "
                     f"{fmt(d.get('temperature_mean_K'), '.0f')} | {fmt(d.get('time_ps'), '.2f')} |")
    return "\n".join(lines)


def read_ipi_xyz(path: Path) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Frames of an i-PI xyz trajectory written with ``cell_units='angstrom'`` and positions in Å:
    [(symbols (N,), positions (N, 3) Å, cell (3, 3) Å rows)] from each ``# CELL(abcABC): a b c α β γ`` line."""
    from ase.geometry import cellpar_to_cell

    frames, lines = [], Path(path).read_text().splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        n = int(lines[i])
        comment = lines[i + 1]
        m = re.search(r"CELL\(abcABC\):\s+([-\d.eE+\s]+?)\s+(cell|positions|Step|$)", comment)
        if m is None or "angstrom" not in comment:
            raise ValueError(f"{path}: frame at line {i + 1} has no CELL(abcABC) line in Å: {comment[:80]!r}")
        cell = cellpar_to_cell([float(x) for x in m.group(1).split()[:6]])
        rows = [ln.split() for ln in lines[i + 2 : i + 2 + n]]
        frames.append((np.array([r[0] for r in rows]), np.array([[float(x) for x in r[1:4]] for r in rows]), cell))
        i += 2 + n
    return frames


def g_oo(frames, r_max: float = 6.0, bins: int = 120) -> Tuple[np.ndarray, np.ndarray]:
    """O–O radial distribution g(r) (minimum image, r < min half box width) averaged over ``frames``: (r (bins,) Å, g (bins,))."""
    edges = np.linspace(0.0, r_max, bins + 1)
    hist, norm = np.zeros(bins), 0.0
    for symbols, pos, cell in frames:
        o = pos[symbols == "O"]
        inv = np.linalg.inv(cell)
        d = o[None, :, :] - o[:, None, :]  # (N_O, N_O, 3)
        frac = d @ inv
        d = (frac - np.round(frac)) @ cell
        r = np.linalg.norm(d, axis=-1)[np.triu_indices(len(o), 1)]
        hist += np.histogram(r, edges)[0]
        vol = abs(np.linalg.det(cell))
        norm += len(o) * (len(o) - 1) / 2 / vol  # pairs per volume
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    return 0.5 * (edges[1:] + edges[:-1]), hist / (shell * norm)


def plot_rdf(files: List[Path], labels: List[str], out: Path, skip_ps: float, stride_ps: float) -> Dict[str, dict]:
    """g_OO(r) of each trajectory after ``skip_ps`` (frames every ``stride_ps``, from the 0.1 ps trajectory
    stride of the examples' input.xml), one figure; returns the first peak position and height per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    summary = {}
    for f, label in zip(files, labels):
        frames = read_ipi_xyz(f)
        first = int(round(skip_ps / stride_ps))
        use = frames[first:]
        if not use:
            summary[label] = {"frames": 0}
            continue
        r, g = g_oo(use)
        k = int(np.argmax(g))
        summary[label] = {"frames": len(use), "peak_r_A": float(r[k]), "peak_g": float(g[k])}
        ax.plot(r, g, label=f"{label} ({len(use)} frames)")
    ax.set_xlabel("r / Å")
    ax.set_ylabel("g$_{OO}$(r)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out, 130)
    return summary


HOLDS_DENSITY_TOLERANCE = 0.05  # relative: a stable run whose density is within 5 % of 0.92 g/mL "holds" it
LOST_LIQUID_TEMPERATURE_K = 340.0  # a 320 K NPT run whose averaged temperature exceeds this has lost the liquid


def md_outcome(row: Dict[str, str]) -> str:
    """What one model's NPT run did, from a ``models_summary.csv`` row: ``"lost liquid"`` (stopped before the
    planned time, averaged temperature above 340 K, or no average), ``"holds density"`` (within 5 % of
    0.92 g/mL), ``"wrong density"`` (stable, further off), or ``"no MD"``."""
    if not row.get("md_planned_ps"):
        return "no MD"
    ran, planned = float(row.get("md_ps") or 0.0), float(row["md_planned_ps"])
    rho = float(row["density_g_per_mL"]) if row.get("density_g_per_mL") else float("nan")
    temp = float(row["temperature_K"]) if row.get("temperature_K") else float("nan")
    if ran < planned or not np.isfinite(rho) or not (temp <= LOST_LIQUID_TEMPERATURE_K):
        return "lost liquid"
    return "holds density" if abs(rho - REFERENCE_DENSITY) <= HOLDS_DENSITY_TOLERANCE * REFERENCE_DENSITY \
        else "wrong density"


SUMMARY_FIELDS = ["label", "session", "optimizer", "eta", "protocol", "updates", "energy_rmse_meV_per_atom",
                  "forces_rmse_meV_per_A", "md_planned_ps", "md_ps", "density_g_per_mL", "density_err",
                  "temperature_K", "fisher_log10_median", "pressure_bias_bar", "pressure_bias_err_bar", "source"]


def summary_rows(runs: List[Path], errors: Path, fisher: Path, density: Path, md_planned_ps: float,
                 session: str = "") -> List[Dict[str, str]]:
    """One ``models_summary.csv`` row per run (the columns of :data:`SUMMARY_FIELDS`) from the files the
    workflow writes: errors.json (meV/atom, meV/Å), the Fisher table, density.json (g/mL, K, ps)."""
    err, fis, den = read_result_files(errors, fisher, density)
    finite = lambda x: x is not None and np.isfinite(x)  # noqa: E731
    rows = []
    for run in runs:
        name = Path(run).name
        m = RUN_ID.match(name)
        e, f, d = err.get(name, {}), fis.get(name, {}), den.get(name, {})
        rows.append({
            "label": name, "session": session,
            "optimizer": ("EKF" if m.group(1) == "ekf" else "Adam") if m else "?", "eta": m.group(2) if m else "",
            "protocol": (f"ef {m.group(4) or 0.5}, " + ("threshold" if m.group(5) else "random")) if m else "",
            "updates": e.get("updates", ""),
            "energy_rmse_meV_per_atom": e.get("energy_rmse_meV_per_atom", ""),
            "forces_rmse_meV_per_A": e.get("forces_rmse_meV_per_A", ""),
            "md_planned_ps": md_planned_ps if d else "", "md_ps": d.get("time_ps", ""),
            "density_g_per_mL": d["density_mean"] if finite(d.get("density_mean")) else "",
            "density_err": d["density_err"] if finite(d.get("density_err")) else "",
            "temperature_K": d["temperature_mean_K"] if finite(d.get("temperature_mean_K")) else "",
            "fisher_log10_median": f.get("log10_median", ""),
            "pressure_bias_bar": e.get("pressure_bias_bar", ""),
            "pressure_bias_err_bar": e.get("pressure_bias_err_bar", ""),
            "source": f"{Path(errors).name}, {Path(fisher).name}, {Path(density).name}",
        })
    return rows


def write_summary(rows: List[Dict[str, object]], path: Path) -> None:
    """Write ``models_summary.csv`` rows (the columns of :data:`SUMMARY_FIELDS`) to ``path``."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        w.writerows(rows)


def plot_fisher_map(summary_csv: Path, out: Path) -> Dict[str, str]:
    """The study's question as one figure: Fisher median (log10) against force and energy RMSE on the 280
    validation frames (meV/Å, meV/atom), one point per model of ``summary_csv``, marker by optimizer and colour
    by what the model did in NPT (:func:`md_outcome`). Returns {label: outcome}."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(summary_csv)))
    colours = {"holds density": "C2", "wrong density": "C1", "lost liquid": "C3", "no MD": "0.6"}
    markers = {"EKF": "o", "Adam": "s"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    outcomes, seen = {}, set()
    for row in rows:
        if not row.get("fisher_log10_median"):
            continue
        outcome = md_outcome(row)
        outcomes[row["label"]] = outcome
        key = (row["optimizer"], outcome)
        for ax, x in zip(axes, ("forces_rmse_meV_per_A", "energy_rmse_meV_per_atom")):
            ax.scatter(float(row[x]), float(row["fisher_log10_median"]), c=colours[outcome],
                       marker=markers.get(row["optimizer"], "^"), s=45, edgecolors="k", linewidths=0.5,
                       label=f"{row['optimizer']}, {outcome}" if key not in seen else None)
        seen.add(key)
    axes[0].set(xlabel="force RMSE, 280 validation frames / meV/Å", ylabel="Fisher median (log10)")
    axes[1].set(xlabel="energy RMSE, 280 validation frames / meV/atom", xscale="log")
    axes[1].xaxis.set_major_locator(matplotlib.ticker.FixedLocator([1, 2, 3, 5, 10, 20, 50, 100]))
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].axvline(119, color="k", ls=":", lw=0.8)
    axes[1].axvline(2.37, color="k", ls=":", lw=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("Fisher median against RMSE; NPT at 320 K, 1 bar (dotted: RuNNer on its fit frames)", fontsize=10)
    _save(fig, out, 130)
    return outcomes


WATER_MOLECULE_G = 18.015 / 6.02214076e23  # g per H₂O


def _evaluate_module():
    """evaluate.py beside this file (one place for per-frame errors and the energy–volume trend)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("water_evaluate", Path(__file__).with_name("evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pressure_bias(models: List[Path], db: Path, split: Path, labels: List[str], json_out: Path, out: Path,
                  part: str = "val_idx") -> Dict[str, dict]:
    """Each model's energy error against the volume per atom on the frames ``split[part]`` of ``db`` (Å, eV),
    its pressure bias (:func:`ekf_plugin.model_errors.energy_volume_trend`, bar), and one figure: the per-frame energy error
    without its mean (meV/atom) against the frame's density (g/mL, water), with each model's fitted line."""
    import matplotlib

    from ekf_plugin.data import read_db_frames
    from ekf_plugin.model_errors import energy_volume_trend

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = _evaluate_module()
    frames = read_db_frames(db, np.load(split)[part])  # Å, eV, eV/Å
    results: Dict[str, dict] = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (model, label) in enumerate(zip(models, labels)):
        err = ev.frame_errors(model, frames)
        trend = energy_volume_trend(err.volume, err.energy)
        results[label] = {**trend, "model": str(model), "frames": len(frames),  # pressure_bias_err_bar: 1 s.e.
                          "volume_A3_per_atom": err.volume.tolist(),
                          "energy_error_meV_per_atom": (1e3 * err.energy).tolist()}
        rho = WATER_MOLECULE_G / (3 * err.volume * 1e-24)  # g/mL: three atoms per molecule
        e = 1e3 * err.energy - trend["energy_error_mean_meV_per_atom"]
        ax.scatter(rho, e, s=6, color=f"C{k}", alpha=0.5)
        v = np.linspace(err.volume.min(), err.volume.max(), 50)
        slope = trend["energy_error_volume_slope_meV_per_A3"]
        ax.plot(WATER_MOLECULE_G / (3 * v * 1e-24), slope * (v - err.volume.mean()), color=f"C{k}",
                label=f"{label}: ΔP {trend['pressure_bias_bar']:+.0f} ± {trend['pressure_bias_err_bar']:.0f} bar "
                      f"(r {trend['energy_error_volume_r']:+.2f})")
        print(f"{label}: {json.dumps({k2: round(v2, 4) for k2, v2 in trend.items()})}", flush=True)
    ax.set(xlabel="frame density / g mL⁻¹", ylabel="energy error − its mean / meV/atom",
           title=f"energy error against density, {len(frames)} frames ({part.split('_')[0]})")
    ax.axhline(0, color="k", lw=0.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out, 130)
    Path(json_out).write_text(json.dumps(results))
    return results


def plot_pressure_map(summary_csv: Path, out: Path) -> Dict[str, Tuple[float, float]]:
    """NPT density against the pressure bias, one point per model of ``summary_csv`` with both (marker by
    optimizer, colour by :func:`md_outcome`), and the density a bias ΔP predicts for liquid water,
    0.92·exp(−κ·ΔP) with κ = 4.5e-5 /bar. Returns {label: (bias bar, density g/mL)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"holds density": "C2", "wrong density": "C1", "lost liquid": "C3", "no MD": "0.6"}
    markers = {"EKF": "o", "Adam": "s"}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points, seen = {}, set()
    for row in csv.DictReader(open(summary_csv)):
        if not (row.get("pressure_bias_bar") and row.get("density_g_per_mL")):
            continue
        bias, rho = float(row["pressure_bias_bar"]), float(row["density_g_per_mL"])
        outcome = md_outcome(row)
        key = (row["optimizer"], outcome)
        ax.errorbar(bias, rho, yerr=float(row["density_err"] or 0), xerr=float(row.get("pressure_bias_err_bar") or 0),
                    fmt=markers.get(row["optimizer"], "^"),
                    color=colours[outcome], mec="k", mew=0.5, ms=7,
                    label=f"{row['optimizer']}, {outcome}" if key not in seen else None)
        seen.add(key)
        points[row["label"]] = (bias, rho)
    if points:
        x = np.linspace(min(min(b for b, _ in points.values()), -1000), max(max(b for b, _ in points.values()), 1000), 100)
        from ekf_plugin.model_errors import density_factor

        ax.plot(x, REFERENCE_DENSITY * np.array([density_factor(b) for b in x]), "k--", lw=0.8,
                label="0.92·exp(−κΔP), κ = 4.5e-5 /bar")
    ax.set(xlabel="pressure bias from the energy error's volume trend / bar", ylabel="NPT density / g mL⁻¹",
           title="NPT density (320 K, 1 bar) against the pressure bias")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out, 130)
    return points


def _max_steps(run_dir: Path) -> int:
    """The run's update budget: the ``max_steps`` file that ``workflow.sh`` writes at each launch (a resumed
    ``spktrain`` run keeps its first ``config.yaml``, so a budget raised on resuming is only there), else
    ``trainer.max_steps`` from ``config.yaml`` (-1: none, or no config)."""
    launched = Path(run_dir) / "max_steps"
    if launched.is_file() and launched.read_text().strip().lstrip("-").isdigit():
        return int(launched.read_text())
    cfg = Path(run_dir) / "config.yaml"
    text = cfg.read_text() if cfg.is_file() else ""
    m = re.search(r"^\s+max_steps:\s*(-?\d+)\s*$", text, flags=re.M)
    return int(m.group(1)) if m else -1


def npt_ran_model(md_dir: Path, model: Path) -> Optional[bool]:
    """Whether the NPT run in ``md_dir`` (examples/ipi_npt_water/run.sh) ran ``model``: the checksum its
    ``run.args`` records against the model's content; None where it records none (runs before session 19)
    or there is no model file."""
    args = Path(md_dir) / "run.args"
    recorded = re.search(r"\bsha256=([0-9a-f]+)", args.read_text()) if args.exists() else None
    if recorded is None or not Path(model).is_file():
        return None
    return hashlib.sha256(Path(model).read_bytes()).hexdigest().startswith(recorded.group(1))


def md_status(md_dir: Path, model: Path) -> Dict[str, object]:
    """How far the NPT run in ``md_dir`` is: simulated time and planned time (ps; the steps of its ``run.args``
    times the time step of its ``npt.out``), the mean density (g/mL) over the second half simulated so far, and
    whether it ran ``model`` (:func:`npt_ran_model`; False: a trajectory of a model saved earlier at that path)."""
    out = Path(md_dir) / "npt.out"
    p = read_ipi_properties(out) if out.is_file() else {}
    if not len(p.get("time", ())):
        return {"md_ps": None, "md_planned_ps": None, "md_density": None, "md_same_model": None}
    t = p["time"]
    args = Path(md_dir) / "run.args"
    steps = re.search(r"\bsteps=(\d+)", args.read_text()) if args.exists() else None
    dt = t[-1] / p["step"][-1] if p["step"][-1] > 0 else None
    planned = float(int(steps.group(1)) * dt) if steps and dt else None
    return {"md_ps": float(t[-1]), "md_planned_ps": planned,
            "md_density": float(p["density"][t >= t[-1] / 2].mean()) if "density" in p else None,
            "md_same_model": npt_ran_model(md_dir, model)}


LATE_SPREAD_KEYS = {PRESSURE_KEY: ("pressure_bias_bar", 1.0),
                    "val_energy_per_atom_rmse": ("energy_meV_per_atom", 1e3), "val_forces_rmse": ("forces_meV_per_A", 1e3)}


def late_spread(run_dir: Path, window: int = 200000,
                metrics: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, object]:
    """How much a run's validation figures move between its last validations (the last ``window`` updates):
    for the pressure bias (bar), energy RMSE (meV/atom) and force RMSE (meV/Å) of its CSV logs, the number of
    validations, median, 10th and 90th percentiles and standard deviation. A model kept at the end of a run whose
    bias swings by thousands of bar between validations holds or misses the density by the luck of the stop.
    ``run_dir``: a run directory, or ``validation_curves.csv:RUN`` for a run kept by keep.py; ``metrics``: the
    run directory's :func:`read_metrics`, when the caller has read them already."""
    text = str(run_dir)
    if metrics is not None:
        m, run_name = metrics, Path(run_dir).name
    elif ".csv:" in text:
        path, run = text.rsplit(":", 1)
        m, run_name = read_validation_curves(Path(path), run), run
    else:
        m, run_name = read_metrics(run_dir), Path(run_dir).name
    out: Dict[str, object] = {"run": run_name}
    for key, (name, scale) in LATE_SPREAD_KEYS.items():
        a = m.get(key)
        if a is None or not len(a):
            continue
        late = a[a[:, 0] > a[:, 0].max() - window]  # (k, 2) step, value
        w = late[:, 1] * scale
        out[name] = {"validations": int(len(w)), "first_update": int(late[:, 0].min()),
                     "last_update": int(late[:, 0].max()), "median": float(np.median(w)),
                     "p10": float(np.percentile(w, 10)), "p90": float(np.percentile(w, 90)), "std": float(w.std())}
    return out


def run_status(run_dir: Path, window: int = 5000, now: float = None) -> Dict[str, object]:
    """How far a (running or stopped) ``spktrain`` run is, from its CSV logs and ``config.yaml``: the last logged
    update, ``max_steps``, the rate in updates/s over the last ``window`` updates of its ``wall_time_s`` curve
    (the run's own clock, continued across resumes), the time left at that rate (h), the minutes since its log
    was last written (a run that writes nothing for long has stopped), and its last validation errors
    (meV/atom, meV/Å) and pressure bias (bar). A run that has not written its first log line yet (just started)
    has 0 updates and no rate, errors or log age."""
    import time

    try:
        m = read_metrics(run_dir)
    except FileNotFoundError:  # started, no metrics.csv yet
        m = {}
    clock = m.get("wall_time_s")
    steps = [a[-1, 0] for a in m.values() if len(a)]
    last = int(max(steps)) if steps else 0
    rate = None
    if clock is not None and len(clock) >= 2:
        recent = clock[clock[:, 0] >= clock[-1, 0] - window]
        if len(recent) < 2:
            recent = clock[-2:]
        dt = recent[-1, 1] - recent[0, 1]
        rate = float((recent[-1, 0] - recent[0, 0]) / dt) if dt > 0 else None
    target = _max_steps(run_dir)
    left_h = (target - last) / rate / 3600 if rate and target > last else (0.0 if 0 < target <= last + 1 else None)
    logs = list(Path(run_dir).rglob("metrics.csv"))
    idle_min = ((now if now is not None else time.time()) - max(f.stat().st_mtime for f in logs)) / 60 if logs else None

    def last_of(key: str, scale: float = 1.0):
        return float(m[key][-1, 1] * scale) if key in m and len(m[key]) else None

    return {"run": Path(run_dir).name, "updates": last, "max_steps": target, "updates_per_s": rate,
            "hours_left": left_h, "minutes_since_log": idle_min,
            "val_energy_meV_per_atom": last_of("val_energy_per_atom_rmse", 1000.0),
            "val_forces_meV_per_A": last_of("val_forces_rmse", 1000.0), "pressure_bias_bar": last_of(PRESSURE_KEY)}


def status_table(rows: List[Dict[str, object]]) -> str:
    """The rows of :func:`run_status` as a fixed-width text table."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    def npt(r):  # "7.1/20 0.931": simulated/planned ps and the density so far; a foreign trajectory says so
        if r.get("md_ps") is None:
            return "-"
        if r.get("md_same_model") is False:
            return "other model"
        planned = "?" if r.get("md_planned_ps") is None else format(r["md_planned_ps"], ".0f")
        return f"{r['md_ps']:.1f}/{planned} {f(r.get('md_density'), '.3f')}"

    lines = [f"{'run':<28} {'updates':>17} {'upd/s':>6} {'h left':>6} {'log age':>8} {'val E':>6} {'val F':>6} "
             f"{'bias':>7}  {'NPT':<13}",
             f"{'':<28} {'':>17} {'':>6} {'':>6} {'(min)':>8} {'meV/at':>6} {'meV/Å':>6} {'bar':>7}  {'ps, g/mL':<13}"]
    for r in rows:
        done = f"{r['updates']}/{r['max_steps']}" if r["max_steps"] > 0 else str(r["updates"])
        lines.append(f"{r['run']:<28} {done:>17} {f(r['updates_per_s'], '.1f'):>6} {f(r['hours_left'], '.2f'):>6} "
                     f"{f(r['minutes_since_log'], '.1f'):>8} {f(r['val_energy_meV_per_atom'], '.2f'):>6} "
                     f"{f(r['val_forces_meV_per_A'], '.1f'):>6} {f(r['pressure_bias_bar'], '.0f'):>7}  {npt(r)}")
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
    rd = sub.add_parser("rdf", help="O–O radial distribution of i-PI xyz trajectories (Å), one figure")
    rd.add_argument("files", nargs="+", type=Path)
    rd.add_argument("--labels", nargs="+")
    rd.add_argument("--skip-ps", type=float, default=0.0, help="equilibration time left out (ps)")
    rd.add_argument("--stride-ps", type=float, default=0.1, help="time between trajectory frames (ps)")
    rd.add_argument("--out", type=Path, default=Path("goo.png"))
    rd.add_argument("--json", type=Path, default=None)
    sm = sub.add_parser("summary", help="models_summary.csv (one row per run) from errors.json, the Fisher table "
                        "and density.json")
    sm.add_argument("runs", nargs="+", type=Path)
    sm.add_argument("--errors", type=Path, default=Path("errors.json"))
    sm.add_argument("--fisher", type=Path, default=Path("fisher/fisher_table.csv"))
    sm.add_argument("--density", type=Path, default=Path("density.json"))
    sm.add_argument("--md-planned-ps", type=float, required=True, help="the NPT length asked for (ps)")
    sm.add_argument("--out", type=Path, default=Path("models_summary.csv"))
    fm = sub.add_parser("fisher-map", help="Fisher median against RMSE of all models, coloured by their NPT outcome")
    fm.add_argument("summary", type=Path, help="a models_summary.csv (one row per model)")
    fm.add_argument("--out", type=Path, default=Path("fisher_map.png"))
    pb = sub.add_parser("pressure-bias", help="energy error against volume and the pressure bias of each model")
    pb.add_argument("models", nargs="+", type=Path)
    pb.add_argument("--db", type=Path, required=True, help="the ASE database the runs trained on (Å, eV)")
    pb.add_argument("--split", type=Path, required=True, help="a run's split.npz (its val_idx frames are used)")
    pb.add_argument("--part", default="val_idx", choices=("val_idx", "train_idx"))
    pb.add_argument("--labels", nargs="+")
    pb.add_argument("--json", type=Path, default=Path("pressure_bias.json"))
    pb.add_argument("--out", type=Path, default=Path("energy_volume.png"))
    pm = sub.add_parser("pressure-map", help="NPT density against the pressure bias of all models")
    pm.add_argument("summary", type=Path, help="a models_summary.csv with pressure_bias_bar")
    pm.add_argument("--out", type=Path, default=Path("pressure_map.png"))
    ls = sub.add_parser("late-spread", help="how much each run's validation bias and errors move over its last updates")
    ls.add_argument("runs", nargs="+", help="run directories, or validation_curves.csv:RUN of kept runs")
    ls.add_argument("--window", type=int, default=200000, help="the last updates to look at")
    ls.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    st = sub.add_parser("status", help="how far each spktrain run is: updates, rate, time left, last errors")
    st.add_argument("runs", nargs="+", type=Path)
    st.add_argument("--window", type=int, default=5000, help="updates over which the rate is measured")
    st.add_argument("--models", type=Path, default=Path(__file__).resolve().parent / "models",
                    help="where the queue's evaluate step writes <run>.pt (the NPT runs' models)")
    args = parser.parse_args(argv)
    if args.cmd == "late-spread":
        rows = [late_spread(r, args.window) for r in args.runs]
        for r in rows:
            print(r["run"] + "".join(f" | {k}: median {v['median']:.2f}, p10-p90 {v['p10']:.2f}..{v['p90']:.2f}, "
                                     f"std {v['std']:.2f} ({v['validations']} validations)"
                                     for k, v in r.items() if k != "run"))
        if args.json:
            args.json.write_text(json.dumps({r["run"]: r for r in rows}, indent=2))
        return 0
    if args.cmd == "status":
        rows = []
        for r in (Path(r) for r in args.runs if Path(r).is_dir()):  # work/runs/<id>; its NPT is work/md_<id>
            rows.append({**run_status(r, args.window),
                         **md_status(r.parent.parent / f"md_{r.name}", args.models / f"{r.name}.pt")})
        print(status_table(rows))
        return 0
    if args.cmd == "pressure-bias":
        pressure_bias(args.models, args.db, args.split, args.labels or [m.stem for m in args.models], args.json,
                      args.out, args.part)
        return 0
    if args.cmd == "pressure-map":
        for k, v in plot_pressure_map(args.summary, args.out).items():
            print(f"{k}: {v}")
        return 0
    if args.cmd == "summary":
        write_summary(summary_rows(args.runs, args.errors, args.fisher, args.density, args.md_planned_ps), args.out)
        print(f"written: {args.out}")
        return 0
    if args.cmd == "fisher-map":
        for k, v in plot_fisher_map(args.summary, args.out).items():
            print(f"{k}: {v}")
        return 0
    if args.cmd == "rdf":
        summary = plot_rdf(args.files, args.labels or [f.parent.name for f in args.files], args.out, args.skip_ps,
                           args.stride_ps)
        for k, v in summary.items():
            print(f"{k}: {v}")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        return 0
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
