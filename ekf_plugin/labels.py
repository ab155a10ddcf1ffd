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


def grouped_force_errors(
    outputs: Dict[str, torch.Tensor],
    batch: Dict[str, torch.Tensor],
    key: str = "forces",
    n_groups: int = 4,
    group_size: int = 6,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Force errors of ``n_groups`` random groups of ``group_size`` atoms each: shape (G,), force units.

    ξ_g = mean over the 3·S components of the group's atoms of abs(F̂ − F) (graph kept), so its gradient is
    the signed sum mean sign(F̂ − F)·∂F̂/∂θ: one Jacobian row (one backward pass) stands for 3·S force
    components (the reduced-row update of LKF/RLEKF, Hu et al., AAAI 2023; deepmd-kit ``KFWrapper``).
    Atoms are drawn from the whole batch without replacement (with replacement when the batch has
    fewer than G·S atoms), with the CPU ``generator``.
    """
    err = (outputs[key] - batch[key]).reshape(-1, 3)  # (N, 3)
    groups = draw_force_groups(err.shape[0], n_groups, group_size, generator, err.device)  # (G, S)
    return group_errors(err, groups)  # (G,)


def group_errors(err: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """ξ_g = mean abs over the 3·S force components of group g: err (N, 3) force errors, groups (G, S) atom
    indices; shape (G,), force units (:func:`grouped_force_errors`)."""
    return err[groups].abs().mean(dim=(1, 2))  # (G,)


def draw_force_groups(
    n_atoms: int,
    n_groups: int,
    group_size: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """(G, S) atom indices of :func:`grouped_force_errors`' groups, drawn from the batch's ``n_atoms`` atoms
    without replacement (with replacement when there are fewer than G·S) with the CPU ``generator``."""
    if n_groups < 1 or group_size < 1:
        raise ValueError(f"n_groups and group_size must be >= 1, got {n_groups}, {group_size}")
    k = n_groups * group_size
    if k <= n_atoms:
        atoms = torch.randperm(n_atoms, generator=generator)[:k]  # (G·S,)
    else:
        atoms = torch.randint(n_atoms, (k,), generator=generator)  # (G·S,)
    return atoms.view(n_groups, group_size).to(device)  # (G, S)


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
