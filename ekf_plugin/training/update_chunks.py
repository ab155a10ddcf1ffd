"""Several EKF updates per Lightning training step (``task.updates_per_step``).

The study's update is one structure (batch size 1), ~10 ms of filter on the BPNN; around it Lightning's training loop
(fetching a batch, its hooks, callbacks and logger bookkeeping, the per-step checks) costs ~0.7 ms and the data item
~0.3 ms, whatever the batch holds. With ``updates_per_step = k`` the training loader hands the task k updates' batches
at once (a list, each collated as the datamodule collates one update's ``batch_size`` structures) and the task runs
them one after the other: the same updates in the same order with the same label draws as k steps (bitwise, tested),
with Lightning's part paid once per k updates.

What a step means then: ``trainer.global_step`` still counts updates (each ``optimizer.step`` of a manually optimised
module advances it), so ``trainer.max_steps`` and the checkpoints' ``every_n_train_steps`` are in updates (the task
stops inside a step at ``max_steps``, which ends the epoch as Lightning's own stop does; k shrinks to a divisor of
the epoch's updates and of every ``every_n_train_steps``, :func:`fitting_updates_per_step`, since a callback would
otherwise see the counter jump past its multiples), and so are the loggers'
steps (the task sets Lightning's count of stepped batches to the updates: ``metrics.csv`` is against updates, on-step
values are written at steps ending on a multiple of ``log_every_n_steps`` updates). Step checkpoints fall between
steps, so a resumed run goes on exactly. The progress bar, an integer ``val_check_interval`` and
``limit_train_batches`` count steps of k updates.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, List, Optional

__all__ = ["UpdateChunks", "fitting_updates_per_step", "install_update_chunks", "step_intervals"]


def fitting_updates_per_step(requested: int, epoch_updates: int, intervals: Iterable[int] = ()) -> int:
    """The largest k ≤ ``requested`` that divides the updates of an epoch and every positive interval (in updates):
    then every step of k updates ends where the counter of one update per step passes, so a callback acting every
    n updates (the latest checkpoint's 1000) keeps its places in every epoch (an epoch's last step would be short
    otherwise, and the counter would never meet a multiple again)."""
    intervals = [int(n) for n in intervals if int(n) > 0]
    for k in range(max(int(requested), 1), 0, -1):
        if epoch_updates % k == 0 and all(n % k == 0 for n in intervals):
            return k
    return 1


def step_intervals(callbacks: Iterable[Any]) -> List[int]:
    """The ``every_n_train_steps`` (updates) of the callbacks that have one (Lightning's ``ModelCheckpoint``,
    ``WallClock``)."""
    out = []
    for cb in callbacks:
        n = getattr(cb, "_every_n_train_steps", getattr(cb, "every_n_train_steps", None))
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            out.append(n)
    return out


class UpdateChunks:
    """Collate function: the items of one loader batch (k·B structures) as k batches of B, each collated by ``collate``
    (the last one shorter when the epoch's frames run out). ``updates``: the k of the loader built around it."""

    def __init__(self, collate: Callable[[List[Any]], Any], per_update: int, updates: int = 1) -> None:
        if int(per_update) < 1:
            raise ValueError(f"structures per update must be >= 1, got {per_update}")
        self.collate, self.per_update, self.updates = collate, int(per_update), int(updates)

    def __call__(self, items: List[Any]) -> List[Any]:
        b = self.per_update
        return [self.collate(items[i:i + b]) for i in range(0, len(items), b)]


def install_update_chunks(datamodule, trainer, updates: int, seed: int, resumable: bool = True) -> Optional[UpdateChunks]:
    """Give a SchNetPack ``AtomsDataModule`` a training loader of ``updates`` × ``batch_size`` structures per batch whose
    batches are lists of ``updates`` per-update batches (:class:`UpdateChunks`); the datamodule's ``collate_fn``
    attribute where it has one (``WaterDataModule``), else SchNetPack's collate, collates each.

    One process with ``resumable``: the order of :func:`~ekf_plugin.training.resumable_loader.install_resumable_order`
    (a checkpoint restores its position). Otherwise a shuffled ``AtomsLoader``, into which Lightning puts its
    distributed sampler under DDP (``SameBatchDDPStrategy``: every process the same frames). Done only where the
    host's own plain shuffled loader would be used (no ``train_sampler_cls``, no loader of someone's choosing);
    elsewhere nothing changes (a warning) and None is returned. ``updates`` becomes the largest k below it that
    divides the updates of an epoch (per process) and the callbacks' ``every_n_train_steps``
    (:func:`fitting_updates_per_step`; a warning says so; None when that is 1). Call after the datamodule's ``setup``.
    """
    if updates <= 1 or trainer is None or datamodule is None:
        return None
    from schnetpack.data import AtomsLoader  # noqa: PLC0415
    from schnetpack.data.loader import _atoms_collate_fn  # noqa: PLC0415

    from ekf_plugin.training.resumable_loader import host_shuffled_loader, install_resumable_order  # noqa: PLC0415

    if not host_shuffled_loader(datamodule):
        warnings.warn(f"task.updates_per_step={updates}: the datamodule builds its own training loader; one update per "
                      "training step", RuntimeWarning, stacklevel=2)
        return None
    dataset, per_update = datamodule.train_dataset, int(datamodule.batch_size)
    sampler = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    frames = math.ceil(len(dataset) / int(sampler.get("num_replicas", 1)))  # per process (DistributedSampler pads)
    epoch_updates = math.ceil(frames / per_update)
    intervals = step_intervals(trainer.callbacks)
    fitting = fitting_updates_per_step(updates, epoch_updates, intervals)
    if fitting != updates:
        warnings.warn(f"task.updates_per_step={updates}: {fitting} here, so that steps end on every multiple of the "
                      f"{epoch_updates} updates of an epoch and of every_n_train_steps {intervals}", RuntimeWarning,
                      stacklevel=2)
    if fitting <= 1:
        return None
    updates = fitting
    chunks = UpdateChunks(getattr(datamodule, "collate_fn", None) or _atoms_collate_fn, per_update, updates)
    if resumable and install_resumable_order(datamodule, trainer, seed, batch_size=per_update * updates,
                                             collate_fn=chunks):
        return chunks
    datamodule._train_dataloader = AtomsLoader(dataset, batch_size=per_update * updates, shuffle=True,
                                               collate_fn=chunks, num_workers=datamodule.num_workers,
                                               pin_memory=datamodule._pin_memory)
    return chunks
