"""WallClock: learning curves against wall-clock time, continued across a resume."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import outputs, toy_loaders, toy_model  # noqa: E402

from ekf_plugin.optim import EKF  # noqa: E402
from ekf_plugin.training import PaperScheduleTask  # noqa: E402
from ekf_plugin.training.callbacks import WallClock  # noqa: E402


def test_wall_clock_is_logged_at_validation_and_continues_after_a_resume(tmp_path):
    train, val = toy_loaders(tmp_path, n_frames=8)
    clock = WallClock(every_n_train_steps=2)
    seen = []

    class Spy(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append(float(trainer.callback_metrics["wall_time_s"]))

    task = PaperScheduleTask(toy_model(), outputs(), optimizer_cls=EKF, optimizer_args={"lr": 1.0})
    tr = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, inference_mode=False, callbacks=[clock, Spy()])
    t0 = time.perf_counter()
    tr.fit(task, train, val)
    wall = time.perf_counter() - t0
    assert len(seen) == 2 and 0 < seen[0] < seen[1] <= wall
    resumed = WallClock()
    resumed.load_state_dict(clock.state_dict())
    assert resumed.elapsed() >= seen[1], "a resumed run continues the clock"
