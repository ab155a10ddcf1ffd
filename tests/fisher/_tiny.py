"""Tiny SchNetPack models and ASE data for the Fisher tests (EMT copper: Å, eV, eV/Å)."""

from __future__ import annotations

import numpy as np
import torch

CUTOFF = 3.0  # Å


def cu_frames(n: int = 6, seed: int = 0):
    """Rattled fcc Cu cells (4 atoms) labelled with ASE's EMT."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
        frames.append(atoms)
    return frames


def tiny_model(n_atom_basis: int = 4, n_hidden: int = 4, seed: int = 0, dtype=torch.float64, n_rbf: int = 6):
    """SchNet (1 interaction) + Atomwise + ContiguousForces: a few hundred weights."""
    import schnetpack as spk

    from ekf_plugin.compat import ContiguousForces

    torch.manual_seed(seed)
    rep = spk.representation.SchNet(
        n_atom_basis=n_atom_basis,
        n_interactions=1,
        radial_basis=spk.nn.GaussianRBF(n_rbf=n_rbf, cutoff=CUTOFF),
        cutoff_fn=spk.nn.CosineCutoff(CUTOFF),
    )
    model = spk.model.NeuralNetworkPotential(
        representation=rep,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[
            spk.atomistic.Atomwise(n_in=n_atom_basis, n_hidden=n_hidden, output_key="energy"),
            ContiguousForces(energy_key="energy", force_key="forces"),
        ],
    )
    return model.to(dtype).eval()


def structures(frames, dtype=torch.float64):
    from ekf_plugin.fisher.structures import frames_to_structures

    return frames_to_structures(frames, cutoff=CUTOFF, dtype=dtype)


EXPERIMENT = """# @package _global_
defaults:
  - override /model: nnp
  - override /model/representation: schnet
  - override /logger: csv
globals:
  cutoff: 3.0
  lr: 5e-3
  energy_key: energy
  forces_key: forces
run:
  path: runs
data:
  datapath: {db}
  batch_size: 4
  num_train: 12
  num_val: 8
  num_test: 4
  num_workers: 0
  num_val_workers: 0
  num_test_workers: 0
  distance_unit: Ang
  property_units: {{energy: eV, forces: eV/Ang}}
  transforms:
    - _target_: schnetpack.transform.RemoveOffsets
      property: energy
      remove_mean: true
    - _target_: schnetpack.transform.ASENeighborList
      cutoff: ${{globals.cutoff}}
    - _target_: schnetpack.transform.CastTo32
model:
  representation:
    n_atom_basis: 8
    n_interactions: 1
    radial_basis: {{n_rbf: 6}}
  output_modules:
    - _target_: schnetpack.atomistic.Atomwise
      output_key: energy
      n_in: ${{model.representation.n_atom_basis}}
      aggregation_mode: sum
    - _target_: ekf_plugin.compat.ContiguousForces
      energy_key: energy
      force_key: forces
  postprocessors:
    - _target_: schnetpack.transform.CastTo64
    - _target_: schnetpack.transform.AddOffsets
      property: energy
      add_mean: true
task:
  scheduler_cls: null
  scheduler_args: null
  scheduler_monitor: null
  outputs:
    - _target_: schnetpack.task.ModelOutput
      name: energy
      loss_fn: {{_target_: torch.nn.MSELoss}}
      metrics: {{mae: {{_target_: torchmetrics.regression.MeanAbsoluteError}}}}
      loss_weight: 0.1
    - _target_: schnetpack.task.ModelOutput
      name: forces
      loss_fn: {{_target_: torch.nn.MSELoss}}
      metrics: {{mae: {{_target_: torchmetrics.regression.MeanAbsoluteError}}}}
      loss_weight: 0.9
trainer:
  accelerator: cpu
  max_epochs: 2
  enable_progress_bar: false
  enable_model_summary: false
"""


def write_experiment(root, n_frames: int = 24):
    """ASE db of EMT copper + ``configs/experiment/fisher_tiny.yaml`` in ``root`` (spktrain's $PWD)."""
    from pathlib import Path

    from schnetpack.data import ASEAtomsData

    root = Path(root).resolve()
    db = root / "data" / "cu.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    frames = cu_frames(n_frames)
    props = [{"energy": np.array([a.get_potential_energy()]), "forces": a.get_forces()} for a in frames]
    data = ASEAtomsData.create(str(db), distance_unit="Ang", property_unit_dict={"energy": "eV", "forces": "eV/Ang"})
    data.add_systems(props, frames)
    exp = root / "configs" / "experiment" / "fisher_tiny.yaml"
    exp.parent.mkdir(parents=True, exist_ok=True)
    exp.write_text(EXPERIMENT.format(db=db))
    return db
