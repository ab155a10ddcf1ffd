"""The README quick start, ``ekf-plugin demo``, through the real command path (spktrain in a subprocess),
on a reduced data set; and a second ``demo`` in the same folder resumes from the kept latest state."""

from __future__ import annotations

import csv

import pytest
import torch

from tests.helpers import run_cli

SMALL = ["--frames", "30", "data.num_train=20", "data.num_val=5", "data.num_test=5",
         "callbacks.fisher_spectrum.n_labels=30", "logger=csv", "+trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_quickstart_demo_trains_and_a_rerun_resumes(tmp_path):
    work = tmp_path / "demo"
    first = run_cli(["ekf-plugin", "demo", "--workdir", str(work), "--epochs", "1", *SMALL], cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    run = work / "runs" / "ekf"
    assert f"[demo] done. Results in {run}" in first.stdout
    from ekf_plugin.models import load_model

    model = load_model(run / "best_model")  # no trust_pickle needed: the allow-list covers spktrain's file
    assert bool(model.representation.scaling_fitted)
    assert sorted(p.name for p in (run / "fisher").glob("epoch_*.npz")) == ["epoch_0000.npz"]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["global_step"] == 20, "the latest state is kept (every 10 updates), not only the best"

    second = run_cli(["ekf-plugin", "demo", "--workdir", str(work), "--epochs", "2", *SMALL], cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "Resuming from checkpoint" in log and "Restored all states from the checkpoint" in log
    rows = list(csv.DictReader(open(run / "csv" / "version_1" / "metrics.csv")))
    assert {r["epoch"] for r in rows if r.get("val_loss")} == {"1"}, "the rerun trains epoch 1 only, not 0 again"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["global_step"] == 40
