"""FisherSpectrumCallback: arguments, state, monitor checks, and real spktrain runs (selection + resume)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from ekf_plugin.fisher import FisherSpectrum, FisherSpectrumCallback, LabelSet, metric_names
from tests.fisher._tiny import write_experiment
from tests.helpers import run_cli


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_labels": 0}, "n_labels must be a positive integer"),
        ({"n_labels": -3}, "n_labels must be a positive integer"),
        ({"kind": "virial"}, "kind must be one of"),
        ({"every_n_epochs": 0}, "every_n_epochs must be a positive integer"),
        ({"energy_fraction": 1.0}, "energy_fraction must lie strictly between 0 and 1"),
        ({"method": "lanczos"}, "method must be one of"),
        ({"prefix": ""}, "prefix must be a non-empty string"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FisherSpectrumCallback(**kwargs)


def test_unknown_monitor_key_is_rejected_with_the_available_keys(tmp_path):
    cb = FisherSpectrumCallback(kind="forces", dirpath=str(tmp_path))
    for bad in (ModelCheckpoint(monitor="fisher/log10_medain", mode="max"),
                EarlyStopping(monitor="fisher/energy/log10_median", mode="max")):  # kind=forces logs no energy keys
        trainer = pl.Trainer(callbacks=[cb, bad], logger=False, enable_progress_bar=False, accelerator="cpu")
        with pytest.raises(ValueError, match="logs no such key. Available: .*fisher/forces/log10_median"):
            cb.setup(trainer, None, "fit")
    ok = pl.Trainer(callbacks=[cb, ModelCheckpoint(monitor="fisher/forces/effective_rank", mode="max")],
                    logger=False, enable_progress_bar=False, accelerator="cpu")
    cb.setup(ok, None, "fit")


def test_metric_names_are_stable():
    names = metric_names("fisher", "both")
    assert "fisher/log10_median" in names and "fisher/energy/log10_max" in names
    assert "fisher/forces/effective_rank" in names and "fisher/epoch" in names
    assert not any(n.startswith("fisher/forces") for n in metric_names("fisher", "energy"))


def test_sanity_check_pass_is_skipped():
    cb = FisherSpectrumCallback()
    trainer = SimpleNamespace(sanity_checking=True, current_epoch=0)
    cb.on_validation_epoch_end(trainer, None)  # would fail on pl_module=None if it did any work
    assert cb.labels is None and cb.last_epoch == -1 and cb.history == []


def test_state_dict_round_trip():
    cb = FisherSpectrumCallback(seed=3)
    cb.labels = LabelSet([4, 1, 1], [-1, 0, 7])
    cb.last_metrics = {"fisher/log10_median": -2.5}
    cb.last_epoch, cb.history = 6, [{"epoch": 6, "fisher/log10_median": -2.5}]
    other = FisherSpectrumCallback(seed=99)
    with pytest.warns(UserWarning, match="keeping the checkpoint's labels"):
        other.load_state_dict(torch.load(_save(cb.state_dict()), weights_only=True))
    assert other.labels.state() == cb.labels.state()
    assert (other.last_epoch, other.last_metrics, other.history) == (6, cb.last_metrics, cb.history)
    assert cb.state_key == "FisherSpectrumCallback{'prefix': 'fisher'}"


def _save(obj):
    """A torch.save/torch.load round trip, as in a checkpoint."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# --------------------------------------------------------------------- real spktrain runs
def _spktrain(root: Path, *overrides: str):
    res = run_cli(["spktrain", "experiment=fisher_tiny", "run.id=r", *overrides], cwd=root, timeout=300,
                  env_extra={"PWD": str(root)})  # spktrain finds ./configs through $PWD
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root / "runs" / "r"


def _metrics(run: Path):
    with open(run / "csv" / "version_0" / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _fisher_state(ckpt: Path):
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]
    return state[next(k for k in state if k.startswith("FisherSpectrumCallback"))]


@pytest.mark.slow
def test_spktrain_logs_fisher_keys_selects_a_checkpoint_and_resumes(tmp_path):
    write_experiment(tmp_path)
    # last.ckpt from latest_checkpoint (written after every validation), as docs/fisher.md says for resumable
    # runs: SchNetPack's save_last copy is written only when val_loss improved (Lightning >= 2.6)
    callbacks = ("callbacks=[checkpoint,latest_checkpoint,earlystopping,lrmonitor,ema,fisher_checkpoint]",
                 "callbacks.model_checkpoint.save_last=false", "callbacks.fisher_spectrum.n_labels=12")
    run = _spktrain(tmp_path, *callbacks, "trainer.max_epochs=2", "trainer.num_sanity_val_steps=1")
    rows = [r for r in _metrics(run) if r.get("fisher/log10_median")]
    assert len(rows) == 2, "one row of Fisher scalars per validation epoch (the sanity check logs none)"
    for key in metric_names("fisher", "both"):
        assert all(np.isfinite(float(r[key])) for r in rows), key
    for epoch in (0, 1):
        spec = FisherSpectrum.load(run / "fisher" / f"epoch_{epoch:04d}.npz")
        assert spec.n_labels == {"all": 12, "energy": 6, "forces": 6} and spec.meta["epoch"] == epoch
        assert (run / "fisher" / f"epoch_{epoch:04d}.png").stat().st_size > 1000
    assert float(rows[1]["fisher/log10_median"]) == pytest.approx(
        FisherSpectrum.load(run / "fisher" / "epoch_0001.npz").summary()["log10_median"], rel=1e-6)
    # the Fisher checkpoint: selected by fisher/log10_median (mode max), the default one kept
    best = [float(r["fisher/log10_median"]) for r in rows]
    fisher_ckpts = list((run / "checkpoints_fisher").glob("fisher-epoch=*.ckpt"))
    assert [p.name for p in fisher_ckpts] == [f"fisher-epoch={int(np.argmax(best)):02d}.ckpt"]
    assert (run / "best_model_fisher").exists() and (run / "best_model").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1

    # resume for one more epoch with another seed: the saved labels and history win
    first = _fisher_state(run / "checkpoints" / "last.ckpt")
    _spktrain(tmp_path, *callbacks, "callbacks.fisher_spectrum.seed=99", "trainer.max_epochs=3",
              f"run.ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    second = _fisher_state(run / "checkpoints" / "last.ckpt")
    assert second["labels"] == first["labels"]
    assert [h["epoch"] for h in second["history"]] == [0, 1, 2]
    assert second["history"][:2] == first["history"]
    with open(run / "fisher" / "history.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1, 2]


class _Recorder(FisherSpectrumCallback):
    """The callback with its spectrum computation replaced by a record of when it would run."""

    def _compute(self, trainer, pl_module, epoch):
        self.computed = getattr(self, "computed", []) + [epoch]
        self.last_metrics, self.last_epoch = {"fisher/log10_median": float(epoch)}, epoch


def test_cadence_and_keys_logged_at_every_validation_epoch():
    cb = _Recorder(every_n_epochs=3)
    logged = []
    module = SimpleNamespace(log=lambda name, value, **kw: logged.append((name, value)))
    for epoch in (1, 3, 5, 7, 9, 11):  # e.g. check_val_every_n_epoch=2
        cb.on_validation_epoch_end(SimpleNamespace(sanity_checking=False, current_epoch=epoch), module)
    assert cb.computed == [1, 5, 9]
    medians = [v for k, v in logged if k == "fisher/log10_median"]
    assert medians == [1.0, 1.0, 5.0, 5.0, 9.0, 9.0], "latest values are re-logged between computations"
    assert [v for k, v in logged if k == "fisher/epoch"] == [1.0, 1.0, 5.0, 5.0, 9.0, 9.0]
