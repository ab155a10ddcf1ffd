"""Lightning callbacks of the training protocol (host-framework side; the optimizer knows none of this)."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = ["EMAGuard", "LatestCheckpoint", "ProgressBarEvery", "WallClock", "relocate_checkpoint_state",
           "schnetpack_ema"]


def relocate_checkpoint_state(state: Dict[str, Any], dirpath: Optional[str]) -> bool:
    """Point a saved ``ModelCheckpoint`` state (``checkpoint["callbacks"][state_key]``) written in another
    directory at the same files under ``dirpath``, in place; True if it did.

    Lightning restores only ``best_model_path`` (still the old, absolute path) of a callback whose ``dirpath``
    changed, so a run directory moved to another place or machine ends in ``trainer.test(ckpt_path="best")``
    (what ``spktrain`` does after training) failing on a file that is not there. Done only when every saved
    path has its file under ``dirpath``; then ``dirpath`` is set too, so the scores are restored as well."""
    old = state.get("dirpath")
    if not old or not dirpath or os.path.realpath(old) == os.path.realpath(dirpath):
        return False

    def moved(path: str) -> Optional[str]:
        rel = os.path.relpath(path, old)
        new = os.path.join(dirpath, rel)
        return new if not rel.startswith(os.pardir) and os.path.isfile(new) else None

    keys = [k for k in ("best_model_path", "kth_best_model_path", "last_model_path") if state.get(k)]
    paths = {k: moved(state[k]) for k in keys}
    best_k = {moved(k): v for k, v in (state.get("best_k_models") or {}).items()}
    if None in paths.values() or None in best_k:
        return False
    state.update(paths, best_k_models=best_k, dirpath=dirpath)
    return True


class LatestCheckpoint(ModelCheckpoint):
    """Overwrite one checkpoint (``dirpath/filename.ckpt``, e.g. ``checkpoints/last.ckpt``) with the latest
    training state every ``every_n_train_steps`` updates **and after every validation pass**.

    Why: since Lightning 2.6, ``ModelCheckpoint(save_last=True)`` (SchNetPack's default ``checkpoint``
    callback) writes ``last.ckpt`` only at a step where its monitored value improved, so a run stopped after an
    epoch that did not improve ``val_loss`` resumes from an older state. A plain ``ModelCheckpoint`` with
    ``every_n_train_steps`` saves before the validation of that step, so the state that validation adds (other
    callbacks' state, e.g. the Fisher history, the best scores) would be missing. This one saves again at the
    end of every validation (after all ``on_validation_epoch_end`` hooks; Lightning runs checkpoint callbacks
    last). Without a monitor; the file is overwritten in place (with ``AtomicCheckpointIO`` never partially).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_top_k", 1)
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        if self.monitor is not None:
            raise ValueError("LatestCheckpoint keeps the latest state; it takes no monitor "
                             f"(got monitor={self.monitor!r}; use a ModelCheckpoint for the best one)")

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: Dict[str, Any]) -> None:
        """A run directory that moved (``workflow.sh pack``, a copy to another machine) resumes as if it had not:
        every checkpoint callback's saved paths and scores follow it (:func:`relocate_checkpoint_state`; runs
        before the callbacks' ``load_state_dict``)."""
        states = checkpoint.get("callbacks") or {}
        for cb in trainer.checkpoint_callbacks:
            state = states.get(cb.state_key)
            moved = isinstance(state, dict) and relocate_checkpoint_state(state, getattr(cb, "dirpath", None))
            if moved:
                rank_zero_info(f"checkpoints of {type(cb).__name__} moved: now under {cb.dirpath}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != "fit":
            return
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def schnetpack_ema(trainer: pl.Trainer) -> Optional[Any]:
    """The ``torch_ema.ExponentialMovingAverage`` of SchNetPack's ``ExponentialMovingAverage`` callback in
    ``trainer`` (None without one, or before its ``on_fit_start`` builds it)."""
    from schnetpack.train import ExponentialMovingAverage  # noqa: PLC0415

    for cb in trainer.callbacks:
        if isinstance(cb, ExponentialMovingAverage) and cb.ema is not None:
            return cb.ema
    return None


class EMAGuard(pl.Callback):
    """SchNetPack's ``ExponentialMovingAverage`` (EMA) callback, mended where it lets training go on from the averages.

    That callback puts the averaged weights into the model at ``on_fit_start`` and at every validation start
    (keeping the training weights aside with ``store()``), so that validation and the checkpoints written at it see
    the averages, and takes the training weights back only at the start of a training epoch. Three cases miss that:

    - **A validation inside an epoch** (``trainer.val_check_interval`` < one epoch, as ``experiment=water_painn_adam``
      has): the updates after it start from the averages, i.e. every validation replaces the training weights by
      the EMA. Here the training weights come back before the next training batch.
    - **An epoch end without a validation since the last restore** (after such a validation, or with
      ``check_val_every_n_epoch`` > 1): the next epoch start puts back the training weights kept at the last
      validation (or at fit start), undoing every update since. Here the weights kept aside are refreshed at the
      epoch end, so that restore changes nothing.
    - **A resumed run**: the EMA's checkpointed state does not say which of the two the model held, and its
      ``on_fit_start`` overwrites the weights it kept aside, so the resumed run trains on from the averages (inside
      an epoch, where Lightning calls no ``on_train_epoch_start``, and after a checkpoint written at a validation).
      Measured on SchNetPack's md17 experiment with ``task=ekf`` (PaiNN, stopped at update 3 of 8): weights off by
      up to 0.018 against the uninterrupted run. Here the checkpoint records which weights the model holds and the
      training weights; at ``on_train_start`` of a resumed run (after the EMA's ``on_fit_start`` and any sanity
      check) they are put back: aside, and into the model when they were there.

    Does nothing without an EMA callback. ``PaperScheduleTask`` adds it by itself (``configure_callbacks``) when the
    trainer has one; for other tasks add ``callbacks/ema_guard`` after ``ema``.
    """

    def __init__(self) -> None:
        self._swapped = False  # the model holds the EMA's averages (after on_fit_start / a validation start)
        self._trainer: Optional[pl.Trainer] = None
        self._module: Optional[pl.LightningModule] = None
        self._loaded: Optional[Dict[str, Any]] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Optional[str] = None) -> None:
        self._trainer, self._module = trainer, pl_module

    def _weights(self) -> List[Any]:
        return list(self._module.model.parameters())  # what SchNetPack's callback averages

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swapped = schnetpack_ema(trainer) is not None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swapped = schnetpack_ema(trainer) is not None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swapped = False  # the EMA callback has just restored the training weights

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        ema = schnetpack_ema(trainer) if self._swapped else None
        if ema is not None:  # after a validation inside the epoch: train on from the training weights
            ema.restore()
        self._swapped = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = None if self._swapped else schnetpack_ema(trainer)
        if ema is not None:  # no validation since the last restore: the next epoch start must not roll back
            ema.store()

    def state_dict(self) -> Dict[str, Any]:
        ema = schnetpack_ema(self._trainer) if self._trainer is not None else None
        if ema is None:
            return {}
        kept = ema.collected_params if self._swapped else self._weights()
        return {"swapped": self._swapped, "training_weights": [t.detach().clone() for t in kept]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._loaded = dict(state_dict) if state_dict else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._loaded = self._loaded, None
        ema = schnetpack_ema(trainer)
        if state is None or ema is None:
            return
        params, saved = self._weights(), state["training_weights"]
        if len(saved) != len(params) or any(t.shape != p.shape for t, p in zip(saved, params)):
            rank_zero_warn("EMAGuard: the checkpoint's training weights do not match this model; the EMA "
                           "callback's own resume is left as it is")
            return
        ema.collected_params = [t.to(device=p.device, dtype=p.dtype).clone() for t, p in zip(saved, params)]
        self._swapped = bool(state["swapped"])  # if so, the first training batch (or epoch start) restores
        if not self._swapped:
            ema.restore()  # the model held the training weights when the checkpoint was written


class WallClock(pl.Callback):
    """Log ``wall_time_s``, seconds since the start of ``fit`` (resumed runs continue from the saved value),
    at every validation and every ``every_n_train_steps`` updates: learning curves against wall clock.

    A run resumed from a checkpoint written without this callback (after updates whose time nobody recorded)
    logs nothing and says so once: a clock restarted at zero there would put its points at the wrong time.

    Args:
        every_n_train_steps: also log during training every this many updates (0 = only at validation).
    """

    def __init__(self, every_n_train_steps: int = 100) -> None:
        self.every_n_train_steps = int(every_n_train_steps)
        self.offset = 0.0  # seconds already spent before a resume
        self._t0: Optional[float] = None
        self._restored = False  # a saved clock was loaded (load_state_dict)
        self.unknown = False  # resumed without a saved clock: the elapsed time is not known

    def elapsed(self) -> float:
        """Seconds of fit so far (s)."""
        return self.offset + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, not in on_fit_start: Lightning restores the loops (global_step) from a checkpoint in between
        if int(trainer.global_step) > 0 and not self._restored and not self.unknown:
            self.unknown = True
            rank_zero_warn(f"WallClock: resumed at update {int(trainer.global_step)} from a checkpoint without a "
                           "saved wall clock; wall_time_s is not logged for this run")

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.every_n_train_steps
        if n and not self.unknown and trainer.global_step % n == 0:
            pl_module.log("wall_time_s", self.elapsed(), on_step=True, on_epoch=False, batch_size=1)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and not self.unknown:
            pl_module.log("wall_time_s", self.elapsed(), on_step=False, on_epoch=True, batch_size=1)

    def state_dict(self) -> dict:
        return {"elapsed_s": None if self.unknown else self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        elapsed = state_dict.get("elapsed_s", 0.0)
        self._restored = True
        self.unknown = elapsed is None
        self.offset = 0.0 if elapsed is None else float(elapsed)


class ProgressBarEvery(pl.Callback):
    """Redraw Lightning's training progress bar every ``every_n_steps`` updates instead of after every one.

    Lightning's default bar (``RichProgressBar`` where ``rich`` is installed, else ``TQDMProgressBar``) redraws
    itself and rebuilds its metrics text after each training batch: ~0.2 ms, 2 % of an EKF update of the study's
    BPNN. With this callback it does so every ``every_n_steps`` batches and at the end of an epoch; nothing
    changes when the bar is disabled (``trainer.enable_progress_bar=false``) or ``every_n_steps`` <= 1.
    """

    def __init__(self, every_n_steps: int = 20) -> None:
        self.every_n_steps = int(every_n_steps)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Optional[str] = None) -> None:
        bar = trainer.progress_bar_callback
        if bar is None or self.every_n_steps <= 1 or getattr(bar, "_ekf_every", None) is not None:
            return
        redraw, n = bar.on_train_batch_end, self.every_n_steps

        def on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx):
            done = batch_idx + 1
            if done % n == 0 or done >= trainer.num_training_batches:
                redraw(trainer, pl_module, outputs, batch, batch_idx)

        bar.on_train_batch_end = on_train_batch_end  # Lightning calls the hooks it finds on the instance
        bar._ekf_every = n
