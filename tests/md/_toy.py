"""A small SchNetPack model (SchNet + Atomwise + forces/stress) for convention tests.

Built in the test, with fixed seed; its weights are random, so it is a smooth but unphysical
potential: good for checking units, cell order, virial sign and protocol, not for physics.
"""

from __future__ import annotations

import numpy as np
import torch


def toy_model(cutoff: float = 4.0, seed: int = 0) -> torch.nn.Module:
    """SchNet(8 features, 2 interactions) + Atomwise energy + ContiguousForces(calc_stress=True); Å, eV."""
    import schnetpack as spk

    from ekf_plugin.compat import ContiguousForces

    torch.manual_seed(seed)
    rep = spk.representation.SchNet(
        n_atom_basis=8,
        n_interactions=2,
        radial_basis=spk.nn.GaussianRBF(n_rbf=10, cutoff=cutoff),
        cutoff_fn=spk.nn.CosineCutoff(cutoff),
    )
    model = spk.model.NeuralNetworkPotential(
        representation=rep,
        input_modules=[spk.atomistic.Strain(), spk.atomistic.PairwiseDistances()],
        output_modules=[
            spk.atomistic.Atomwise(n_in=8, output_key="energy"),
            ContiguousForces(calc_stress=True, energy_key="energy", force_key="forces", stress_key="stress"),
        ],
    )
    return model.double().eval()


def water_box(n_side: int = 2, spacing: float = 3.1, seed: int = 0):
    """(numbers (N,), positions (N, 3) Å, cell (3, 3) Å): n_side³ rigid-ish H2O on a jittered grid."""
    rng = np.random.default_rng(seed)
    mol = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    pos, z = [], []
    for ix in range(n_side):
        for iy in range(n_side):
            for iz in range(n_side):
                c = np.array([ix, iy, iz]) * spacing + rng.normal(0, 0.1, 3)
                pos.extend(mol + c)
                z.extend([8, 1, 1])
    cell = np.eye(3) * n_side * spacing
    return np.array(z), np.array(pos), cell


def gentle_toy_model(scale: float = 1e-3, cutoff: float = 4.0, seed: int = 0) -> torch.nn.Module:
    """:func:`toy_model` with its energy scaled by ``scale``: a weak smooth potential, so an NPT
    run stays close to an ideal gas instead of collapsing (a random SchNet is strongly attractive)."""
    model = toy_model(cutoff=cutoff, seed=seed)
    last = model.output_modules[0].outnet[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return model
