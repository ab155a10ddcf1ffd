"""SharedMemoryDDPStrategy: Lightning's per-step SIGTERM check through shared memory keeps its meaning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("shm", ["1", "0"])
def test_sigterm_on_rank_zero_stops_both_processes_at_the_same_step(tmp_path, shm):
    """Rank 0 alone is flagged before the check of step 4: both processes raise SIGTERMException there, as with
    Lightning's own gloo broadcast (shm=0)."""
    res = subprocess.run([sys.executable, str(HERE / "_sigterm_worker.py"), str(tmp_path), f"shm={shm}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    got = [(tmp_path / f"r{r}.txt").read_text().split() if (tmp_path / f"r{r}.txt").exists() else None for r in range(2)]
    assert got[0] is not None and got[1] is not None, res.stderr[-3000:]
    for ended, steps, via_shm in got:
        assert ended == "sigterm" and steps == "3", got
        assert via_shm == str(shm == "1"), got
