"""A Lightning callback that records what a user's ``spktrain`` run spends its time on (benchmarks only).

    spktrain ... +callbacks.step_timer._target_=benchmarks.step_timer.StepTimer \
                 +callbacks.step_timer.path=/tmp/steps.json

Writes JSON: the wall-clock time (``time.time()``) of the end of the first training step, per-step wall times (from the end
of one training batch to the end of the next: data loading, ``training_step`` with the EKF update, logging and
callbacks — the whole loop) with the updates each step made (``updates``: the ``global_step`` increments; more than
one with ``task.updates_per_step``; ``first_step_updates`` for the first, untimed, step), the time of each step inside the optimizer's ``step`` (the EKF's labels,
Jacobian rows and filter; the rest of a step is the loop around it), the training time of each epoch and
the validation time of each epoch; for an EKF, also the filter's share of each optimizer step (``filters_s``, the
update's algebra on P, from ξ and J on) with the update's label count (``filter_labels``: 1 for an energy update
of the study's mix, 10 for a force update), so that a step's labels and Jacobian rows are its time minus its
filter's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl


def timed(inner, record: list):
    """``inner`` wrapped so that each call appends its wall time (s) to ``record``."""
    def call(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - t)
    return call


class StepTimer(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.first_update_s = None
        self.steps, self.epochs, self.validations, self.optimizer_steps, self.training_steps = [], [], [], [], []
        self.updates, self.first_step_updates, self._global_step = [], 0, 0
        self.filters, self.filter_labels = [], []
        self._last = self._epoch0 = self._val0 = None

    def on_train_start(self, trainer, pl_module) -> None:
        """Time the optimizer's own ``step`` and the task's ``training_step`` (instance attributes wrapping the
        class's methods)."""
        self._global_step = int(trainer.global_step)  # a resumed run starts above 0
        for opt in trainer.optimizers:
            opt.step = timed(opt.step, self.optimizer_steps)
            for attr in ("_update", "_update_sharded"):  # the EKF's filter (one of them per step)
                if hasattr(opt, attr):
                    setattr(opt, attr, self._counted(getattr(opt, attr)))
        pl_module.training_step = timed(pl_module.training_step, self.training_steps)

    def _counted(self, inner):
        """``inner(xi, J)`` (an EKF filter) timed into ``filters`` with ξ's length into ``filter_labels``."""
        def call(xi, J):
            t = time.perf_counter()
            try:
                return inner(xi, J)
            finally:
                self.filters.append(time.perf_counter() - t)
                self.filter_labels.append(int(xi.numel()))
        return call

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch0 = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        made = int(trainer.global_step) - self._global_step
        self._global_step = int(trainer.global_step)
        if self.first_update_s is None:
            self.first_update_s = time.time()  # absolute; the runner subtracts its launch time
            self.first_step_updates = made
        else:
            self.steps.append(now - self._last)
            self.updates.append(made)
        self._last = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append(time.perf_counter() - self._epoch0)
        self._dump()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validations.append(time.perf_counter() - self._val0)
        if self._last is not None:  # a validation inside an epoch is not part of the next step's time
            self._last += time.perf_counter() - self._val0

    def on_fit_end(self, trainer, pl_module) -> None:
        self._dump()

    def _dump(self) -> None:
        self.path.write_text(json.dumps({"first_update_time": self.first_update_s, "steps_s": self.steps,
                                         "epochs_s": self.epochs, "validations_s": self.validations,
                                         "optimizer_steps_s": self.optimizer_steps,
                                         "training_steps_s": self.training_steps, "updates": self.updates,
                                         "first_step_updates": self.first_step_updates,
                                         "filters_s": self.filters, "filter_labels": self.filter_labels}))
