"""MemoryCachedNeighborList: bitwise the lists of the wrapped transform, recomputed when a frame changes."""

from __future__ import annotations

import numpy as np
import torch
from ase.build import molecule

import schnetpack.properties as props
import schnetpack.transform as trn
from ekf_plugin.transforms import MemoryCachedNeighborList


def _frame(idx: int, seed: int = 0, box: float = 7.0):
    rng = np.random.default_rng(seed)
    atoms = molecule("H2O")
    atoms = atoms.repeat((1, 1, 1))
    pos = np.concatenate([atoms.positions + rng.uniform(0, box, 3) for _ in range(6)])
    z = np.tile(atoms.numbers, 6)
    return {
        props.idx: torch.tensor([idx]), props.Z: torch.as_tensor(z), props.R: torch.as_tensor(pos, dtype=torch.float64),
        props.cell: torch.eye(3, dtype=torch.float64).mul(box).reshape(1, 3, 3), props.pbc: torch.tensor([True] * 3),
        props.n_atoms: torch.tensor([len(z)]),
    }


def test_cached_lists_equal_fresh_ones_bitwise_and_follow_changes():
    plain = trn.MatScipyNeighborList(cutoff=4.0)  # cutoff > box/2: several images of a neighbour
    cached = MemoryCachedNeighborList(trn.MatScipyNeighborList(cutoff=4.0))
    for idx in (3, 8):
        ref = plain(_frame(idx, seed=idx))
        for _ in range(2):  # miss, then hit
            out = cached(_frame(idx, seed=idx))
            for k in (props.idx_i, props.idx_j, props.offsets):
                assert out[k].dtype == ref[k].dtype and torch.equal(out[k], ref[k]), k
    assert (cached.misses, cached.hits) == (2, 2)
    assert cached.nbytes > 0
    moved = _frame(3, seed=3)
    moved[props.R][0, 0] += 0.7
    out = cached(moved)
    assert cached.misses == 3, "a frame whose positions changed under the same _idx is recomputed"
    ref = plain(_frame(3, seed=3) | {props.R: moved[props.R]})
    assert torch.equal(out[props.idx_j], ref[props.idx_j]) and torch.equal(out[props.offsets], ref[props.offsets])
    for key, value in ((props.pbc, torch.tensor([True, True, False])), (props.Z, torch.as_tensor([8, 1, 1] * 6)[[1, 0, 2] * 6])):
        changed = _frame(8, seed=8) | {key: value}
        before = cached.misses
        out = cached(changed)
        assert cached.misses == before + 1, f"a frame whose {key} changed is recomputed"
        ref = plain(_frame(8, seed=8) | {key: value})
        assert torch.equal(out[props.idx_j], ref[props.idx_j]) and torch.equal(out[props.offsets], ref[props.offsets])


def test_memory_cap():
    cached = MemoryCachedNeighborList(trn.MatScipyNeighborList(cutoff=4.0), max_bytes=1)
    cached(_frame(1))
    cached(_frame(1))
    assert cached.hits == 0 and cached.nbytes == 0


def test_distinct_shift_form_is_bitwise_on_skewed_cells_and_stored_compactly():
    """Hits rebuild offsets from the few distinct shift vectors ((U @ cell)[codes]); on a triclinic cell in
    float32 and float64 they equal SchNetPack's fresh ``S @ cell`` bitwise, and the entry is the compact form."""
    rng = np.random.default_rng(4)
    cell = np.array([[7.0, 0.0, 0.0], [1.3, 6.8, 0.0], [-0.9, 0.7, 7.4]])
    for dtype in (torch.float32, torch.float64):
        frame = _frame(5, seed=5)
        frame[props.R] = torch.as_tensor(rng.uniform(0, 7.0, (18, 3)) @ np.linalg.inv(np.eye(3) * 7.0) @ cell,
                                         dtype=dtype)
        frame[props.cell] = torch.as_tensor(cell, dtype=dtype).reshape(1, 3, 3)
        ref = trn.MatScipyNeighborList(cutoff=4.0)({k: v.clone() for k, v in frame.items()})
        cached = MemoryCachedNeighborList(trn.MatScipyNeighborList(cutoff=4.0))
        cached({k: v.clone() for k, v in frame.items()})
        out = cached({k: v.clone() for k, v in frame.items()})
        assert cached.hits == 1
        for k in (props.idx_i, props.idx_j, props.offsets):
            assert out[k].dtype == ref[k].dtype and torch.equal(out[k], ref[k]), (dtype, k)
        _, _, _, distinct, codes = cached._cache[5]
        assert codes is not None and codes.shape[0] == ref[props.offsets].shape[0]
        assert 1 < distinct.shape[0] <= 27 and len(torch.unique(ref[props.offsets], dim=0)) == distinct.shape[0]


def test_float32_offsets_are_what_a_cast_gives_on_a_miss_and_a_hit():
    """``offsets_dtype=float32`` (the data module's setting, before CastTo32): hit and miss give the offsets that
    casting the wrapped list's float64 offsets gives, bitwise; the indices as before."""
    plain = trn.MatScipyNeighborList(cutoff=4.0)
    cached = MemoryCachedNeighborList(trn.MatScipyNeighborList(cutoff=4.0), offsets_dtype=torch.float32)
    ref = plain(_frame(2, seed=2))
    for _ in range(2):  # miss, then hit (the distinct-shift form: cutoff > box/2)
        out = cached(_frame(2, seed=2))
        assert out[props.offsets].dtype == torch.float32
        assert torch.equal(out[props.offsets], ref[props.offsets].to(torch.float32))
        assert torch.equal(out[props.idx_i], ref[props.idx_i]) and torch.equal(out[props.idx_j], ref[props.idx_j])
    assert (cached.misses, cached.hits) == (1, 1) and cached._cache[2][4] is not None
