"""ASE frames → per-structure SchNetPack input dicts (the format a SchNetPack dataset returns).

Positions and cell in Å; targets, when the frame carries them (``atoms.calc``), as ``energy`` (1,)
in eV and ``forces`` (n_atoms, 3) in eV/Å. Frames in other units must be converted before.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


def atoms_to_structure(atoms, transforms: Sequence, index: int = 0) -> Dict[str, torch.Tensor]:
    """One ``ase.Atoms`` → input dict, built like ``schnetpack.interfaces.AtomsConverter`` does,
    then passed through ``transforms`` (neighbor list, casting, ...)."""
    from schnetpack import properties as P

    inputs = {
        P.n_atoms: torch.tensor([len(atoms)]),
        P.Z: torch.from_numpy(np.asarray(atoms.get_atomic_numbers())),
        P.R: torch.from_numpy(np.asarray(atoms.get_positions())),
        P.cell: torch.from_numpy(np.asarray(atoms.get_cell().array)).view(-1, 3, 3),
        P.pbc: torch.from_numpy(np.asarray(atoms.get_pbc())).view(-1, 3),
        P.idx: torch.tensor([index]),
    }
    calc = atoms.calc
    if calc is not None and "energy" in getattr(calc, "results", {}):
        inputs["energy"] = torch.tensor([float(calc.results["energy"])], dtype=torch.float64)  # (1,) eV
    if calc is not None and "forces" in getattr(calc, "results", {}):
        inputs["forces"] = torch.from_numpy(np.asarray(calc.results["forces"], dtype=np.float64))  # (n, 3) eV/Å
    for t in transforms:
        inputs = t(inputs)
    return inputs


def frames_to_structures(
    frames: Sequence, cutoff: float, dtype: torch.dtype = torch.float32, extra_transforms: Optional[Sequence] = None
) -> List[Dict[str, torch.Tensor]]:
    """Frames → input dicts with a neighbor list of radius ``cutoff`` (Å), cast to ``dtype``.

    matscipy's neighbour list (SchNetPack's ``MatScipyNeighborList``; about 0.1 s against 2 s for ASE's on a
    192-atom water frame, measured on a loaded 2-core VM) for periodic frames, ASE's for the others."""
    from schnetpack.transform import ASENeighborList, CastTo32, CastTo64, MatScipyNeighborList

    cast = CastTo32() if dtype == torch.float32 else CastTo64()
    periodic = [MatScipyNeighborList(cutoff=cutoff), *(extra_transforms or []), cast]
    other = [ASENeighborList(cutoff=cutoff), *(extra_transforms or []), cast]
    return [atoms_to_structure(a, periodic if a.pbc.all() else other, i) for i, a in enumerate(frames)]
