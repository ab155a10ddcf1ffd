"""Collectives between the processes of one machine through a shared-memory segment (CPU tensors).

The sharded EKF (:mod:`ekf_plugin.optim.sharded`) exchanges two small messages per update (the label rows, and
X = P Jᵀ with diag P: ~250 kB for the water BPNN). Through gloo each exchange costs 0.4–0.8 ms on a 2-core machine
whatever its size (loopback TCP and gloo's threads), as much as half of the filter work it shares.
:class:`SharedMemoryGroup` does the same collectives through one ``multiprocessing.shared_memory`` segment: each
process copies its message into its own slot, publishes a sequence number and waits (spinning, then yielding)
until every process has published; a few microseconds plus the copies.

Results equal gloo's where it matters for the filter: every process gets the same bytes (a sum is taken in rank
order by every process, so all of them hold bitwise the same X and the weights stay identical).

Correctness of the handshake relies on x86's ordering of stores (the data is visible before the sequence number
that publishes it); elsewhere :meth:`SharedMemoryGroup.create` returns None and callers use ``torch.distributed``.
Two slots per process alternate between consecutive collectives, so a process that runs ahead cannot overwrite a
message that a slower one is still reading. The segment's name is removed right after every process has attached:
nothing is left in ``/dev/shm`` whatever way the processes end.
"""

from __future__ import annotations

import os
import platform
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Any, List, Optional

import numpy as np
import torch

__all__ = ["SharedMemoryGroup", "all_reduce_", "all_gather"]

_LINE = 64  # bytes per process flag (one cache line each)
_NUMPY = (torch.float64, torch.float32)  # dtypes summed through NumPy (IEEE addition: the same numbers as torch's)
_SPIN_S = 50e-6  # spin this long before yielding the core


class SharedMemoryGroup:
    """Collectives of ``world`` processes on one machine through one shared-memory segment.

    Built collectively by :meth:`create` (every process of a ``torch.distributed`` group calls it). ``capacity``:
    bytes of the largest message per process; a larger message goes through ``torch.distributed`` (the group it was
    made from; every process sees the same sizes, so all of them take the same way). ``timeout``: seconds a
    collective waits for the other processes before it raises RuntimeError (a process that died or stopped calling).
    """

    def __init__(self, name: str, rank: int, world: int, capacity: int, create: bool, timeout: float = 600.0,
                 process_group: Any = None) -> None:
        self.rank, self.world, self.capacity, self.timeout = int(rank), int(world), int(capacity), float(timeout)
        self.process_group = process_group
        size = _LINE * world + 2 * world * self.capacity
        self._shm = shared_memory.SharedMemory(name=name, create=create, size=size)
        if not create:  # Python < 3.13 tracks attached segments too and would unlink them at exit
            try:
                resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - only a warning at exit is at stake
                pass
        self._flags = np.ndarray((world, _LINE // 8), dtype=np.int64, buffer=self._shm.buf)  # [:, 0] sequence, 1 pid
        if create:
            self._flags[:] = 0
        self._flags[self.rank, 1] = os.getpid()
        self._bytes = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=2 * world * self.capacity,
                                       offset=_LINE * world)  # (2·W·capacity,) the message slots
        self._np = np.ndarray((2 * world * self.capacity,), dtype=np.uint8, buffer=self._shm.buf,
                              offset=_LINE * world)  # the same bytes for NumPy (~1 µs an operation, not ~5)
        self._seq = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, group: Any = None, capacity: int = 16 * 2**20, timeout: float = 600.0) -> Optional["SharedMemoryGroup"]:
        """Collective over the ``torch.distributed`` group ``group`` (default: the world): rank 0 makes the segment,
        the others attach, then its name is removed. None (on every process alike) where it does not apply: no
        initialised group, one process, processes on several machines, or not an x86 CPU."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return None
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if world < 2:
            return None
        need = _LINE * world + 2 * world * int(capacity)
        here = [platform.node(), platform.machine().lower() in ("x86_64", "amd64") and _room(2 * need), os.getpid()]
        everyone: List[Any] = [None] * world
        dist.all_gather_object(everyone, here, group=group)
        if len({h[0] for h in everyone}) != 1 or not all(h[1] for h in everyone):
            return None
        name = [f"ekf_{everyone[0][2]}_{time.time_ns() % 10**12}" if rank == 0 else None]
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(name, src=src, group=group)
        made = cls(name[0], rank, world, capacity, True, timeout, group) if rank == 0 else None
        dist.barrier(group=group)
        if rank != 0:
            made = cls(name[0], rank, world, capacity, False, timeout, group)
        dist.barrier(group=group)
        if rank == 0:
            made._shm.unlink()  # every process holds its mapping; the name is no longer needed
        return made

    # ------------------------------------------------------------------ collectives
    def _start(self, r: int, seq: int) -> int:
        """Byte offset of process r's slot for collective ``seq`` (two slots per process, alternating)."""
        return ((seq % 2) * self.world + r) * self.capacity

    def _slot(self, r: int, seq: int, nbytes: int) -> torch.Tensor:
        start = self._start(r, seq)
        return self._bytes[start : start + nbytes]

    def _np_slot(self, r: int, seq: int, nbytes: int) -> np.ndarray:
        """:meth:`_slot` as a NumPy uint8 view."""
        start = self._start(r, seq)
        return self._np[start : start + nbytes]

    def _exchange(self, t: torch.Tensor) -> List[torch.Tensor]:
        """Every process's ``t`` (same shape and dtype everywhere, CPU), in rank order; views into the segment,
        valid until the next collective but one."""
        if t.device.type != "cpu":
            raise ValueError(f"SharedMemoryGroup: CPU tensors only, got one on {t.device}")
        flat = t.detach().contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        self.outbox(nbytes).copy_(flat.view(torch.uint8))
        return [part.view(t.dtype).view(t.shape) for part in self.post(nbytes)]

    def outbox(self, nbytes: int) -> torch.Tensor:
        """(nbytes,) uint8 view of this process's slot for the next collective: write a message into it, then
        :meth:`post` it (a message built in place costs no copy). ValueError above the capacity."""
        if nbytes > self.capacity:
            raise ValueError(f"SharedMemoryGroup: a message of {nbytes} bytes exceeds the capacity {self.capacity}")
        return self._slot(self.rank, self._seq + 1, nbytes)

    def post(self, nbytes: int) -> List[torch.Tensor]:
        """Publish the :meth:`outbox` (its first ``nbytes``), wait for every process's, and return them in rank order:
        (nbytes,) uint8 views into the segment, valid until the next collective but one."""
        seq = self._publish()
        return [self._slot(r, seq, nbytes) for r in range(self.world)]

    def _publish(self) -> int:
        """Publish this process's message of the next collective (written into its slot) and wait for every
        process's; returns the collective's sequence number."""
        seq = self._seq = self._seq + 1
        self._flags[self.rank, 0] = seq  # after the data (x86 keeps the order of stores)
        self._wait(seq)
        return seq

    def _wait(self, seq: int) -> None:
        """Until every process has published ``seq``: spin 50 µs, then yield the core, after 10 ms sleep 1 ms at a
        time and check once a second that the late processes still exist (a dead one raises at once)."""
        flags = self._flags
        t0 = time.perf_counter()
        checked = t0
        while True:
            if all(int(flags[r, 0]) >= seq for r in range(self.world)):
                return
            now = time.perf_counter()
            waited = now - t0
            if waited < _SPIN_S:
                continue
            late = [r for r in range(self.world) if int(flags[r, 0]) < seq]
            if waited > self.timeout:
                raise RuntimeError(f"SharedMemoryGroup: process(es) {late} did not reach collective {seq} within "
                                   f"{self.timeout:.0f} s (stopped or failed?)")
            if now - checked > 1.0:
                checked = now
                gone = [r for r in late if not _alive(int(flags[r, 1]))]
                if gone:
                    raise RuntimeError(f"SharedMemoryGroup: process(es) {gone} ended before collective {seq}")
            if waited < 0.01:
                os.sched_yield()
            else:
                time.sleep(0.001)

    def _fits(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.numel() * t.element_size() <= self.capacity

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In place: t ← Σ_r t_r, summed in rank order on every process (bitwise the same result everywhere; with two
        processes each adds the other's part to its own: a + b and b + a are the same number in IEEE arithmetic)."""
        if not self._fits(t):
            torch.distributed.all_reduce(t, group=self.process_group)
            return t
        if self.world == 2 and t.is_contiguous() and t.dtype in _NUMPY:  # one pass, through NumPy's views
            mine = t.detach().numpy().reshape(-1)  # (numel,) the same memory as t
            nbytes = mine.nbytes  # within the capacity (_fits)
            np.copyto(self._np_slot(self.rank, self._seq + 1, nbytes).view(mine.dtype), mine)
            seq = self._publish()
            np.add(mine, self._np_slot(1 - self.rank, seq, nbytes).view(mine.dtype), out=mine)  # t0 + t1 = t1 + t0
            return t
        parts = self._exchange(t)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        t.copy_(total)
        return t

    def all_gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        """Every process's ``t`` (copies), in rank order."""
        if not self._fits(t):
            out = [torch.empty_like(t) for _ in range(self.world)]
            torch.distributed.all_gather(out, t.contiguous(), group=self.process_group)
            return out
        return [p.clone() for p in self._exchange(t)]

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: t ← t of process ``src`` (its rank in this group)."""
        if not self._fits(t):
            g = self.process_group
            torch.distributed.broadcast(t, src=torch.distributed.get_global_rank(g, src) if g is not None else src, group=g)
            return t
        t.copy_(self._exchange(t)[src])
        return t

    def barrier(self) -> None:
        self._exchange(torch.zeros(1, dtype=torch.uint8))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (0: not known yet)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _room(nbytes: int) -> bool:
    """Whether ``/dev/shm`` has ``nbytes`` free (a segment larger than its filesystem would fault on first use,
    e.g. in a container with the default 64 MB)."""
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):  # no /dev/shm, or no statvfs (Windows)
        return False
    return st.f_bavail * st.f_frsize >= nbytes


def all_reduce_(t: torch.Tensor, group: Any = None) -> None:
    """Sum ``t`` in place over ``group``: a :class:`SharedMemoryGroup` or a ``torch.distributed`` group (or None)."""
    if isinstance(group, SharedMemoryGroup):
        group.all_reduce_(t)
    else:
        torch.distributed.all_reduce(t, group=group)


def all_gather(out: List[torch.Tensor], t: torch.Tensor, group: Any = None) -> None:
    """``torch.distributed.all_gather(out, t, group)``, through a :class:`SharedMemoryGroup` when ``group`` is one."""
    if isinstance(group, SharedMemoryGroup):
        for o, p in zip(out, group.all_gather(t)):
            o.copy_(p)
        return
    torch.distributed.all_gather(out, t, group=group)
