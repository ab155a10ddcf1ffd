"""A tiny SchNet potential and the lead's built-in flexible-water data for the task tests (Å, eV)."""

from __future__ import annotations

from pathlib import Path

import torch

import schnetpack as spk
import schnetpack.transform as trn
from ekf_plugin.compat import ContiguousForces
from ekf_plugin.demo import write_demo_database

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


def toy_loaders(tmp: Path, n_frames: int = 12):
    """(train, val) loaders without shuffling over the demo water set (2³ molecules)."""
    db = write_demo_database(Path(tmp) / "water.db", n_frames=n_frames)
    data = spk.data.ASEAtomsData(
        str(db), transforms=[trn.ASENeighborList(cutoff=CUTOFF), trn.CastTo32()],
    )
    n_train = int(0.75 * len(data))
    train = torch.utils.data.Subset(data, list(range(n_train)))
    val = torch.utils.data.Subset(data, list(range(n_train, len(data))))
    mk = lambda ds: spk.data.AtomsLoader(ds, batch_size=1, shuffle=False, num_workers=0)  # noqa: E731
    return mk(train), mk(val)
