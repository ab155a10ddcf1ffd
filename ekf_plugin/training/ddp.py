"""Lightning DDP strategies for the sharded EKF on one machine (``trainer=ddp_cpu``, ``trainer=ddp_cpu_split``).

:class:`SharedMemoryDDPStrategy` is Lightning's ``DDPStrategy`` whose one collective per training step, the check
that no process received SIGTERM (``_TrainingEpochLoop._broadcast_sigterm_tensor``: a gloo broadcast, 0.9–1.6 ms
per update on the 2-core machine, about as much as the filter work a second process takes over), goes through a
:class:`~ekf_plugin.optim.shared_memory.SharedMemoryGroup` when all processes are on this machine. The check is
the same: rank 0's flag reaches every process, and a flagged step raises ``SIGTERMException`` on all of them after
a barrier. Elsewhere (several machines, no room in ``/dev/shm``) Lightning's own check runs unchanged.

:class:`SameBatchDDPStrategy` (``EKF(label_split=True)``): every process must see the same batch at every step:
they share one update's label rows (:meth:`ekf_plugin.optim.EKF.split_rows`) and the filter (P split by rows).
Lightning's DDP gives each process its own part of the data instead. It keeps Lightning's distributed sampler but
as if there were one replica: every process iterates all frames in the same shuffled order (``DistributedSampler``
with ``seed``, re-shuffled per epoch), whatever seed each process's RNGs got. The label draws agree because every
process seeds its label RNG with ``task.seed``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch
from pytorch_lightning.strategies import DDPStrategy

__all__ = ["SharedMemoryDDPStrategy", "SameBatchDDPStrategy"]


class SharedMemoryDDPStrategy(DDPStrategy):
    """DDP with its per-step SIGTERM check through shared memory (see module docstring).

    Args:
        shared_memory_check: replace Lightning's per-step gloo broadcast where a shared-memory group can be made.
        **kwargs: :class:`pytorch_lightning.strategies.DDPStrategy` arguments.
    """

    def __init__(self, shared_memory_check: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shared_memory_check = bool(shared_memory_check)
        self._shm: Optional[Any] = None

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if not self.shared_memory_check or self.world_size < 2:
            return
        from ekf_plugin.optim.shared_memory import SharedMemoryGroup  # noqa: PLC0415

        self._shm = SharedMemoryGroup.create(capacity=64)  # collective: every process runs setup
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if self._shm is not None and loop is not None and hasattr(loop, "_broadcast_sigterm_tensor"):
            shm = self._shm

            def broadcast_sigterm_flag() -> None:  # Lightning's check, through shared memory
                from pytorch_lightning.utilities.exceptions import SIGTERMException  # noqa: PLC0415

                flag = torch.tensor([1 if getattr(loop.trainer, "received_sigterm", False) else 0])
                shm.broadcast_(flag, src=0)
                if int(flag[0]) == 1:
                    with contextlib.suppress(Exception):
                        shm.barrier()  # every process stops at the same step
                    raise SIGTERMException()

            loop._broadcast_sigterm_tensor = broadcast_sigterm_flag


class SameBatchDDPStrategy(SharedMemoryDDPStrategy):
    """DDP whose processes all load the same batches (see module docstring).

    Args:
        sampler_seed: seed of the shared shuffle (epoch e uses ``sampler_seed + e``).
        **kwargs: :class:`SharedMemoryDDPStrategy` arguments.
    """

    def __init__(self, sampler_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sampler_seed = int(sampler_seed)

    @property
    def distributed_sampler_kwargs(self) -> Dict[str, Any]:
        return {"num_replicas": 1, "rank": 0, "seed": self.sampler_seed}
