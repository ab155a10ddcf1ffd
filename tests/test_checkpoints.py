"""Crash-safe checkpoint writes (ekf_plugin.checkpoints): beside the target, previous kept, fallback on read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ekf_plugin.checkpoints import atomic_save, previous_path


def test_atomic_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    atomic_save({"step": 1}, target)
    atomic_save({"step": 2}, target)
    assert torch.load(target)["step"] == 2
    assert torch.load(previous_path(target))["step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt", "last.ckpt.prev"]


def test_a_failing_write_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, target)

    def dies_half_way(obj, fh):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # stands in for the process being stopped mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2}, target, save=dies_half_way)
    assert torch.load(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no partial or orphan file left"


def test_kill_9_during_a_save_never_truncates_the_checkpoint(tmp_path):
    """SIGKILL a process that rewrites a 64 MB checkpoint in a loop: the file on disk always loads."""
    target = tmp_path / "last.ckpt"
    code = (
        "import sys, torch\nfrom ekf_plugin.checkpoints import atomic_save\n"
        "x = torch.randn(4000, 4000)\nstep = 0\nwhile True:\n"
        "    step += 1\n    atomic_save({'step': step, 'P': x}, sys.argv[1])\n    print(step, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"
        time.sleep(0.3)  # well inside a later write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = torch.load(target, weights_only=True)
    assert state["step"] >= 1 and state["P"].shape == (4000, 4000)


def test_checkpoint_io_falls_back_to_the_previous_checkpoint(tmp_path, capfd):
    from ekf_plugin.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 10}, target)
    io.save_checkpoint({"global_step": 20}, target)
    assert io.load_checkpoint(target)["global_step"] == 20
    target.write_bytes(target.read_bytes()[:100])  # truncated (e.g. a copy cut short by a full disk)
    assert io.load_checkpoint(target)["global_step"] == 10
    assert "falling back to the previous complete checkpoint" in capfd.readouterr().err
    target.write_bytes(b"")
    previous_path(target).unlink()
    from ekf_plugin.checkpoints import CheckpointUnreadableError

    with pytest.raises(CheckpointUnreadableError, match="cannot be read .*EOFError.*this run cannot resume"):
        io.load_checkpoint(target)
