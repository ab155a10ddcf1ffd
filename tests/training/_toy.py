"""A tiny SchNet potential and a small rattled-copper EMT data set for the task tests (Å, eV, eV/Å)."""

from __future__ import annotations

from pathlib import Path

import torch

import schnetpack as spk
import schnetpack.transform as trn
from ekf_plugin.compat import ContiguousForces

CUTOFF = 3.0  # Å


def toy_model(seed: int = 0) -> spk.model.NeuralNetworkPotential:
    """SchNet(8 features, 1 interaction) + energy sum + forces; ~1.3k weights."""
    torch.manual_seed(seed)
    rep = spk.representation.SchNet(
        n_atom_basis=8, n_interactions=1,
        radial_basis=spk.nn.GaussianRBF(n_rbf=8, cutoff=CUTOFF), cutoff_fn=spk.nn.CosineCutoff(CUTOFF),
    )
    return spk.model.NeuralNetworkPotential(
        representation=rep,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=8, output_key="energy"), ContiguousForces()],
    )


def outputs():
    rmse = lambda: {"rmse": spk.train.metrics.MeanSquaredError(squared=False)} if hasattr(spk.train, "metrics") else {}  # noqa: E731
    return [
        spk.task.ModelOutput("energy", loss_fn=torch.nn.MSELoss(), loss_weight=0.01, metrics={}),
        spk.task.ModelOutput("forces", loss_fn=torch.nn.MSELoss(), loss_weight=0.99, metrics={}),
    ]


def write_copper_database(path: Path, n_frames: int = 12, seed: int = 0) -> Path:
    """Rattled, strained 2×2×2 fcc Cu cells (32 atoms) labelled with ASE's EMT, as an ASEAtomsData db."""
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames, props = [], []
    for k in range(n_frames):
        a = bulk("Cu", "fcc", a=3.6 * rng.uniform(0.97, 1.03), cubic=True).repeat((2, 2, 2))
        a.rattle(0.12, seed=seed + k)
        a.calc = EMT()
        props.append({"energy": np.array([a.get_potential_energy()]), "forces": a.get_forces()})
        frames.append(a)
    db = spk.data.ASEAtomsData.create(
        str(path), distance_unit="Ang", property_unit_dict={"energy": "eV", "forces": "eV/Ang"}
    )
    db.add_systems(props, frames)
    return path


def toy_loaders(tmp: Path, n_frames: int = 12):
    """(train, val) loaders without shuffling (75/25) over the rattled-copper set."""
    db = write_copper_database(Path(tmp) / "cu.db", n_frames=n_frames)
    data = spk.data.ASEAtomsData(
        str(db), transforms=[trn.ASENeighborList(cutoff=CUTOFF), trn.CastTo32()],
    )
    n_train = int(0.75 * len(data))
    train = torch.utils.data.Subset(data, list(range(n_train)))
    val = torch.utils.data.Subset(data, list(range(n_train, len(data))))
    mk = lambda ds: spk.data.AtomsLoader(ds, batch_size=1, shuffle=False, num_workers=0)  # noqa: E731
    return mk(train), mk(val)
