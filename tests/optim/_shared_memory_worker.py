"""One process of the shared-memory collective tests: ``python _shared_memory_worker.py RANK WORLD PORT OUTDIR``.

Runs the collectives of :class:`ekf_plugin.optim.shared_memory.SharedMemoryGroup` and gloo's on the same tensors
and writes ``OUTDIR/shm_r<RANK>.pt`` with both results and what a collective
raised while the other process stayed away (rank 0 only, after rank 1 has left).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ekf_plugin.optim.sharded import split_rows
from ekf_plugin.optim.shared_memory import SharedMemoryGroup, all_gather, all_reduce_


def _label_rows(idx: torch.Tensor, dtype: torch.dtype, n: int):
    """Values (k,) and rows (k, n) in ``dtype`` that depend on the labels ``idx`` alone (the same on every process)."""
    g = torch.Generator().manual_seed(17)
    table = torch.randn(16, n + 1, generator=g, dtype=torch.float64).to(dtype)  # (16, n + 1)
    return table[idx, 0].to(torch.float64 if dtype == torch.float64 else torch.float32), table[idx, 1:]


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shm = SharedMemoryGroup.create(capacity=1 << 20, timeout=2.0)
    res = {"created": shm is not None, "rank": shm.rank, "world": shm.world}
    g = torch.Generator().manual_seed(rank)
    sums, gathers = [], []
    for step in range(40):  # alternating sizes and dtypes, with messages above the capacity (gloo's way)
        n = (11 * 2827) if step % 3 else (200_000 if step % 2 else 7)
        dtype = torch.float64 if step % 4 else torch.float32
        t = torch.randn(n, generator=g, dtype=dtype)
        a, b = t.clone(), t.clone()
        all_reduce_(a, shm)
        dist.all_reduce(b)
        sums.append((a, b))
        parts = [torch.empty_like(t) for _ in range(world)]
        all_gather(parts, t, shm)
        ref = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(ref, t)
        gathers.append((parts, ref))
    res["sums"], res["gathers"] = sums, gathers
    # split_rows through the segment and through gloo: k = 1 (one process has no share), 3 (uneven), 10; rows
    # in float32 (sent as such), float64 and float16 (sent as float64)
    splits = []
    for k in (1, 3, 10):
        for dtype in (torch.float32, torch.float64, torch.float16):
            idx = torch.arange(k) * 3 % 16
            fn = lambda i, dtype=dtype: _label_rows(i, dtype, 2827)  # noqa: E731
            splits.append((split_rows(fn, idx, 5.0, shm, 2827), split_rows(fn, idx, 5.0, None, 2827), fn(idx)))
    res["splits"] = splits
    src = torch.full((5,), float(rank))
    res["broadcast"] = shm.broadcast_(src.clone(), src=1)
    dist.barrier()
    if rank == 0:  # rank 1 stops calling: the next collective must raise, not hang
        try:
            shm.barrier()
            res["raised"] = ""
        except RuntimeError as e:
            res["raised"] = str(e)
    res["shm_files"] = [f for f in os.listdir("/dev/shm") if f.startswith("ekf_")] if os.path.isdir("/dev/shm") else []
    torch.save(res, out / f"shm_r{rank}.pt")


if __name__ == "__main__":
    main()
