"""examples/water_revpbe0/keep.py: a finished queue run kept for the session's report (model moved, results merged
under the summary's labels, the NPT part only for a finished NPT run, a second call replaces and adds nothing)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "water_revpbe0"
sys.path.insert(0, str(EXAMPLE))
import analyze  # noqa: E402
import keep  # noqa: E402

RUN = "ekf_lr1e-3_s2_ef0.1_thr"
NPT = EXAMPLE / "results" / "session18" / f"{RUN}_500k" / "npt.out"  # a committed 20 ps i-PI properties file


def _queue_leftovers(tmp_path: Path, npt_ps: float):
    """What `workflow.sh train` with THEN="evaluate md" leaves: the evaluated model, its errors, its run directory
    (validation curves, split) and an NPT run of ``npt_ps`` picoseconds; a database of 4 real frames at different volumes."""
    from ekf_plugin.data import frames_to_db, read_frames
    from tests.helpers import shared_data_path

    example, work = tmp_path / "example", tmp_path / "work"
    (example / "models").mkdir(parents=True)
    shutil.copyfile(EXAMPLE / "models" / "ekf_lr1e-3_s0.pt", example / "models" / f"{RUN}.pt")
    (example / "results").mkdir()
    with open(example / "results" / "models_summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=analyze.SUMMARY_FIELDS)
        w.writeheader()
        w.writerow({k: "x" for k in analyze.SUMMARY_FIELDS} | {"label": "s1_other"})
    (work / "data").mkdir(parents=True)
    frames = read_frames(shared_data_path("revpbe0-d3-cheng2019", "dataset_1400_au.extxyz"), max_frames=80)
    frames = sorted(frames, key=lambda a: a.get_volume())[::26]  # 4 frames, 1915–2366 Å³: a volume trend to fit
    frames_to_db(frames, work / "data" / "water.db")
    run_dir = work / "runs" / RUN
    (run_dir / "csv" / "version_0").mkdir(parents=True)
    np.savez(run_dir / "split.npz", train_idx=np.array([0]), val_idx=np.array([1, 2, 3]))
    (run_dir / "csv" / "version_0" / "metrics.csv").write_text(
        "epoch,step,val_energy_per_atom_rmse,val_forces_rmse,wall_time_s\n0,4999,0.002,0.110,100\n0,9999,0.0015,0.105,200\n")
    errors = {"frames": 3, "energy_rmse_meV_per_atom": 2.4749, "forces_rmse_meV_per_A": 118.1341, "updates": 500000,
              "split": "val"}
    (work / f"errors_{RUN}.json").write_text(json.dumps({RUN: errors}))
    (work / f"md_{RUN}").mkdir()
    lines = NPT.read_text().splitlines()
    keep_lines = [ln for ln in lines if ln.startswith("#") or float(ln.split()[1]) <= npt_ps]
    (work / f"md_{RUN}" / "npt.out").write_text("\n".join(keep_lines) + "\n")
    sha = hashlib.sha256((example / "models" / f"{RUN}.pt").read_bytes()).hexdigest()[:16]  # as run.sh records it
    (work / f"md_{RUN}" / "run.args").write_text(f"model={example}/models/{RUN}.pt sha256={sha} steps=40000 input=x\n")
    return example, work, errors


def test_a_finished_run_is_kept_under_the_summary_labels(tmp_path):
    example, work, errors = _queue_leftovers(tmp_path, npt_ps=20.0)
    res = example / "results" / "session18"
    res.mkdir()
    (res / "errors.json").write_text(json.dumps({"earlier_model_659k": {"frames": 280}}))  # kept before: stays
    (res / "fisher_table.csv").write_text(f"model,log10_median\ns18_{RUN}_500k,-3.04652\n")
    row = keep.keep_run(RUN, 18, example, work)

    tag, label = f"{RUN}_500k", f"s18_{RUN}_500k"
    assert not (example / "models" / f"{RUN}.pt").exists()  # the queue's copy is gone, the kept one loads
    assert (example / "models" / "session18" / f"{tag}.pt").read_bytes() == (EXAMPLE / "models" / "ekf_lr1e-3_s0.pt").read_bytes()
    assert json.loads((res / "errors.json").read_text()) == {"earlier_model_659k": {"frames": 280}, tag: errors}
    bias = json.loads((res / "pressure_bias.json").read_text())[label]
    assert bias["frames"] == 3 and len(bias["energy_error_meV_per_atom"]) == 3
    density = json.loads((res / "density.json").read_text())[tag]
    p = analyze.read_ipi_properties(NPT)
    assert density["density_mean"] == pytest.approx(analyze.block_average(p["density"][p["time"] >= 10.0])[0], abs=1e-12)
    assert not (res / "goo.json").exists()  # no trajectory beside this npt.out
    assert (res / tag / "npt.out").read_text() == NPT.read_text()
    curves = list(csv.DictReader(open(res / tag / "validation_curves.csv")))
    assert [(c["step"], c["val_forces_rmse_eV_per_A"]) for c in curves] == [("4999", "0.11"), ("9999", "0.105")]
    assert (row["optimizer"], row["eta"], row["protocol"], row["updates"]) == ("EKF", "1e-3", "ef 0.1, threshold", 500000)
    assert (row["energy_rmse_meV_per_atom"], row["forces_rmse_meV_per_A"], row["fisher_log10_median"]) == (2.475, 118.13, -3.047)
    assert row["density_g_per_mL"] == round(density["density_mean"], 4) and row["md_ps"] == 20.0
    assert row["pressure_bias_bar"] == round(bias["pressure_bias_bar"], 1)
    spread = json.loads((res / "late_spread.json").read_text())  # the last validations of the run's own log
    forces = spread[RUN]["forces_meV_per_A"]
    assert (forces["validations"], forces["first_update"], forces["last_update"]) == (2, 4999, 9999)
    assert (forces["median"], forces["std"]) == (pytest.approx(107.5), pytest.approx(2.5))
    assert spread[RUN]["energy_meV_per_atom"]["median"] == pytest.approx(1.75)

    again = keep.keep_run(RUN, 18, example, work)  # the model already kept: the same row, not a second one
    assert again == row
    labels = [r["label"] for r in csv.DictReader(open(example / "results" / "models_summary.csv"))]
    assert labels == ["s1_other", label]


def test_an_unfinished_npt_run_is_not_kept(tmp_path, capsys):
    example, work, _ = _queue_leftovers(tmp_path, npt_ps=5.0)
    row = keep.keep_run(RUN, 18, example, work)
    assert row["density_g_per_mL"] == "" and row["md_planned_ps"] == "" and row["fisher_log10_median"] == ""
    assert not (example / "results" / "session18" / "density.json").exists()
    assert "NPT not kept (5.00 of 20.0 ps" in capsys.readouterr().out
    assert analyze.md_outcome({k: str(v) for k, v in row.items()}) == "no MD"


def test_an_npt_run_of_another_model_at_the_same_path_is_not_kept(tmp_path, capsys):
    """The queue's models/<run>.pt is overwritten when a run is trained further: an NPT run whose run.args
    records another model's checksum is not filed as this model's density."""
    example, work, _ = _queue_leftovers(tmp_path, npt_ps=20.0)
    args = work / f"md_{RUN}" / "run.args"
    args.write_text(args.read_text().replace("sha256=", "sha256=0"))
    row = keep.keep_run(RUN, 18, example, work)
    assert row["density_g_per_mL"] == "" and not (example / "results" / "session18" / "density.json").exists()
    assert "NPT not kept" in capsys.readouterr().out
    assert analyze.npt_ran_model(args.parent, example / "models" / "session18" / f"{RUN}_500k.pt") is False
    args.unlink()  # runs before the checksum: kept, with a line that says it was not checked
    assert analyze.npt_ran_model(args.parent, example / "models" / "session18" / f"{RUN}_500k.pt") is None
    assert keep.keep_run(RUN, 18, example, work)["density_g_per_mL"] != ""
    assert "not checked" in capsys.readouterr().out


def test_errors_of_fewer_than_all_validation_frames_are_refused(tmp_path):
    example, work, errors = _queue_leftovers(tmp_path, npt_ps=20.0)
    (work / f"errors_{RUN}.json").write_text(json.dumps({RUN: errors | {"frames": 2}}))
    with pytest.raises(SystemExit, match="not the run's 3 validation frames"):
        keep.keep_run(RUN, 18, example, work)
    assert (example / "models" / f"{RUN}.pt").exists()  # nothing moved
