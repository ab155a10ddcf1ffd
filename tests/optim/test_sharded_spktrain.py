"""The sharded EKF under Lightning DDP through ``spktrain`` (2 CPU processes, gloo, one thread each).

``trainer=ddp_cpu_split``: both processes train on the same structure per update, share its force rows and
the filter. The run must equal a 1-process run of the same order of frames (bitwise float32 weights here,
P to 1e-10), keep both processes' weights identical (the task's check after each epoch), write full P
blocks into its checkpoints, and a 2-process checkpoint must resume in 1 process to the same end point.
"""

from __future__ import annotations

import csv

import pytest
import torch

from tests.helpers import REPO, run_cli


def _spktrain(tmp_path, src, run_id, epochs, devices, extra=()):
    args = [
        "spktrain", "experiment=water_bpnn_ekf", f"data.source={src}", "data.max_frames=10",
        f"data.datapath={tmp_path}/water10.db", f"trainer.max_epochs={epochs}", f"run.path={tmp_path}/runs",
        f"run.id={run_id}", "logger=csv", "+trainer.enable_progress_bar=false", "+seed=0", "trainer=ddp_cpu_split",
        f"trainer.devices={devices}", "callbacks.latest_checkpoint.every_n_train_steps=4",
        "task.updates_per_step=4", *extra,  # 8 training frames: 2 steps of 4 updates per epoch
    ]
    res = run_cli(args, cwd=REPO, timeout=600, env_extra={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    return tmp_path / "runs" / run_id


def _last(run):
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    return ck["state_dict"], ck["optimizer_states"][0]["state"]["ekf"], ck["global_step"]


def _same(a, b, atol_w=1e-6):
    (wa, sa, na), (wb, sb, nb) = a, b
    assert na == nb
    for k in wa:
        if wa[k].dtype.is_floating_point:
            torch.testing.assert_close(wa[k].double(), wb[k].double(), rtol=0, atol=atol_w, msg=k)
    torch.testing.assert_close(sa["P"][0], sb["P"][0], rtol=0, atol=1e-10)
    assert sa["step"] == sb["step"]


@pytest.mark.slow
def test_spktrain_two_processes_share_one_filter_and_equal_one_process(tmp_path, shared_data):
    src = shared_data("revpbe0-d3-cheng2019", "dataset_1400_au.extxyz")
    two = _spktrain(tmp_path, src, "two", epochs=2, devices=2)
    one = _spktrain(tmp_path, src, "one", epochs=1, devices=1)
    half = _spktrain(tmp_path, src, "half", epochs=1, devices=2)
    w2, s2, n2 = _last(two)
    assert n2 == 16 and s2["P"][0].shape == (2827, 2827), "8 updates per epoch, the full P in the checkpoint"
    assert torch.equal(s2["P"][0], s2["P"][0].T)
    rows = list(csv.DictReader(open(next(two.glob("csv/**/metrics.csv")))))
    assert [float(r["ekf_multistream_spread"]) for r in rows if r.get("ekf_multistream_spread")] == [0.0, 0.0]
    _same(_last(half), _last(one))  # 2 processes = 1 process, update by update
    # the 2-process checkpoint after epoch 1 resumes in 1 process and ends where the 2-process run ended
    resumed = _spktrain(tmp_path, src, "resumed", epochs=2, devices=1,
                        extra=[f"run.ckpt_path={half / 'checkpoints' / 'last.ckpt'}"])
    _same(_last(resumed), (w2, s2, n2))


@pytest.mark.slow
def test_spktrain_two_processes_with_threshold_selection_equal_one_process(tmp_path, shared_data):
    """The README's protocol (threshold selection of the force labels, one energy update in ten) on two processes:
    each evaluates the candidates of its share of the slots, the candidates' values are gathered, and the run
    equals a 1-process run (weights, P, the selection's running mean square)."""
    src = shared_data("revpbe0-d3-cheng2019", "dataset_1400_au.extxyz")
    protocol = ["task.energy_fraction=0.1", "task.force_selection=threshold"]
    two = _spktrain(tmp_path, src, "two_thr", epochs=1, devices=2, extra=protocol)
    # the reference evaluates every candidate itself (no label split: the path of a plain 1-process run)
    one = _spktrain(tmp_path, src, "one_thr", epochs=1, devices=1, extra=protocol + ["task.optimizer_args.label_split=false"])
    _same(_last(two), _last(one))
    from ekf_plugin.training.task import _SELECTION_KEY

    ms = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")[_SELECTION_KEY]
          ["mean_square"] for run in (two, one)]
    assert ms[0] is not None and ms[0] == pytest.approx(ms[1], rel=1e-12)
