"""spktrain trains the BPNN from our configs on a few revPBE0-D3 frames, and the loss falls."""

from __future__ import annotations

import csv
import textwrap

import pytest

from tests.helpers import SHARED_DATA, run_cli, shared_data_path

EXPERIMENT = """\
# @package _global_
defaults:
  - override /model: bpnn
  - override /data: water_revpbe0
globals:
  lr: 3e-3
data:
  max_frames: 4
  num_train: 2
  num_val: 1
  num_test: 1
trainer:
  max_epochs: 4
  accelerator: cpu
task:
  outputs:
    - _target_: schnetpack.task.ModelOutput
      name: energy
      loss_fn: {_target_: torch.nn.MSELoss}
      metrics: {mae: {_target_: torchmetrics.regression.MeanAbsoluteError}}
      loss_weight: 0.01
    - _target_: schnetpack.task.ModelOutput
      name: forces
      loss_fn: {_target_: torch.nn.MSELoss}
      metrics: {mae: {_target_: torchmetrics.regression.MeanAbsoluteError}}
      loss_weight: 0.99
"""


@pytest.mark.slow
def test_spktrain_bpnn_loss_falls(tmp_path):
    shared_data_path("revpbe0-d3-cheng2019", "dataset_1400_au.extxyz")
    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "bpnn_tiny.yaml").write_text(textwrap.dedent(EXPERIMENT))
    proc = run_cli(["spktrain", "experiment=bpnn_tiny", "logger=csv", "run.id=tiny", "data.num_workers=0",
                    "+seed=7"], env_extra={"EKF_PLUGIN_SHARED_DATA": str(SHARED_DATA), "PWD": str(tmp_path)},
                   cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "runs" / "tiny" / "csv" / "version_0" / "metrics.csv")))
    val = [float(r["val_forces_mae"]) for r in rows if r.get("val_forces_mae")]
    assert len(val) == 4 and min(val[1:]) < val[0]
    assert (tmp_path / "runs" / "tiny" / "best_model").exists()
    from ekf_plugin.models import load_model

    model = load_model(tmp_path / "runs" / "tiny" / "best_model")
    assert bool(model.representation.scaling_fitted)  # min/max fitted automatically by spktrain
    assert float(model.representation.scale_weight.abs().max()) != 1.0
