"""Lightning DDP for the sharded EKF with one structure per update (``trainer=ddp_cpu_split``).

With ``EKF(label_split=True)`` every process must see the same batch at every step: they share one
update's label rows (:meth:`ekf_plugin.optim.EKF.split_rows`) and the filter (P split by rows). Lightning's
DDP gives each process its own part of the data instead. :class:`SameBatchDDPStrategy` keeps Lightning's
distributed sampler but as if there were one replica: every process iterates all frames in the same
shuffled order (``DistributedSampler`` with ``seed``, re-shuffled per epoch), whatever seed each process's
RNGs got. The label draws agree because every process seeds its label RNG with ``task.seed``.
"""

from __future__ import annotations

from typing import Any, Dict

from pytorch_lightning.strategies import DDPStrategy

__all__ = ["SameBatchDDPStrategy"]


class SameBatchDDPStrategy(DDPStrategy):
    """DDP whose processes all load the same batches (see module docstring).

    Args:
        sampler_seed: seed of the shared shuffle (epoch e uses ``sampler_seed + e``).
        **kwargs: :class:`pytorch_lightning.strategies.DDPStrategy` arguments.
    """

    def __init__(self, sampler_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sampler_seed = int(sampler_seed)

    @property
    def distributed_sampler_kwargs(self) -> Dict[str, Any]:
        return {"num_replicas": 1, "rank": 0, "seed": self.sampler_seed}
