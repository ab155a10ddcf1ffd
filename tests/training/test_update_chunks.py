"""Several updates per Lightning training step (task.updates_per_step): the same updates, bitwise, as one per step;
max_steps counts updates and a step checkpoint resumes exactly; k shrinks to divide the epoch and the step intervals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import schnetpack as spk
import schnetpack.transform as trn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import CUTOFF, outputs, toy_model, write_copper_database  # noqa: E402

from ekf_plugin.data import atoms_collate  # noqa: E402
from ekf_plugin.optim import EKF  # noqa: E402
from ekf_plugin.training import PaperScheduleTask  # noqa: E402
from ekf_plugin.training.update_chunks import UpdateChunks, fitting_updates_per_step  # noqa: E402


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return write_copper_database(tmp_path_factory.mktemp("cu") / "cu.db", n_frames=11)


def _datamodule(db, tmp):
    dm = spk.data.AtomsDataModule(str(db), batch_size=1, num_train=8, num_val=2, num_workers=0,
                                  split_file=str(Path(db).with_suffix(".split.npz")),
                                  transforms=[trn.ASENeighborList(cutoff=CUTOFF), trn.CastTo32()])
    return dm


def _task(k, seed=3, adam=False):
    if adam:  # the Adam baseline's manual step, same schedule
        return PaperScheduleTask(toy_model(), outputs(), optimizer_cls=torch.optim.Adam, optimizer_args={"lr": 1e-3},
                                 seed=seed, updates_per_step=k, clip_grad_norm=0.01)
    return PaperScheduleTask(toy_model(), outputs(), optimizer_cls=EKF, optimizer_args={"lr": 0.5, "q": 1e-6},
                             seed=seed, updates_per_step=k)


def _fit(db, tmp, k, ckpt_path=None, seed=3, callbacks=(), adam=False, **kw):
    task = _task(k, seed, adam)
    trainer = pl.Trainer(logger=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         inference_mode=False, default_root_dir=str(tmp), **kw)
    trainer.fit(task, datamodule=_datamodule(db, tmp), ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
    return task, trainer


def _state(task, trainer):
    opt = trainer.optimizers[0]
    return ([p.detach().clone() for p in task.model.parameters()],
            opt.covariance() if isinstance(opt, EKF) else torch.cat([s["exp_avg_sq"].reshape(-1) for s in opt.state.values()]),
            task.label_rng.get_state(), int(trainer.global_step))


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3] == b[3]


def test_update_chunks_collates_each_update_on_its_own():
    items = [{"x": torch.tensor([float(i)])} for i in range(5)]
    out = UpdateChunks(lambda b: torch.cat([d["x"] for d in b]), per_update=2)(items)
    assert [t.tolist() for t in out] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    with pytest.raises(ValueError):
        UpdateChunks(atoms_collate, 0)


def test_the_updates_per_step_divide_the_epoch_and_the_step_intervals():
    assert fitting_updates_per_step(10, 1120, [1000, 100]) == 10  # the water runs: 1120 training frames
    assert fitting_updates_per_step(10, 1125, [1000]) == 5
    assert fitting_updates_per_step(10, 1123, [1000]) == 1  # an epoch of a prime count: one update per step
    assert fitting_updates_per_step(4, 8, [6]) == 2 and fitting_updates_per_step(4, 9, []) == 3


@pytest.mark.parametrize("adam", [False, True])
def test_k_updates_per_step_are_the_updates_of_one_per_step(db, tmp_path, adam):
    """8 training frames, 4 updates per step, 2 epochs: weights, P (Adam: its second moments), label RNG and update
    count bitwise those of one update per step."""
    one_task, one = _fit(db, tmp_path / "one", 1, max_epochs=2, adam=adam)
    four_task, four = _fit(db, tmp_path / "four", 4, max_epochs=2, adam=adam)
    assert one.global_step == 16 and four.num_training_batches == 2 and four_task._steps_k() == 4
    _assert_same(_state(one_task, one), _state(four_task, four))


def test_max_steps_counts_updates_and_a_step_checkpoint_resumes_exactly(db, tmp_path):
    """max_steps stops inside a step (14 = 2 steps of 4 in each of epochs 0 and 1, then 2 of epoch 2's first step);
    a checkpoint every 4 updates, written inside epoch 0 (after 4 of its 8 frames), resumes to the same weights, P
    and RNG."""
    # both runs write the step checkpoints (reading P for one applies the EKF's deferred rows: the same round-off)
    every4 = lambda d: ModelCheckpoint(dirpath=str(tmp_path / d), filename="step", every_n_train_steps=4)  # noqa: E731
    full_task, full = _fit(db, tmp_path / "full", 4, max_steps=14, callbacks=[every4("f")])
    assert full.global_step == 14
    part_task, part = _fit(db, tmp_path / "part", 4, max_steps=4, callbacks=[every4("c")])
    saved = torch.load(tmp_path / "c" / "step.ckpt", weights_only=False)
    assert saved["global_step"] == 4
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["start"]) == (0, 4)  # one step of four frames
    resumed_task, resumed = _fit(db, tmp_path / "resumed", 4, ckpt_path=str(tmp_path / "c" / "step.ckpt"), seed=99,
                                 max_steps=14, callbacks=[every4("r")])
    _assert_same(_state(full_task, full), _state(resumed_task, resumed))


def test_a_step_interval_that_k_does_not_divide_makes_the_steps_smaller(db, tmp_path):
    """Checkpoints every 6 updates with 4 per step would be skipped (the counter jumps past 6): 2 per step here,
    and the checkpoint is written at update 6."""
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "c"), filename="step", every_n_train_steps=6)
    with pytest.warns(RuntimeWarning, match="2 here"):
        task, trainer = _fit(db, tmp_path, 4, max_steps=7, callbacks=[ckpt])
    assert task._steps_k() == 2 and trainer.global_step == 7
    assert torch.load(tmp_path / "c" / "step.ckpt", weights_only=False)["global_step"] == 6


def test_a_checkpoint_inside_an_epoch_resumes_only_with_its_updates_per_step(db, tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "c"), filename="step", every_n_train_steps=4)
    _fit(db, tmp_path / "part", 4, max_steps=4, callbacks=[ckpt])
    with pytest.raises(ValueError, match="updates_per_step=4"):
        _fit(db, tmp_path / "other", 1, ckpt_path=str(tmp_path / "c" / "step.ckpt"), max_steps=14)
    loaded = PaperScheduleTask.load_from_checkpoint(str(tmp_path / "c" / "step.ckpt"), weights_only=False)
    assert loaded.updates_per_step == 4  # loading the model is not resuming: no check

