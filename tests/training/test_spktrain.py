"""`spktrain experiment=water_bpnn_ekf` end to end on a few revPBE0-D3 frames (real data, real SchNetPack CLI)."""

from __future__ import annotations

import csv
import math

import pytest

from tests.helpers import REPO, run_cli


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["water_bpnn_ekf"])
def test_spktrain_water_bpnn_experiment_trains(tmp_path, shared_data, experiment):
    src = shared_data("revpbe0-d3-cheng2019", "dataset_1400_au.extxyz")
    args = [
        "spktrain", f"experiment={experiment}", f"data.source={src}", "data.max_frames=5",
        f"data.datapath={tmp_path}/water5.db", "trainer.max_epochs=1", f"run.path={tmp_path}/runs", "run.id=t",
        "logger=csv", "+trainer.enable_progress_bar=false",
    ]
    res = run_cli(args, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "runs" / "t"
    assert (run / "best_model").exists()
    rows = list(csv.DictReader(open(next(run.glob("csv/**/metrics.csv")))))
    val = [r for r in rows if r.get("val_forces_rmse_all")]
    assert len(val) == 1, "one validation per epoch"
    for r in val:
        assert math.isfinite(float(r["val_forces_rmse_all"])) and math.isfinite(float(r["val_energy_per_atom_rmse"]))
    assert max(float(r["step"]) for r in rows if r.get("val_loss")) >= 3  # 4 training frames: 4 updates
