"""SharedMemoryGroup: the collectives of the sharded EKF through shared memory, equal to gloo's (2 processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from ekf_plugin.optim.shared_memory import SharedMemoryGroup

HERE = Path(__file__).resolve().parent


def test_without_a_process_group_there_is_none():
    assert SharedMemoryGroup.create() is None


def test_two_processes_get_gloos_results(tmp_path):
    """All-reduce, all-gather (also above the capacity: gloo's way), broadcast, ``split_rows`` (rows of several
    dtypes, uneven shares); no file left; a collective the other process does not join raises after the timeout."""
    from tests.optim.test_sharded import _free_port

    port = _free_port()
    worker = HERE / "_shared_memory_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), "2", port, str(tmp_path)]) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    res = [torch.load(tmp_path / f"shm_r{r}.pt") for r in range(2)]
    assert all(r["created"] for r in res) and [r["rank"] for r in res] == [0, 1]
    for r in res:
        for a, b in r["sums"]:
            torch.testing.assert_close(a, b, rtol=1e-15, atol=0)  # gloo may sum in another order
        for parts, ref in r["gathers"]:
            assert all(torch.equal(p, q) for p, q in zip(parts, ref))
        assert torch.equal(r["broadcast"], torch.ones(5))
    for (a0, _), (a1, _) in zip(res[0]["sums"], res[1]["sums"]):
        assert torch.equal(a0, a1), "every process holds bitwise the same sum"
    for r in res:  # split_rows: each process's share gathered, in the rows' own dtype, through either way
        for got_shm, got_gloo, ref in r["splits"]:
            for got in (got_shm, got_gloo):
                assert all(g.dtype == f.dtype and torch.equal(g, f) for g, f in zip(got, ref))
    assert "did not reach" in res[0]["raised"] and "[1]" in res[0]["raised"]
    assert res[0]["shm_files"] == [] and res[1]["shm_files"] == [], "no segment name left in /dev/shm"
