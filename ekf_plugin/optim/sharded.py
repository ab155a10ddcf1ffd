"""Sharded EKF filter: the covariance P split by rows between the processes of a ``torch.distributed`` group.

One update costs two passes over P (X = P Jᵀ, then P −= Vᵀ V). With W processes each process owns a slice
of P and does those passes on its slice only; the m×n quantities that every process needs (J, X, V) are
small (m ≈ 1–20 labels) and are exchanged or recomputed identically everywhere. The filter itself is
therefore shared, not replicated (as deepmd-kit spreads its Kalman blocks over GPUs).

Layout. P is symmetric, and the filter kernels keep the *upper triangle* of each block valid
(:class:`~ekf_plugin.optim.kernels.BlasKernel`). A block of size n_b is cut into W row ranges
[c_k, c_{k+1}) of equal cost (:func:`triangle_row_split`; the first ranges are shorter, their rows longer), and
process k owns its range as a :class:`Piece`: the diagonal sub-block D = P[c_k:c_{k+1}, c_k:c_{k+1}] (upper
triangle valid, the filter kernel's storage) and the rectangle R = P[c_k:c_{k+1}, c_{k+1}:n_b] right of it
(full). Below the diagonal nothing is stored, so each process touches about 1/W of the triangle: the
traffic and the flops of an update are split, not only the labels. With many blocks (block-decoupled P) whole blocks are
assigned to processes instead, largest first to the least loaded (LPT on n_b²), whenever that balances
within 10 %.

One update (every process; ξ (m,) and J (m, n) identical on all of them)::

    Z[:m] = Xᵀ contributions:  D J_loᵀ (symm)  +  R J_restᵀ  into the own rows,  Rᵀ J_loᵀ  into the rows right
                               (both R products in one pass over R: FilterKernel.rect_xt)
    Z[m]  = diag D             (the own rows' diagonal of P; only after P's diagonal changed, else kept)
    all_reduce(Z, SUM)         # (m+1, n): X = P Jᵀ and diag P, identical on every process
    A = J X + R, L = chol(A), V = L⁻¹ Xᵀ, Δw = Vᵀ L⁻¹ ξ        # computed identically everywhere
    D −= V_loᵀ V_lo (syrk),  R −= V_loᵀ V_rest (gemm)           # own rows only

A sum with zeros is exact and gloo's all-reduce hands every process the same result, so all processes
compute the same A, V and Δw: their weights stay bitwise identical. The result equals the single-process
filter to round-off (the sums of X are split differently): 1e-10 after many updates in float64 (tested).

Memory per process for one dense block of n weights: the pieces (k-th range: h_k × (n − c_k) entries, the
diagonal block stored square) plus Z ((m+1)·n) and, while ``state_dict()`` runs, one full block. For W = 2
and n = 2827 (the study's water BPNN, float64, rows [0, 852) and [852, 2827)): 18.4 MiB and 29.8 MiB against
61.0 MiB for the whole P
(:meth:`ShardPlan.local_bytes`).

Labels split between processes (``EKF(label_split=True)``): every process draws the same labels of the same
structure, computes the rows of its contiguous share with :func:`split_rows`, and the shares are all-gathered,
so an update with m labels costs each process m/W Jacobian rows. :func:`split_rows` also checks that all
processes drew the same labels of the same input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from ekf_plugin.optim.kernels import FilterKernel
from ekf_plugin.optim.shared_memory import SharedMemoryGroup, all_gather, all_reduce_

__all__ = ["Piece", "ShardPlan", "plan_shards", "triangle_row_split", "split_rows", "sum_rows", "process_group_info"]


def process_group_info(group: Any = None) -> Tuple[int, int]:
    """(rank, world size) in ``group`` (the world by default; or a
    :class:`~ekf_plugin.optim.shared_memory.SharedMemoryGroup`), or (0, 1) without an initialised group."""
    if isinstance(group, SharedMemoryGroup):
        return group.rank, group.world
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


TRIANGLE_COST = 1.06  # cost of a stored triangle entry (thin_xt + syrk) over a rectangle entry (rect_xt + gemm), measured


def triangle_row_split(nb: int, world: int, tri_cost: float = TRIANGLE_COST) -> List[int]:
    """Row boundaries [0 = c_0 ≤ c_1 ≤ … ≤ c_W = nb] that cut the upper triangle of an nb×nb block into W
    row ranges of (nearly) equal cost. Range [a, c) costs ``tri_cost``·h(h+1)/2 + h·(nb − c) with h = c − a:
    its diagonal block goes through the symmetric kernels (``thin_xt``/``syrk``), per stored entry ``tri_cost``
    times the cost of an entry of the rectangle right of it (``rect_xt``, one pass, and ``gemm``). Measured on
    this project's CPU (n = 2827, one thread, float64): 0.86 (m = 10) and 1.09 (m = 1) since the rectangle has
    its own kernel (1.6 with two MKL GEMMs); 1 gives ranges of equal area (the first rows are longer, so their
    ranges are shorter). The default 1.06 (session 33, n = 2827, two processes passing over their pieces at the
    same time, medians of 40): X = P Jᵀ at m = 10 2.30–2.31 / 2.35 ms per process against 2.28–2.38 / 2.39–2.50
    with 1, P −= VᵀV 1.12–1.16 / 1.14 against 1.10–1.13 / 1.16–1.19, m = 1 0.73 / 0.67–0.69 against 0.71–0.73 /
    0.69–0.71 (the ranks' times: the slower sets the pace)."""
    if nb == 0:
        return [0] * (world + 1)

    def cost(a: int, c: int) -> float:
        h = c - a
        return tri_cost * h * (h + 1) / 2 + h * (nb - c)

    def cuts_for(limit: float) -> List[int]:
        cuts = [0]
        for _ in range(world - 1):
            a, lo, hi = cuts[-1], cuts[-1], nb  # the largest c with cost(a, c) <= limit (cost grows with c)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if cost(a, mid) <= limit else (lo, mid - 1)
            cuts.append(lo)
        return cuts + [nb]

    lo, hi = 0.0, cost(0, nb)  # bisect the largest range cost: the last range must fit under it too
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        cuts = cuts_for(mid)
        lo, hi = (lo, mid) if cost(cuts[-2], nb) <= mid else (mid, hi)
    return cuts_for(hi)


def plan_shards(blocks: Sequence[Tuple[int, int]], world: int) -> List[List[Tuple[int, int, int]]]:
    """Which rows of which block each process owns: per rank a list of ``(block index, r0, r1)`` (rows
    [r0, r1) of that block, block-local). Whole blocks by LPT on n_b² when that balances within 10 %, else
    every block cut into W triangle row ranges of equal cost (:func:`triangle_row_split`)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    sizes = [b - a for a, b in blocks]
    if len(blocks) >= 2 * world:
        load = [0] * world
        owned: List[List[Tuple[int, int, int]]] = [[] for _ in range(world)]
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i] ** 2):
            r = min(range(world), key=lambda r: load[r])
            load[r] += sizes[i] ** 2
            owned[r].append((i, 0, sizes[i]))
        if max(load) <= 1.1 * sum(load) / world:
            return [sorted(o) for o in owned]
    out: List[List[Tuple[int, int, int]]] = [[] for _ in range(world)]
    for i, nb in enumerate(sizes):
        cuts = triangle_row_split(nb, world)
        for r in range(world):
            if cuts[r + 1] > cuts[r]:
                out[r].append((i, cuts[r], cuts[r + 1]))
    return out


@dataclass(frozen=True)
class Piece:
    """Rows [lo, hi) of P (global indices) in the block that ends at ``end``: D (hi−lo, hi−lo), R (hi−lo, end−hi)."""

    block: int
    lo: int
    hi: int
    end: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


class ShardPlan:
    """The rows of P this process owns and the algebra on them (module docstring).

    The local tensors live in the optimizer state as the flat list ``[D_0, R_0, D_1, R_1, ...]`` (one pair per
    :class:`Piece`, in :attr:`pieces` order); the methods take that list, so the optimizer state stays the
    single owner of the storage.

    Args:
        blocks: the EKF's blocks [(start, stop), ...] (global weight indices).
        rank, world: this process and the number of processes.
        group: the ``torch.distributed`` process group (None: the world; unused when ``world == 1``) or a
            :class:`~ekf_plugin.optim.shared_memory.SharedMemoryGroup`.
        kernel: the filter kernel of the diagonal sub-blocks (BLAS: upper triangle only).
    """

    def __init__(self, blocks: Sequence[Tuple[int, int]], rank: int, world: int, group: Any, kernel: FilterKernel) -> None:
        self.blocks, self.rank, self.world, self.group, self.kernel = list(blocks), rank, world, group, kernel
        self.n = blocks[-1][1] if blocks else 0
        self.plans = plan_shards(self.blocks, world)
        self.pieces = [self._piece(b, r0, r1) for b, r0, r1 in self.plans[rank]]

    def _piece(self, b: int, r0: int, r1: int) -> Piece:
        a, end = self.blocks[b]
        return Piece(b, a + r0, a + r1, end)

    # ------------------------------------------------------------------ storage
    def local_bytes(self, rank: Optional[int] = None, itemsize: int = 8) -> int:
        """Bytes of the pieces of ``rank`` (default: this process)."""
        pieces = self.pieces if rank is None else [self._piece(*p) for p in self.plans[rank]]
        return sum(p.rows * (p.end - p.lo) for p in pieces) * itemsize

    def init(self, p0: float, dtype: torch.dtype, device) -> List[torch.Tensor]:
        """Local storage for P = p0·I: [D_0, R_0, ...]."""
        out: List[torch.Tensor] = []
        for p in self.pieces:
            out.append(torch.eye(p.rows, dtype=dtype, device=device).mul_(p0))  # (h, h)
            out.append(torch.zeros(p.rows, p.end - p.hi, dtype=dtype, device=device))  # (h, end − hi)
        return out

    def scatter(self, full_blocks: Sequence[torch.Tensor], dtype: torch.dtype, device) -> List[torch.Tensor]:
        """This process's pieces cut from full symmetric blocks (a state dict's ``P``); copies."""
        out: List[torch.Tensor] = []
        for p in self.pieces:
            a = self.blocks[p.block][0]
            Pb = full_blocks[p.block].to(device=device, dtype=dtype)
            out.append(Pb[p.lo - a : p.hi - a, p.lo - a : p.hi - a].clone())
            out.append(Pb[p.lo - a : p.hi - a, p.hi - a :].clone())
        return out

    def gather(self, local: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Full symmetric blocks assembled from every process's pieces (collective: every process must call
        it). Each block is all-reduced from its upper triangle (own rows, zeros elsewhere: the sum is exact)."""
        if not local:
            dtype, device = torch.float64, torch.device("cpu")
        else:
            dtype, device = local[0].dtype, local[0].device
        out = []
        for i, (a, b) in enumerate(self.blocks):
            U = torch.zeros(b - a, b - a, dtype=dtype, device=device)  # upper triangle of block i
            for j, p in enumerate(self.pieces):
                if p.block == i:
                    D, R = local[2 * j], local[2 * j + 1]
                    U[p.lo - a : p.hi - a, p.lo - a : p.hi - a] = torch.triu(self.kernel.full(D))
                    U[p.lo - a : p.hi - a, p.hi - a :] = R
            self._all_reduce(U)
            out.append(U + torch.triu(U, 1).T)  # (n_b, n_b) symmetric
        return out

    def _all_reduce(self, t: torch.Tensor) -> None:
        if self.world > 1:
            all_reduce_(t, self.group)

    def own_diagonal(self, local: Sequence[torch.Tensor]) -> torch.Tensor:
        """(n,) diag P of this process's rows, zeros elsewhere (strided reads of the D pieces: the caller keeps it
        while P's diagonal does not change)."""
        out = torch.zeros(self.n, dtype=local[0].dtype, device=local[0].device) if local else torch.zeros(self.n)
        for j, p in enumerate(self.pieces):
            out[p.lo : p.hi] = self.kernel.diagonal(local[2 * j])
        return out

    def add_diagonal_(self, local: Sequence[torch.Tensor], g: torch.Tensor) -> None:
        """Own rows of P ← P + diag(g) for g (n,) (the same g on every process)."""
        for j, p in enumerate(self.pieces):
            local[2 * j].diagonal().add_(g[p.lo : p.hi])

    # ------------------------------------------------------------------ one update
    def xt_and_diag(self, local: Sequence[torch.Tensor], J: torch.Tensor, own_diag: Optional[torch.Tensor] = None,
                    check: Optional[torch.Tensor] = None, diag: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(Xᵀ (m, n), diag P (n,)) for J (m, n), identical on every process (one all-reduce of Xᵀ and what is
        listed below); ``own_diag``: :meth:`own_diagonal` where the caller has it (else read from the D pieces);
        ``diag``: the whole diag P (n,) where the caller kept it from an earlier call and P's diagonal has not
        changed since (then it is not exchanged, and returned as given). ``check`` (k,): numbers that must agree
        on every process (e.g. sums of ξ and J), exchanged in the same all-reduce; RuntimeError where they do not."""
        m, n = J.shape[0], self.n
        k = 0 if check is None or self.world == 1 else check.numel()
        d = 0 if diag is not None else n
        Z = torch.empty(m * n + d + self.world * k, dtype=J.dtype, device=J.device)  # Xᵀ, [diag P], checks
        XT = Z[: m * n].view(m, n)  # (m, n)
        XT.zero_()
        if d:
            diag = Z[m * n : m * n + n]  # (n,)
            if own_diag is not None:
                diag.copy_(own_diag)
            else:
                diag.zero_()
        if k:
            seen = Z[m * n + d :]  # (W·k,)
            seen.zero_()
            seen[self.rank * k : (self.rank + 1) * k] = check.to(J.dtype)
        for j, p in enumerate(self.pieces):
            D, R = local[2 * j], local[2 * j + 1]
            Jlo = J[:, p.lo : p.hi]  # (m, h)
            XT[:, p.lo : p.hi] += self.kernel.xt(D, Jlo.contiguous())  # (m, h) = (D J_loᵀ)ᵀ
            if R.numel():
                X1, X2 = self.kernel.rect_xt(R, Jlo, J[:, p.hi : p.end])  # (m, h), (m, end − hi): one pass over R
                XT[:, p.lo : p.hi] += X1  # (R J_restᵀ)ᵀ
                XT[:, p.hi : p.end] += X2  # (Rᵀ J_loᵀ)ᵀ
            if d and own_diag is None:
                diag[p.lo : p.hi] = self.kernel.diagonal(D)
        self._all_reduce(Z)
        if k:
            got = Z[m * n + d :].view(self.world, k).tolist()  # (W, k): every process's check
            if any(not _same_numbers(row, got[self.rank]) for row in got):
                raise RuntimeError(
                    "EKF: the processes of a sharded filter got different labels for one update (ξ, J must be the "
                    "same on every process: label_split needs the same batch and label draws everywhere, "
                    "trainer=ddp_cpu_split and one task.seed); checks per process: " + str(got))
        return XT, diag

    def sub_gram_(self, local: Sequence[torch.Tensor], V: torch.Tensor) -> None:
        """Own rows of P ← P − Vᵀ V for V (m, n) (the same V on every process)."""
        for j, p in enumerate(self.pieces):
            D, R = local[2 * j], local[2 * j + 1]
            Vlo = V[:, p.lo : p.hi].contiguous()  # (m, h)
            self.kernel.sub_gram_(D, Vlo)
            if R.numel():
                self.kernel.rect_sub_gram_(R, Vlo, V[:, p.hi : p.end])  # (h, end − hi)

    def diagonal_blocks(self, local: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The D tensors (they hold P's diagonal: process noise and symmetrisation act on them)."""
        return list(local[0::2])


def _same_numbers(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two lists of floats are equal entry by entry, NaN equal to NaN."""
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def split_rows(
    fn: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
    idx: torch.Tensor,
    key: float = 0.0,
    group: Any = None,
    n: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Evaluate labels and their Jacobian rows on this process's share of ``idx`` and all-gather them.

    Every process must call it with the same ``idx`` (k,) (the same draws) and ``key`` (e.g. the structure
    index); process r evaluates ``fn(idx[s_r:s_{r+1}])`` → (values (k_r,), rows (k_r, n)) for its contiguous
    share, and the result is ``(values (k,), rows (k, n))`` in the order of ``idx``, identical on every
    process (one all-gather per process of ~k/W rows in their own dtype, float32 or float64, and a few float64
    numbers; ``n`` = the row length, needed with W > 1). Values and rows come back in the dtypes ``fn`` gives
    them (the same on every process). Raises RuntimeError when the processes disagree on ``idx`` or ``key``
    (different batches or label RNG states). Without an initialised group (or W = 1) it is just ``fn(idx)``.
    """
    rank, world = process_group_info(group)
    if world == 1:
        return fn(idx)
    if n is None:
        raise ValueError("split_rows needs the row length n with more than one process")
    k = idx.numel()
    cuts = [k * r // world for r in range(world + 1)]
    share = idx[cuts[rank] : cuts[rank + 1]]
    kmax = max(cuts[r + 1] - cuts[r] for r in range(world))
    values, rows = fn(share) if share.numel() else (None, None)
    device = idx.device if values is None else values.device
    if values is not None and rows.shape != (share.numel(), n):
        raise ValueError(f"split_rows: rows of shape {tuple(rows.shape)}, expected ({share.numel()}, {n})")
    # float64 message: [value dtype code, row dtype code (-1: no share here), key, idx (k,), values (kmax,)], then
    # the rows (kmax, n) in their own dtype (float32 rows fill the first half of that part: half the bytes to write
    # and read; the size is the same on every process, whatever dtype each has). The small part is built and read
    # as Python numbers: one operation each way instead of a dozen tensor operations (~5 µs each)
    head, v0 = 3 + k, 3 + k + kmax
    size = v0 + kmax * n  # float64 entries
    in_place = isinstance(group, SharedMemoryGroup) and device.type == "cpu" and size * 8 <= group.capacity
    if in_place:  # written straight into this process's slot of the segment; only the entries read are written
        buf = group.outbox(size * 8).view(torch.float64)
    else:
        buf = torch.zeros(size, dtype=torch.float64, device=device)
    small = [-1.0, -1.0, float(key), *map(float, idx.tolist())]
    if values is not None:
        small[:2] = float(_DTYPES.index(values.dtype)), float(_DTYPES.index(rows.dtype))
        small += values.detach().tolist()  # float32 and float64 values are exact as Python floats
        if n:
            _rows_part(buf, v0, share.numel(), n, rows.dtype).copy_(rows.detach())
    if device.type == "cpu":  # through NumPy's view of the same memory: ~1 µs against ~5 for a tensor operation
        buf.numpy()[: len(small)] = small
    else:
        buf[: len(small)] = torch.tensor(small, dtype=torch.float64, device=device)
    if in_place:
        out = [part.view(torch.float64) for part in group.post(size * 8)]  # views into the segment
    else:
        out = [torch.empty_like(buf) for _ in range(world)]
        all_gather(out, buf, group)
    heads = [(o.numpy() if device.type == "cpu" else o)[:v0].tolist() for o in out]  # each process's small part
    if any(h[2:head] != heads[rank][2:head] for h in heads):
        raise RuntimeError(
            "split_rows: the processes drew different labels or structures (label_split needs the same batch "
            "and the same label RNG on every process: trainer=ddp_cpu_split, one task.seed); "
            "key and labels per process: " + "; ".join(f"{h[2]:g}: {[int(x) for x in h[3:head]]}" for h in heads)
        )
    vcode, rcode = (int(max(h[i] for h in heads)) for i in range(2))
    all_values = torch.tensor([v for r, h in enumerate(heads) for v in h[head : head + cuts[r + 1] - cuts[r]]],
                              dtype=_DTYPES[vcode], device=device)  # (k,)
    all_rows = torch.empty(k, n, dtype=_DTYPES[rcode], device=device)  # (k, n): each share copied once
    for r, o in enumerate(out):
        if n and cuts[r + 1] > cuts[r]:
            all_rows[cuts[r] : cuts[r + 1]] = _rows_part(o, v0, cuts[r + 1] - cuts[r], n, _DTYPES[int(heads[r][1])])
    return all_values, all_rows


def _rows_part(buf: torch.Tensor, start: int, h: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(h, n) view of the rows of a :func:`split_rows` message ``buf`` (float64, rows from entry ``start``) in the
    rows' ``dtype`` (float32 or float64; any other travels as float64)."""
    part = buf[start:]
    if dtype == torch.float32:
        return part.view(torch.float32)[: h * n].view(h, n)
    return part[: h * n].view(h, n)


def sum_rows(
    fn: Callable[[int, int], Tuple[torch.Tensor, torch.Tensor]],
    key: float = 0.0,
    group: Any = None,
    n: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Labels and rows that are sums of terms, each process computing its share of the terms: ``fn(rank,
    world)`` → (values (k,), rows (k, n)) partial sums, summed over the processes (one all-reduce of
    (k + 1)·(n + 1) float64 numbers). For labels whose terms fall apart by construction, e.g. a BPNN energy
    (one label) as the sum of its element networks' contributions: process r evaluates the networks it is given,
    and their rows occupy disjoint columns, so the summed rows are exact. The result is identical on every
    process (the all-reduce hands every process the same sum); values come back in the dtype of ``fn``'s values,
    rows in the dtype of its rows. ``key`` identifies the input (e.g. the structure index) and is checked to
    agree (RuntimeError otherwise). Without an initialised group (or W = 1) it is just ``fn(0, 1)``."""
    rank, world = process_group_info(group)
    if world == 1:
        return fn(0, 1)
    if n is None:
        raise ValueError("sum_rows needs the row length n with more than one process")
    values, rows = fn(rank, world)
    k = values.numel()
    if rows.shape != (k, n):
        raise ValueError(f"sum_rows: rows of shape {tuple(rows.shape)}, expected ({k}, {n})")
    # row 0: each process's key in its own column (a sum of zeros elsewhere); rows 1..: [value, row (n,)]
    buf = torch.zeros(k + 1, max(1 + n, world), dtype=torch.float64, device=values.device)
    buf[0, rank] = float(key)
    buf[1:, 0] = values.detach().to(torch.float64)
    buf[1:, 1 : 1 + n] = rows.detach().to(torch.float64)
    all_reduce_(buf, group)
    keys = buf[0, :world]
    if not bool((keys == keys[rank]).all()):
        raise RuntimeError(
            "sum_rows: the processes evaluated different inputs (label_split needs the same batch on every "
            "process: trainer=ddp_cpu_split); keys per process: " + ", ".join(f"{float(x):g}" for x in keys))
    return buf[1:, 0].to(values.dtype), buf[1:, 1 : 1 + n].to(rows.dtype)


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # codes of split_rows' header
