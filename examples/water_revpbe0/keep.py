"""Keep a finished run of the training queue for the session's report: its model under models/session<K>/ and its
figures under results/session<K>/, keyed as results/models_summary.csv names them (``s<K>_<run>_<N>k``).

    python keep.py RUN... --session K          # after `workflow.sh train` with THEN="evaluate md" has finished RUN

Reads what the queue leaves in the work directory: ``models/<run>.pt`` and ``work/errors_<run>.json`` (THEN's
evaluate step, on all the run's validation frames), ``work/runs/<run>/`` (its validation curves and split), and
``work/md_<run>/npt.out`` with ``npt.pos_0.xyz`` (THEN's md step; the NPT part is skipped, with a note, while that
run is shorter than ``--md-ps``, or when its ``run.args`` records another model's checksum: a model trained further
and saved at the same path). Writes, merging with what the session kept before (a second call replaces the
run's entries, it does not add them twice):

    models/session<K>/<run>_<N>k.pt            the model; the queue's copy models/<run>.pt is removed
    results/session<K>/errors.json             <run>_<N>k: RMSEs (meV/atom, meV/Å) and the energy-volume trend
    results/session<K>/pressure_bias.json      s<K>_<run>_<N>k: the bias (bar) and each frame's volume and error
    results/session<K>/density.json, goo.json  <run>_<N>k: density (g/mL) averaged from --skip-ps with 5-block
                                               errors, mean temperature (K); the first g_OO peak (Å)
    results/session<K>/late_spread.json        <run>: how its validation bias and errors moved over its last
                                               --window updates (analyze.late_spread)
    results/session<K>/<run>_<N>k/             energy_volume.png, learning_curves.png, validation_curves.csv,
                                               npt.out, density.png, goo.png
    results/models_summary.csv                 the row s<K>_<run>_<N>k, with the Fisher median when
                                               results/session<K>/fisher_table.csv names that label

The Fisher spectra are one `ekf-plugin fisher` call over several models (the same 1000 labels); write its table
with the summary labels as results/session<K>/fisher_table.csv and call this again to fill the rows' medians.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import analyze  # noqa: E402

def _merge(path: Path, entries: Dict[str, dict], indent: Optional[int] = 2) -> None:
    """Add ``entries`` to the JSON object in ``path`` (created if absent), replacing keys already there."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(entries)
    path.write_text(json.dumps(data, indent=indent) + "\n")


def validation_curves(run_dir: Path, out: Path, metrics: Optional[Dict[str, np.ndarray]] = None) -> int:
    """The run's validation metrics (eV/atom, eV/Å, bar, s) per logged step as CSV; returns the number of rows.
    ``metrics``: the run's :func:`analyze.read_metrics`, when the caller has read them already."""
    metrics = analyze.read_metrics(run_dir) if metrics is None else metrics
    steps = sorted({int(s) for s, _ in metrics.get("val_forces_rmse", [])})
    values = {key: dict((int(s), v) for s, v in metrics[key]) for key in analyze.VALIDATION_COLUMNS if key in metrics}
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "step", *analyze.VALIDATION_COLUMNS.values()])
        for step in steps:
            w.writerow([run_dir.name, step, *(values.get(key, {}).get(step, "") for key in analyze.VALIDATION_COLUMNS)])
    return len(steps)


def _replace_summary_row(summary: Path, row: Dict[str, object]) -> None:
    rows = list(csv.DictReader(open(summary))) if summary.exists() else []
    rows = [r for r in rows if r["label"] != row["label"]] + [row]
    analyze.write_summary(rows, summary)


def keep_run(run: str, session: int, example: Path = HERE, work: Optional[Path] = None, md_ps: float = 20.0,
             skip_ps: float = 10.0, stride_ps: float = 0.1, window: int = 200000) -> Dict[str, object]:
    """Keep ``run`` for session ``session`` (see the module docstring); returns its models_summary.csv row.
    ``example``: the example directory (models/, results/); ``work``: the queue's work directory."""
    work = Path(work) if work is not None else example / "work"
    m = analyze.RUN_ID.match(run)
    if m is None:
        raise SystemExit(f"bad run id {run!r} (want <ekf|adam>_lr<eta>_s<seed>[_ef<f>][_thr])")
    errors = json.loads((work / f"errors_{run}.json").read_text())[run]
    run_dir = work / "runs" / run
    n_val = len(np.load(run_dir / "split.npz")["val_idx"])
    if errors.get("frames") != n_val or errors.get("split", "val") != "val":
        raise SystemExit(f"{run}: errors_{run}.json is not the run's {n_val} validation frames ({errors.get('frames')} "
                         f"{errors.get('split')} frames); run the evaluate step with EVAL_FRAMES={n_val}")
    tag = f"{run}_{round(int(errors['updates']) / 1000)}k"
    label = f"s{session}_{tag}"
    res = example / "results" / f"session{session}"
    own = res / tag
    own.mkdir(parents=True, exist_ok=True)
    kept = example / "models" / f"session{session}" / f"{tag}.pt"
    kept.parent.mkdir(parents=True, exist_ok=True)
    queued = example / "models" / f"{run}.pt"
    if queued.exists():
        shutil.copyfile(queued, kept)
        queued.unlink()
    elif not kept.exists():
        raise SystemExit(f"{run}: neither {queued} nor {kept}: run the evaluate step first")
    _merge(res / "errors.json", {tag: errors})

    with tempfile.TemporaryDirectory() as tmp:
        bias = analyze.pressure_bias([kept], work / "data" / "water.db", run_dir / "split.npz", [label],
                                     Path(tmp) / "pressure_bias.json", own / "energy_volume.png")
    _merge(res / "pressure_bias.json", bias, indent=None)
    metrics = analyze.read_metrics(run_dir)  # the run's CSV logs, read once for the three uses below
    analyze.plot_curves([run_dir], own / "learning_curves.png", "val_energy_per_atom_rmse", "val_forces_rmse",
                        metrics={run_dir: metrics})
    validation_curves(run_dir, own / "validation_curves.csv", metrics)
    _merge(res / "late_spread.json", {run: analyze.late_spread(run_dir, window, metrics)})

    density: Dict[str, float] = {}
    npt = work / f"md_{run}" / "npt.out"
    ran = float(analyze.read_ipi_properties(npt)["time"][-1]) if npt.exists() else 0.0
    same = analyze.npt_ran_model(npt.parent, kept)
    if ran >= md_ps - 1e-6 and same is False:
        print(f"{run}: NPT not kept: {npt.parent} ran another model than {kept.name} (run.args: "
              f"{(npt.parent / 'run.args').read_text().strip()}); run the md step again", flush=True)
    elif ran >= md_ps - 1e-6:
        if same is None:
            print(f"{run}: the NPT's model is not checked ({npt.parent / 'run.args'} has no checksum)", flush=True)
        shutil.copyfile(npt, own / "npt.out")
        density = analyze.plot_density([own / "npt.out"], [tag], own / "density.png", skip_ps)[tag]
        _merge(res / "density.json", {tag: density})
        trajectory = npt.with_name("npt.pos_0.xyz")
        if trajectory.exists():
            _merge(res / "goo.json", analyze.plot_rdf([trajectory], [tag], own / "goo.png", skip_ps, stride_ps))
    else:
        print(f"{run}: NPT not kept ({ran:.2f} of {md_ps} ps in {npt})", flush=True)

    fisher = {r["model"]: r for r in csv.DictReader(open(res / "fisher_table.csv"))} \
        if (res / "fisher_table.csv").exists() else {}
    b = bias[label]
    row = {
        "label": label, "session": session, "optimizer": "EKF" if m.group(1) == "ekf" else "Adam",
        "eta": m.group(2), "protocol": f"ef {m.group(4) or 0.5}, " + ("threshold" if m.group(5) else "random"),
        "updates": int(errors["updates"]),
        "energy_rmse_meV_per_atom": round(errors["energy_rmse_meV_per_atom"], 3),
        "forces_rmse_meV_per_A": round(errors["forces_rmse_meV_per_A"], 2),
        "md_planned_ps": md_ps if density else "", "md_ps": round(density["time_ps"], 3) if density else "",
        "density_g_per_mL": round(density["density_mean"], 4) if density else "",
        "density_err": round(density["density_err"], 4) if density else "",
        "temperature_K": round(density["temperature_mean_K"], 1) if density else "",
        "fisher_log10_median": round(float(fisher[label]["log10_median"]), 3) if label in fisher else "",
        "pressure_bias_bar": round(b["pressure_bias_bar"], 1), "pressure_bias_err_bar": round(b["pressure_bias_err_bar"], 1),
        "source": f"session{session}/errors.json, pressure_bias.json"
                  + (", density.json" if density else "") + (", fisher_table.csv" if label in fisher else ""),
    }
    _replace_summary_row(example / "results" / "models_summary.csv", row)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--session", type=int, required=True, help="the session whose report keeps the runs")
    p.add_argument("--work", type=Path, default=HERE / "work", help="the queue's work directory")
    p.add_argument("--md-ps", type=float, default=20.0, help="the NPT length asked for (ps): shorter runs are not kept")
    p.add_argument("--skip-ps", type=float, default=10.0, help="equilibration left out of the averages (ps)")
    p.add_argument("--window", type=int, default=200000, help="the last updates whose validations late_spread.json sums up")
    args = p.parse_args(argv)
    for run in args.runs:
        row = keep_run(run, args.session, HERE, args.work, args.md_ps, args.skip_ps, window=args.window)
        print(", ".join(f"{k}={v}" for k, v in row.items() if k != "source"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
