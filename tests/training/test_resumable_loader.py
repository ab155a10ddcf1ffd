"""The training loader resumes inside an epoch exactly: a run stopped and resumed from a checkpoint trains on the same
items in the same order as an uninterrupted run (checkpoints written at a step, at a validation, at an epoch end)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from ekf_plugin.training.resumable_loader import EpochPermutation, resumable_loader, trainer_progress


class _Items(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i)])


class _Recorder(pl.LightningModule):
    """Records every training batch; its one weight moves with each batch, so a wrong order changes it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(int(v) for v in batch.reshape(-1))
        return ((self.w - batch.mean()) ** 2).sum() * (1 + batch.sum() % 3)  # order-dependent updates

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", ((self.w - batch.mean()) ** 2).sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Data(pl.LightningDataModule):
    def __init__(self, n: int = 10, batch_size: int = 2, seed: int = 7) -> None:
        super().__init__()
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._train = None

    def train_dataloader(self):
        if self._train is None:
            self._train = resumable_loader(_Items(self.n), self.batch_size, self.seed,
                                           lambda: trainer_progress(self.trainer), loader_cls=torch.utils.data.DataLoader)
        return self._train

    def val_dataloader(self):
        return torch.utils.data.DataLoader(_Items(4), batch_size=2)


def _trainer(path, **kw):
    return pl.Trainer(default_root_dir=str(path), accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    a, b = EpochPermutation(50, seed=3), EpochPermutation(50, seed=3)
    assert list(a) == list(b) == a.order(0).tolist()
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == list(range(50))
    a.set_position(1, 20)
    assert list(a) == a.order(1).tolist()[20:] and len(a) == 50
    with pytest.raises(ValueError):
        a.set_position(0, 51)


@pytest.mark.parametrize("stop", ["step", "validation", "epoch_end"])
def test_resumed_run_trains_on_the_uninterrupted_runs_order(tmp_path, stop):
    full = _Recorder()
    _trainer(tmp_path / "full", max_epochs=3, val_check_interval=3).fit(full, datamodule=_Data())
    assert len(full.seen) == 30 and sorted(full.seen[:10]) == list(range(10)) and full.seen[:10] != full.seen[10:20]

    if stop == "step":  # a step checkpoint inside epoch 1 (as the latest_checkpoint callback writes)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "c"), filename="last", every_n_train_steps=7)
        first = dict(max_steps=7)
    elif stop == "validation":  # the checkpoint of a validation inside epoch 1
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "c"), filename="last", monitor="val_loss", mode="max")
        first = dict(max_steps=9)
    else:
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "c"), filename="last", save_on_train_epoch_end=True)
        first = dict(max_epochs=1)
    part = _Recorder()
    _trainer(tmp_path / "part", val_check_interval=3, callbacks=[ckpt], **first).fit(part, datamodule=_Data())
    done = torch.load(tmp_path / "c" / "last.ckpt", weights_only=False)["global_step"]
    resumed = _Recorder()
    _trainer(tmp_path / "resumed", max_epochs=3, val_check_interval=3).fit(
        resumed, datamodule=_Data(), ckpt_path=str(tmp_path / "c" / "last.ckpt"), weights_only=False)
    assert part.seen[: 2 * done] + resumed.seen == full.seen
    assert torch.equal(resumed.w, full.w)


def test_a_checkpoint_of_another_training_set_is_refused(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "c"), filename="last", every_n_train_steps=2)
    _trainer(tmp_path / "a", max_steps=2, callbacks=[ckpt]).fit(_Recorder(), datamodule=_Data(n=10))
    with pytest.raises(ValueError, match="not the same training set"):
        _trainer(tmp_path / "b", max_epochs=1).fit(_Recorder(), datamodule=_Data(n=12),
                                                  ckpt_path=str(tmp_path / "c" / "last.ckpt"), weights_only=False)


def test_install_resumable_order_replaces_only_schnetpacks_plain_shuffled_loader(tmp_path):
    """What PaperScheduleTask does to the datamodule of any SchNetPack experiment: its RandomSampler loader (built in
    setup when a transform reads statistics, or not built yet) becomes the resumable one, with its batch size;
    a datamodule with its own train sampler, a loader already resumable, and a distributed strategy are left alone."""
    import sys

    import schnetpack as spk

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from _toy import write_copper_database

    from ekf_plugin.training.resumable_loader import install_resumable_order

    db = write_copper_database(tmp_path / "cu.db", n_frames=6)

    def datamodule(**kw):
        dm = spk.data.AtomsDataModule(str(db), batch_size=2, num_train=4, num_val=2, num_workers=0,
                                      split_file=str(tmp_path / "split.npz"), **kw)
        dm.setup()
        return dm

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    dm = datamodule()
    host = dm.train_dataloader()  # SchNetPack's own: shuffled by a RandomSampler
    assert isinstance(host.sampler, torch.utils.data.RandomSampler)
    assert install_resumable_order(dm, trainer, seed=5)
    mine = dm.train_dataloader()
    assert isinstance(mine.sampler, EpochPermutation) and mine.sampler.seed == 5 and mine.batch_size == 2
    assert sorted(i for b in mine for i in b["_idx"].tolist()) == sorted(int(i) for i in dm.train_idx)
    assert callable(mine.state_dict) and not install_resumable_order(dm, trainer, seed=5)  # already resumable
    fresh = datamodule()  # loader not built yet: installed before SchNetPack builds its own
    assert install_resumable_order(fresh, trainer, seed=1) and isinstance(fresh.train_dataloader().sampler, EpochPermutation)
    own = datamodule(train_sampler_cls=spk.data.StratifiedSampler, train_sampler_args={
        "partition_criterion": spk.data.PropertyCriterion(property_key="energy"), "num_bins": 2, "replacement": True})
    assert not install_resumable_order(own, trainer, seed=1)
    ddp = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False)
    assert not install_resumable_order(datamodule(), ddp, seed=1)
    assert not install_resumable_order(object(), trainer, seed=1)  # not an AtomsDataModule
