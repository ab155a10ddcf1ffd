"""Small water systems and a batch builder shared by the BPNN tests (Å)."""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms

import ekf_plugin.compat  # noqa: F401
import schnetpack as spk


def water_pair(pbc: bool = True, seed: int = 2) -> Atoms:
    """Two rattled water molecules; periodic 5.5 × 5.0 × 5.2 Å box when ``pbc``."""
    atoms = Atoms(
        "OH2OH2",
        positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0], [2.8, 0.3, 0.1], [3.3, 1.0, 0.2], [3.2, -0.6, 0.3]],
        cell=[5.5, 5.0, 5.2] if pbc else None,
        pbc=pbc,
    )
    atoms.rattle(0.05, seed=seed)
    return atoms


def water_cluster(n: int = 3, seed: int = 0) -> Atoms:
    """n water molecules on a line, 2.9 Å apart, randomly oriented, no cell."""
    rng = np.random.default_rng(seed)
    pos = []
    for m in range(n):
        q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        mol = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]) @ q.T
        pos += list(mol + [2.9 * m, 0.3 * m, 0])
    return Atoms("OH2" * n, positions=pos)


def converter(model, dtype=torch.float64):
    """SchNetPack AtomsConverter with a neighbour list at the model's cutoff."""
    cutoff = float(model.representation.cutoff) + 0.01
    return spk.interfaces.AtomsConverter(spk.transform.MatScipyNeighborList(cutoff=cutoff), dtype=dtype)


def randomise_scaling(model, seed: int = 0) -> None:
    """Non-trivial per-function scaling so networks see O(1) inputs."""
    g = torch.Generator().manual_seed(seed)
    rep = model.representation
    with torch.no_grad():
        rep.scale_weight.copy_(torch.rand(rep.scale_weight.shape, generator=g, dtype=torch.float64) + 0.5)
        rep.scale_bias.copy_(torch.rand(rep.scale_bias.shape, generator=g, dtype=torch.float64) - 0.5)
