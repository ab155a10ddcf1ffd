"""Two-process Lightning DDP run (``SharedMemoryDDPStrategy``, gloo, CPU) in which rank 0 alone has received
SIGTERM when the per-step check runs before step 4: ``python _sigterm_worker.py OUTDIR shm=1|0`` (0: Lightning's
own gloo check). Lightning re-runs this script for rank 1. Each rank writes ``OUTDIR/r<rank>.txt``: how the run
ended, its steps, and whether the check went through shared memory.

(Lightning itself raises on the flagged process at the end of the step in which the flag was set; the check
carries a flag set after that, before the next step, to every process. Here it is called from the start of step 4,
after rank 0's flag was set, as the training loop would call it.)"""

import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ekf_plugin.training.ddp import SharedMemoryDDPStrategy


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.automatic_optimization = False
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Flag(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.steps == 3:
            if trainer.global_rank == 0:
                trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()  # the per-step check, on every process


def main() -> None:
    out = Path(sys.argv[1])
    kw = dict(a.split("=", 1) for a in sys.argv[2:])
    strategy = SharedMemoryDDPStrategy(process_group_backend="gloo", shared_memory_check=kw.get("shm", "1") == "1")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=12, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Flag()])
    module = Module()
    data = torch.utils.data.DataLoader(torch.zeros(40, 1), batch_size=1)
    try:
        trainer.fit(module, data)
        ended = "finished"
    except SIGTERMException:
        ended = "sigterm"
    loop = trainer.fit_loop.epoch_loop
    via_shm = "_broadcast_sigterm_tensor" in vars(loop)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    (out / f"r{rank}.txt").write_text(f"{ended} {module.steps} {via_shm}")


if __name__ == "__main__":
    main()
