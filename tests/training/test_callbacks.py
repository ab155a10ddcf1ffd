"""WallClock: learning curves against wall-clock time, continued across a resume; ProgressBarEvery."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import outputs, toy_loaders, toy_model  # noqa: E402

from ekf_plugin.optim import EKF  # noqa: E402
from ekf_plugin.training import PaperScheduleTask  # noqa: E402
from ekf_plugin.training.callbacks import WallClock  # noqa: E402


def test_wall_clock_is_logged_at_validation_and_continues_after_a_resume(tmp_path):
    train, val = toy_loaders(tmp_path, n_frames=8)
    clock = WallClock(every_n_train_steps=2)
    seen = []

    class Spy(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append(float(trainer.callback_metrics["wall_time_s"]))

    task = PaperScheduleTask(toy_model(), outputs(), optimizer_cls=EKF, optimizer_args={"lr": 1.0})
    tr = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, inference_mode=False, callbacks=[clock, Spy()])
    t0 = time.perf_counter()
    tr.fit(task, train, val)
    wall = time.perf_counter() - t0
    assert len(seen) == 2 and 0 < seen[0] < seen[1] <= wall
    resumed = WallClock()
    resumed.load_state_dict(clock.state_dict())
    assert resumed.elapsed() >= seen[1], "a resumed run continues the clock"


def test_wall_clock_resumed_without_a_saved_clock_logs_nothing(tmp_path):
    """A checkpoint written without WallClock: the run continues, says so, and logs no wall_time_s (a clock
    restarted at zero would misplace the points); a clock saved as unknown stays unknown."""
    import pytest

    train, val = toy_loaders(tmp_path, n_frames=8)
    kw = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              inference_mode=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    task = PaperScheduleTask(toy_model(), outputs(), optimizer_cls=EKF, optimizer_args={"lr": 1.0})
    tr = pl.Trainer(max_epochs=1, **kw)
    tr.fit(task, train, val)
    ckpt = tmp_path / "no_clock.ckpt"
    tr.save_checkpoint(ckpt)
    clock, seen = WallClock(every_n_train_steps=1), []

    class Spy(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append("wall_time_s" in trainer.callback_metrics)

    task = PaperScheduleTask(toy_model(), outputs(), optimizer_cls=EKF, optimizer_args={"lr": 1.0})
    with pytest.warns(UserWarning, match="without a saved wall clock"):
        pl.Trainer(max_epochs=2, callbacks=[clock, Spy()], **kw).fit(task, train, val, ckpt_path=str(ckpt),
                                                                     weights_only=False)  # our own file
    assert clock.unknown and seen == [False]
    again = WallClock()
    again.load_state_dict(clock.state_dict())
    assert again.unknown


def test_progress_bar_every_redraws_every_n_batches_and_at_the_epoch_end(tmp_path):
    import pytorch_lightning as pl
    import torch

    from ekf_plugin.training.callbacks import ProgressBarEvery

    drawn = []

    class Bar(pl.callbacks.TQDMProgressBar):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            drawn.append(batch_idx + 1)
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return ((self.w - batch) ** 2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.ones(12, 1), batch_size=1)
    kw = dict(default_root_dir=str(tmp_path), max_epochs=2, logger=False, enable_checkpointing=False,
              enable_model_summary=False, accelerator="cpu")
    pl.Trainer(callbacks=[Bar(), ProgressBarEvery(5)], **kw).fit(Module(), data)
    assert drawn == [5, 10, 12] * 2
    drawn.clear()
    pl.Trainer(callbacks=[Bar(), ProgressBarEvery(1)], **kw).fit(Module(), data)
    assert drawn == list(range(1, 13)) * 2
    pl.Trainer(callbacks=[ProgressBarEvery(5)], enable_progress_bar=False, **kw).fit(Module(), data)  # no bar: no effect


class _Worsening(pl.LightningModule):
    """A linear model whose logged ``val_loss`` grows every epoch (so a val_loss monitor never improves after
    epoch 0), with a callback-like counter of validations in its checkpoints."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", float(self.current_epoch), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _ValidationCounter(pl.Callback):
    """State added at validation (as the Fisher callback adds its history)."""

    def __init__(self):
        self.epochs = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.epochs.append(trainer.current_epoch)

    def state_dict(self):
        return {"epochs": list(self.epochs)}


def test_latest_checkpoint_holds_the_last_validation_even_when_val_loss_did_not_improve(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ekf_plugin.training.callbacks import LatestCheckpoint

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 2)), batch_size=2)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", save_top_k=1, save_last=True)
    latest = LatestCheckpoint(dirpath=tmp_path / "checkpoints", filename="last", every_n_train_steps=1000)
    counter = _ValidationCounter()
    tr = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=1, callbacks=[counter, best, latest])
    tr.fit(_Worsening(), data, data)
    assert counter.epochs == [0, 1, 2]
    mine = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert mine["epoch"] == 2 and mine["global_step"] == 9
    assert mine["callbacks"]["_ValidationCounter"]["epochs"] == [0, 1, 2], "saved after the last validation"
    # what this callback is for: the host's save_last copy stopped at the last improvement (epoch 0)
    host = torch.load(tmp_path / "best" / "last.ckpt", weights_only=False)
    assert host["global_step"] < mine["global_step"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    with pytest.raises(ValueError, match="takes no monitor"):
        LatestCheckpoint(monitor="val_loss")


def test_a_moved_run_resumes_with_its_best_checkpoint_and_scores(tmp_path):
    """A run directory moved elsewhere (workflow.sh pack, a copy to another machine) with its old place gone:
    the resumed run's checkpoint callbacks point at the moved files, with their scores, so that testing "best"
    after training (what spktrain does) reads the moved best checkpoint. Without relocation Lightning keeps the
    old absolute best path, and that test fails on a missing file."""
    import os
    import shutil

    from pytorch_lightning.callbacks import ModelCheckpoint

    from ekf_plugin.training.callbacks import LatestCheckpoint, relocate_checkpoint_state

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 2)), batch_size=2)

    class Testable(_Worsening):
        def test_step(self, batch, batch_idx):
            self.log("test_loss", self.layer(batch[0]).pow(2).mean(), batch_size=2)

    def trainer(run, epochs):
        best = ModelCheckpoint(dirpath=run / "checkpoints", monitor="val_loss", save_top_k=1, filename="{epoch}")
        latest = LatestCheckpoint(dirpath=run / "checkpoints", filename="last", every_n_train_steps=1000)
        return pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0, callbacks=[best, latest]), best

    old, new = tmp_path / "old" / "run", tmp_path / "new" / "run"
    tr, _ = trainer(old, 2)
    tr.fit(Testable(), data, data)
    shutil.copytree(old, new)
    shutil.rmtree(tmp_path / "old")
    tr, best = trainer(new, 3)
    tr.fit(Testable(), data, data, ckpt_path=str(new / "checkpoints" / "last.ckpt"))
    assert best.best_model_path == str(new / "checkpoints" / "epoch=0.ckpt")  # val_loss never improved after 0
    assert float(best.best_model_score) == 0.0, "the score came along: epoch 2 (val_loss 2) did not replace it"
    tr.test(Testable(), data, ckpt_path="best", weights_only=False)
    # the state function alone: only when every saved path has its file in the new place
    state = {"dirpath": "/gone/ckpts", "best_model_path": "/gone/ckpts/a.ckpt", "kth_best_model_path": "",
             "last_model_path": "", "best_k_models": {"/gone/ckpts/a.ckpt": torch.tensor(1.0)}}
    here = tmp_path / "here"
    here.mkdir()
    assert not relocate_checkpoint_state(dict(state), str(here))  # a.ckpt is not there
    (here / "a.ckpt").touch()
    moved = dict(state)
    assert relocate_checkpoint_state(moved, str(here))
    assert moved["best_model_path"] == os.path.join(here, "a.ckpt") and moved["dirpath"] == str(here)
    assert list(moved["best_k_models"]) == [os.path.join(here, "a.ckpt")] and moved["kth_best_model_path"] == ""
    assert not relocate_checkpoint_state(moved, str(here)), "already in place"


class _WithModel(pl.LightningModule):
    """SchNetPack's EMA callback averages ``pl_module.model``'s parameters: a linear ``model`` trained with SGD on
    batches whose order matters (so a wrong resume shows in the weights); records the weights each update starts
    from."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Linear(2, 1)
        self.start_weights: list = []

    def training_step(self, batch, batch_idx):
        self.start_weights.append(torch.cat([p.detach().reshape(-1).clone() for p in self.model.parameters()]))
        x = batch.reshape(-1, 1).repeat(1, 2) * torch.tensor([1.0, -0.5])
        return (self.model(x) - batch.reshape(-1, 1).sin()).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(batch.reshape(-1, 1).repeat(1, 2)).pow(2).mean(), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02)


def _ema_trainer(path, ema: bool = True, guard: bool = True, **kw):
    from schnetpack.train import ExponentialMovingAverage

    from ekf_plugin.training.callbacks import EMAGuard

    cbs = ([ExponentialMovingAverage(decay=0.9)] if ema else []) + ([EMAGuard()] if ema and guard else [])
    return pl.Trainer(default_root_dir=str(path), accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=cbs + kw.pop("callbacks", []), **kw)


def test_ema_guard_trains_on_the_training_weights_after_a_validation_inside_an_epoch(tmp_path):
    """The EMA only averages: with EMAGuard every update starts from the weights of a run without any EMA, also
    after validations inside an epoch (every 2 of 5 batches) and at an epoch start after an epoch end without a
    validation; SchNetPack's callback alone starts the updates after such a validation from the averages."""
    from test_resumable_loader import _Data

    runs = {}
    for name, ema, guard in (("plain", False, False), ("guarded", True, True), ("host", True, False)):
        runs[name] = _WithModel()
        _ema_trainer(tmp_path / name, ema, guard, max_epochs=2, val_check_interval=2).fit(runs[name], datamodule=_Data())
    assert len(runs["plain"].start_weights) == 10
    assert all(torch.equal(a, b) for a, b in zip(runs["plain"].start_weights, runs["guarded"].start_weights))
    # the host's callback alone: the update after the first validation (after batch 2 of epoch 0) starts from the
    # averages, and the first update of epoch 1 from the weights kept at the last validation (update 5 undone)
    host = runs["host"].start_weights
    assert torch.equal(runs["plain"].start_weights[1], host[1]) and not torch.equal(runs["plain"].start_weights[2], host[2])


@pytest.mark.parametrize("stop", ["step", "validation_in_epoch", "validation_at_epoch_end"])
@pytest.mark.parametrize("guard", [True, False])
def test_ema_guard_resumes_from_the_training_weights(tmp_path, stop, guard):
    """With SchNetPack's ExponentialMovingAverage callback, a run resumed from a checkpoint written inside an epoch
    (the model holds the training weights) or at a validation (it holds the averages, the training weights are set
    aside) ends with the uninterrupted run's weights and averages when EMAGuard is there; without it the resumed
    run trains on from the averages and ends elsewhere (this test's check that the cases are real ones)."""
    from schnetpack.train import ExponentialMovingAverage
    from test_resumable_loader import _Data

    every = dict(val_check_interval=3) if stop == "validation_in_epoch" else {}
    full = _WithModel()
    _ema_trainer(tmp_path / "full", guard=guard, max_epochs=3, **every).fit(full, datamodule=_Data())  # 5 steps/epoch
    if stop == "step":  # inside epoch 1
        first = dict(max_steps=7, callbacks=[pl.callbacks.ModelCheckpoint(
            dirpath=str(tmp_path / "c"), filename="last", every_n_train_steps=1, enable_version_counter=False)])
    else:  # at the validation after update 8 (inside epoch 1), or at the one ending epoch 0
        first = dict(max_steps=8, **every) if stop == "validation_in_epoch" else dict(max_epochs=1)
        from ekf_plugin.training.callbacks import LatestCheckpoint

        first["callbacks"] = [LatestCheckpoint(dirpath=str(tmp_path / "c"), filename="last", every_n_train_steps=1000)]
    _ema_trainer(tmp_path / "part", guard=guard, **first).fit(_WithModel(), datamodule=_Data())
    ckpt = torch.load(tmp_path / "c" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == {"step": 7, "validation_in_epoch": 8, "validation_at_epoch_end": 5}[stop]
    if guard:
        assert ckpt["callbacks"]["EMAGuard"]["swapped"] is (stop != "step")
    resumed = _WithModel()
    tr = _ema_trainer(tmp_path / "resumed", guard=guard, max_epochs=3, **every)
    tr.fit(resumed, datamodule=_Data(), ckpt_path=str(tmp_path / "c" / "last.ckpt"), weights_only=False)
    same = all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))
    if guard:
        assert same, "EMAGuard: the uninterrupted run's weights"
        ema_full = next(c for c in full.trainer.callbacks if isinstance(c, ExponentialMovingAverage)).ema
        ema_res = next(c for c in tr.callbacks if isinstance(c, ExponentialMovingAverage)).ema
        assert all(torch.equal(a, b) for a, b in zip(ema_full.shadow_params, ema_res.shadow_params))
    elif stop != "validation_in_epoch":  # (there the host's run itself trains on from the averages)
        assert not same, "SchNetPack's callback alone: the resumed run ends elsewhere"
