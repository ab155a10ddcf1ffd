"""Lightning callbacks of the training protocol (host-framework side; the optimizer knows none of this)."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = ["LatestCheckpoint", "ProgressBarEvery", "WallClock", "relocate_checkpoint_state"]


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
