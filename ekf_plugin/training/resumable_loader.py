"""A training loader that resumes mid-epoch exactly (Lightning's ``state_dict``/``load_state_dict`` loader interface).

SchNetPack's training loader shuffles with a ``RandomSampler`` seeded from the global torch RNG at the start of each
epoch, and Lightning cannot restore its position: a run resumed from a checkpoint written inside an epoch (the
``latest_checkpoint`` callback writes one every 1000 updates) starts that epoch again in a new order, and even at an
epoch boundary the next order differs from the uninterrupted run's. Here each epoch's order is a permutation drawn
from ``(seed, epoch)`` alone, and a checkpoint records the epoch and how many batches of it were trained (read from the
trainer's own progress counters, so the batch Lightning has already prefetched is not counted). The resumed run
trains on the remaining frames of that epoch in the same order as the uninterrupted run, and on the same orders after.

One process only: under DDP the host's distributed sampler is used. ``WaterDataModule`` builds its training loader
this way; :func:`install_resumable_order` puts it into any SchNetPack ``AtomsDataModule`` (the EKF task does, so
``spktrain experiment=<any> task=ekf`` resumes inside an epoch too).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

__all__ = ["EpochPermutation", "host_shuffled_loader", "install_resumable_order", "resumable_loader", "trainer_progress"]


class EpochPermutation(torch.utils.data.Sampler):
    """Indices 0..n−1 in the order ``randperm(n)`` of a generator seeded with ``(seed, epoch)``, from ``start`` on.

    Lightning calls :meth:`set_epoch` before every epoch (as for ``DistributedSampler``); :meth:`set_position`
    puts a resumed run back inside an epoch.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = int(n), int(seed)
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.n  # the whole epoch: Lightning counts a resumed epoch's batches from its start

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self.start = int(epoch), 0

    def set_position(self, epoch: int, start: int) -> None:
        if not 0 <= int(start) <= self.n:
            raise ValueError(f"start must be in [0, {self.n}], got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def order(self, epoch: int) -> torch.Tensor:
        """The whole permutation of ``epoch``, shape (n,)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(epoch)) % 2**63)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start:].tolist())


def trainer_progress(trainer) -> Tuple[int, int, bool]:
    """(epoch, batches of it trained, whether the epoch is over) of a Lightning trainer, from its loop counters.

    ``processed`` counts a batch once its training step has run (it is incremented before ``on_train_batch_end``,
    where step checkpoints are written), so the batch that Lightning's fetcher has already prefetched is not counted.
    """
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    per_epoch = trainer.num_training_batches
    return int(trainer.current_epoch), done, bool(done >= per_epoch)


def resumable_loader(dataset, batch_size: int, seed: int, progress: Callable[[], Tuple[int, int, bool]],
                     loader_cls: Optional[type] = None, **kwargs: Any):
    """A ``loader_cls`` (default ``schnetpack.data.AtomsLoader``) over ``dataset`` in :class:`EpochPermutation`
    order, with the ``state_dict``/``load_state_dict`` pair that makes Lightning save and restore its position.

    Args:
        progress: ``() -> (epoch, batches trained in it, epoch over)`` at checkpoint time (:func:`trainer_progress`).
        **kwargs: passed to the loader (``num_workers``, ``pin_memory``, ...); no ``shuffle``/``sampler``.
    """
    if loader_cls is None:
        from schnetpack.data import AtomsLoader as loader_cls  # noqa: N813, PLC0415

    class ResumableLoader(loader_cls):  # a class per host loader class: Lightning checks state_dict on the instance
        def state_dict(self) -> Dict[str, Any]:
            order = self.sampler
            if not isinstance(order, EpochPermutation):  # the host replaced the sampler (e.g. a distributed one)
                return {}
            epoch, batches, over = progress()
            return {"seed": order.seed, "n": order.n, "epoch": epoch + 1 if over else epoch,
                    "start": 0 if over else min(order.n, batches * self.batch_size)}

        def load_state_dict(self, state: Dict[str, Any]) -> None:
            order = self.sampler
            if not state or not isinstance(order, EpochPermutation):
                return
            if int(state.get("n", -1)) != order.n:
                raise ValueError(f"the checkpoint's training loader had {state.get('n')} frames, this one has "
                                 f"{order.n}: not the same training set, cannot resume its order")
            order.seed = int(state["seed"])
            order.set_position(int(state["epoch"]), int(state["start"]))

    order = EpochPermutation(len(dataset), seed)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=order, shuffle=False, **kwargs)


def host_shuffled_loader(datamodule) -> bool:
    """Whether a datamodule's training loader is (or would be built as) SchNetPack's plain shuffled one, which may be
    replaced: an ``AtomsDataModule`` with a training set and no ``train_sampler_cls`` whose loader is not built yet or
    is an ``AtomsLoader`` over a ``RandomSampler`` (not one already replaced, or one someone chose)."""
    from schnetpack.data import AtomsLoader  # noqa: PLC0415

    if datamodule is None or not hasattr(datamodule, "_train_dataloader"):
        return False  # not an AtomsDataModule
    if getattr(datamodule, "train_sampler_cls", None) is not None or getattr(datamodule, "train_dataset", None) is None:
        return False  # it samples its own way, or has no training set
    built = datamodule._train_dataloader
    return built is None or (type(built) is AtomsLoader and isinstance(built.sampler, torch.utils.data.RandomSampler))


def install_resumable_order(datamodule, trainer, seed: int, batch_size: Optional[int] = None,
                            **loader_kwargs: Any) -> bool:
    """Give a SchNetPack ``AtomsDataModule`` a resumable training loader (:func:`resumable_loader`, order from
    ``(seed, epoch)``) in place of its shuffled ``RandomSampler`` one, before Lightning's fit loop asks for it.

    Done only where the loader is (or would be built as) the host's plain shuffled one: the datamodule has no
    ``train_sampler_cls``, its training loader is not built yet or is an ``AtomsLoader`` over a ``RandomSampler``
    (SchNetPack builds it in ``setup`` when a transform reads dataset statistics), and the strategy is not
    distributed (there Lightning puts its ``DistributedSampler`` in). Batch size, workers and pinning stay the
    datamodule's, and so is its ``collate_fn`` attribute where it has one (``WaterDataModule``: one structure
    without copies); ``batch_size`` (default the datamodule's) and ``loader_kwargs`` go to the loader too
    (:func:`~ekf_plugin.training.update_chunks.install_update_chunks`: k updates per batch). Returns whether the
    loader was installed. Call after the datamodule's ``setup``.
    """
    if trainer is None or hasattr(trainer.strategy, "distributed_sampler_kwargs") or not host_shuffled_loader(datamodule):
        return False
    dataset = datamodule.train_dataset
    if getattr(datamodule, "collate_fn", None) is not None:
        loader_kwargs.setdefault("collate_fn", datamodule.collate_fn)
    datamodule._train_dataloader = resumable_loader(
        dataset, int(batch_size or datamodule.batch_size), seed, lambda: trainer_progress(trainer),
        num_workers=datamodule.num_workers, pin_memory=datamodule._pin_memory, **loader_kwargs)
    return True
