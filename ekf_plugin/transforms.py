"""SchNetPack data transforms of ekf-plugin (imported only when a data module is built).

:class:`MemoryCachedNeighborList` keeps each frame's neighbour list in memory after its first epoch: the
study's schedule visits every training frame hundreds of times, and on 192-atom water the matscipy list
costs about as much as an EKF energy update (~8 ms per step on one core).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

import schnetpack.properties as props
from schnetpack.transform import Transform

__all__ = ["MemoryCachedNeighborList"]


class MemoryCachedNeighborList(Transform):
    """Wrap a SchNetPack neighbour-list transform and remember its result per frame, in memory.

    The key is the dataset index ``_idx``; each entry also keeps the frame's positions, cell, atomic numbers
    and pbc as bytes, and a frame where any of them changed (bitwise) is recomputed (no stale lists, unlike a
    cache on disk keyed by index alone). Stored compactly: pair indices as int16/int32 and the periodic
    shifts as the few distinct shift vectors U (K, 3) int8 (K ≤ 127; 47 on the 192-atom water frames, whose
    cutoff exceeds half the box) plus one int8 code per pair, so a hit rebuilds ``offsets = (U @ cell)[codes]``
    (the (P, 3) @ (3, 3) product took ~0.15 ms of a 0.21 ms hit on a 192-atom frame, one core; the hit now
    takes 0.12 ms). Stored only where that equals the
    wrapped transform's offsets bitwise (else the full shifts S and ``S @ cell``, SchNetPack's own product),
    so a hit gives bitwise the same ``_idx_i``, ``_idx_j``, ``_offsets`` (Å) as a fresh list. A list whose
    offsets are not integer shifts of the cell is not cached.

    Args:
        neighbor_list: the transform to cache (e.g. ``MatScipyNeighborList(cutoff)``).
        max_bytes: stop caching new frames beyond this much memory (default 2 GiB; ~0.3 MB per 192-atom
            water frame at 6.36 Å).
        offsets_dtype: the dtype of the ``_offsets`` it returns (None: the wrapped list's, i.e. the positions').
            ``torch.float32`` before a ``CastTo32``, as :class:`~ekf_plugin.data.WaterDataModule` has it: the
            numbers that cast gives (a hit casts the K distinct offsets, then gathers P of them), without a
            (P, 3) float64 tensor and its cast on every hit (a 192-atom item with cold caches, one core, neighbour
            list and cast: 0.150 → 0.133 ms).
    """

    is_preprocessor: bool = True
    is_postprocessor: bool = False

    def __init__(self, neighbor_list: Transform, max_bytes: int = 2 * 2**30,
                 offsets_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.neighbor_list = neighbor_list
        self.offsets_dtype = offsets_dtype
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = self.misses = 0
        # per frame: (checksum, idx_i, idx_j, shifts (P, 3) int8 or distinct shifts U (K, 3) int8, codes (P,) int8
        # or None)
        self._cache: Dict[int, Tuple[Tuple[Any, ...], torch.Tensor, torch.Tensor, torch.Tensor,
                                     Optional[torch.Tensor]]] = {}

    @staticmethod
    def _checksum(inputs: Dict[str, torch.Tensor]) -> Tuple[Any, ...]:
        """The frame's positions, cell, atomic numbers and pbc as bytes (with dtypes and shapes): a hit needs
        them bitwise equal (~5 µs on 192 atoms; the weighted sums this replaces took ~70 µs a step)."""
        parts = []
        for key in (props.R, props.cell, props.Z, props.pbc):
            t = inputs.get(key)
            if t is not None:
                t = t.detach()
                parts += [str(t.dtype), tuple(t.shape), t.cpu().contiguous().numpy().tobytes()]
        return tuple(parts)

    def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        key = int(inputs[props.idx].reshape(-1)[0]) if props.idx in inputs else None
        check = self._checksum(inputs) if key is not None else None
        hit = self._cache.get(key) if key is not None else None
        cell = inputs[props.cell].view(3, 3)  # (3, 3) Å
        if hit is not None and hit[0] == check:
            _, idx_i, idx_j, shifts, codes = hit
            self.hits += 1
            inputs[props.idx_i] = idx_i.long()  # (P,)
            inputs[props.idx_j] = idx_j.long()  # (P,)
            inputs[props.offsets] = self._offsets(shifts, codes, cell.to(inputs[props.R].dtype),
                                                  self.offsets_dtype)  # (P, 3) Å
            return inputs
        self.misses += 1
        inputs = self.neighbor_list(inputs)
        if key is not None:
            self._store(key, check, inputs, cell)
        if self.offsets_dtype is not None:
            inputs[props.offsets] = inputs[props.offsets].to(self.offsets_dtype)  # (P, 3) Å
        return inputs

    @staticmethod
    def _offsets(shifts: torch.Tensor, codes: Optional[torch.Tensor], cell: torch.Tensor,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(P, 3) offsets in Å from stored shifts: ``S @ cell`` (codes None), else ``(U @ cell)[codes]``; cast to
        ``dtype`` (None: the cell's) before the gather (the same numbers as after it)."""
        if codes is None:
            off = torch.mm(shifts.to(cell.dtype), cell)  # (P, 3)
            return off if dtype is None else off.to(dtype)
        distinct = torch.mm(shifts.to(cell.dtype), cell)  # (K, 3)
        if dtype is not None:
            distinct = distinct.to(dtype)
        return distinct.index_select(0, codes.long())  # (P, 3)

    def _store(self, key: int, check: Tuple[Any, ...], inputs: Dict[str, torch.Tensor], cell: torch.Tensor) -> None:
        idx_i, idx_j, off = inputs[props.idx_i], inputs[props.idx_j], inputs[props.offsets]  # (P,), (P,), (P, 3)
        if off.numel():
            shifts = torch.linalg.solve(cell.T.to(torch.float64), off.T.to(torch.float64)).T.round()  # (P, 3)
            if shifts.abs().max() > 127 or not torch.equal(torch.mm(shifts.to(off.dtype), cell.to(off.dtype)), off):
                return  # not integer cell shifts (or too many images): leave uncached
        else:
            shifts = off.new_zeros(0, 3)
        shifts, codes = shifts.to(torch.int8), None  # (P, 3)
        if off.numel():
            s = shifts.long() + 128  # (P, 3) in [1, 255]; one int64 key per vector (unique of rows is ~30x slower)
            keys, inverse = torch.unique((s[:, 0] * 256 + s[:, 1]) * 256 + s[:, 2], return_inverse=True)  # (K,), (P,)
            distinct = (torch.stack([keys // 65536, keys // 256 % 256, keys % 256], 1) - 128).to(torch.int8)  # (K, 3)
            if distinct.shape[0] <= 127:
                codes = inverse.to(torch.int8)  # (P,)
                if torch.equal(self._offsets(distinct, codes, cell.to(off.dtype)), off):
                    shifts = distinct
                else:  # not bitwise SchNetPack's product here: keep S @ cell
                    codes = None
        n_atoms = int(inputs[props.R].shape[0])
        itype = torch.int16 if n_atoms < 2**15 else torch.int32
        entry = (check, idx_i.to(itype), idx_j.to(itype), shifts, codes)
        size = self._nbytes(entry)
        old = self._cache.pop(key, None)
        if old is not None:
            self.nbytes -= self._nbytes(old)
        if self.nbytes + size > self.max_bytes:
            return
        self._cache[key] = entry
        self.nbytes += size

    @staticmethod
    def _nbytes(entry) -> int:
        return (sum(t.numel() * t.element_size() for t in entry[1:] if t is not None)
                + sum(len(b) for b in entry[0] if isinstance(b, bytes)))

    def extra_repr(self) -> str:
        return f"{self.neighbor_list!r}, cached={len(self._cache)} frames, {self.nbytes / 2**20:.1f} MiB"
