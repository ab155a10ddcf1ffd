"""Label errors ξ = ŷ − y of a SchNetPack model output, one entry per label (energy or force component).

Shared by the EKF training task and the Fisher-information analysis. Units are the model's working
units (eV, eV/Å by default); energies can be taken per atom.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

IDX_M = "_idx_m"
N_ATOMS = "_n_atoms"


def energy_errors(
    outputs: Dict[str, torch.Tensor],
    batch: Dict[str, torch.Tensor],
    key: str = "energy",
    per_atom: bool = False,
) -> torch.Tensor:
    """Energy errors, one per structure: shape (B,), in energy units (per atom if ``per_atom``)."""
    err = (outputs[key] - batch[key]).reshape(-1)  # (B,)
    if per_atom:
        err = err / batch[N_ATOMS].to(err.dtype)  # (B,)
    return err


def force_errors(
    outputs: Dict[str, torch.Tensor],
    batch: Dict[str, torch.Tensor],
    key: str = "forces",
    n_components: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Force-component errors: shape (k,), in force units.

    Args:
        n_components: draw this many of the 3N Cartesian components at random without
            replacement (all of them if ``None`` or larger than 3N).
        generator: CPU ``torch.Generator`` for reproducible draws.
    """
    err = (outputs[key] - batch[key]).reshape(-1)  # (3N,)
    return err[draw_components(err.numel(), n_components, generator).to(err.device)]  # (k,)


def draw_components(
    n_total: int, n_components: Optional[int], generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """(k,) distinct flat indices into the 3N force components (atom = i // 3, Cartesian axis = i % 3), CPU.

    All of them in order (no random draw) if ``n_components`` is ``None`` or >= ``n_total``; else
    ``n_components`` drawn at random without replacement.
    """
    if n_components is None or n_components >= n_total:
        return torch.arange(n_total)  # (3N,)
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    return torch.randperm(n_total, generator=generator)[:n_components]  # (k,)
