"""Small float64 GNN systems for the reduced-row tests: rattled clusters as one SchNetPack batch and
PaiNN/SchNet potentials with SchNetPack's Forces (or ekf_plugin's ContiguousForces with stress)."""

from __future__ import annotations

import torch

import schnetpack as spk
from ekf_plugin.compat import ContiguousForces

CUTOFF = 3.0


def frames(n_atoms=(9, 7), seed=0):
    """Rattled small clusters as one SchNetPack batch (float64), with random reference labels."""
    from schnetpack.data.loader import _atoms_collate_fn

    g = torch.Generator().manual_seed(seed)
    items = []
    for k, n in enumerate(n_atoms):
        side = round(n ** (1 / 3)) + 1
        grid = torch.stack(torch.meshgrid(*[torch.arange(side, dtype=torch.float64)] * 3, indexing="ij"), -1).reshape(-1, 3)
        pos = 1.6 * grid[:n] + 0.15 * torch.randn(n, 3, generator=g, dtype=torch.float64)
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = (i != j) & ((pos[i] - pos[j]).norm(dim=-1) < CUTOFF)
        items.append({
            spk.properties.Z: torch.tensor([1, 8] * (n // 2) + [8] * (n % 2)),
            spk.properties.R: pos,
            spk.properties.cell: torch.zeros(1, 3, 3, dtype=torch.float64),
            spk.properties.pbc: torch.zeros(1, 3, dtype=torch.bool),
            spk.properties.n_atoms: torch.tensor([n]),
            spk.properties.idx: torch.tensor([k]),
            spk.properties.idx_i: i[keep], spk.properties.idx_j: j[keep],
            spk.properties.offsets: torch.zeros(int(keep.sum()), 3, dtype=torch.float64),
            "energy": torch.randn(1, generator=g, dtype=torch.float64),
            "forces": torch.randn(n, 3, generator=g, dtype=torch.float64),
        })
    return _atoms_collate_fn(items)


def model(kind: str, stress: bool = False):
    torch.manual_seed(0)
    rbf, fcut = spk.nn.GaussianRBF(6, CUTOFF), spk.nn.CosineCutoff(CUTOFF)
    if kind == "painn":
        rep = spk.representation.PaiNN(n_atom_basis=8, n_interactions=2, radial_basis=rbf, cutoff_fn=fcut)
    else:
        rep = spk.representation.SchNet(n_atom_basis=8, n_interactions=2, radial_basis=rbf, cutoff_fn=fcut)
    forces = ContiguousForces(calc_stress=stress) if stress else spk.atomistic.Forces()
    model = spk.model.NeuralNetworkPotential(
        representation=rep, input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=8, output_key="energy"), forces],
    ).double()
    model.train()
    return model
