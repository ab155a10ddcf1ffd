"""The study's label schedule: which labels one update uses, and the weighted error vector ξ.

Shao et al. (2021), Sec. II.A and SI Table S3: each update uses either one energy label or ten force
components drawn at random from one structure, chosen at random in about equal numbers; the error
vector is ξ = √(c/n)(ŷ − y) with n the number of labels of that kind in the update and c_E/c_F = 0.28
in atomic units (Hartree, Bohr).

Units. Working units are eV and Å. The table gives only the ratio, in a.u.: c_E/c_F = 0.28 Bohr⁻²
(c_E multiplies Ha², c_F multiplies (Ha/Bohr)²). We take c_F = 1 Bohr²/Ha² and c_E = 0.28 Ha⁻² (an
assumption: the absolute scale is not given) and convert them so that ξ is numerically the same as in
atomic units, hence the study's η keeps its meaning:

* c_E = 0.28 / Ha²          = 3.7814e-4 eV⁻²     (:data:`C_ENERGY_EV`)
* c_F = Bohr² / Ha²         = 3.7818e-4 Å²/eV²   (:data:`C_FORCES_EV_ANG`)
* c_E/c_F = 0.28 / Bohr²    = 0.99990 Å⁻²        (the 0.28 Bohr⁻² ratio becomes ≈ 1 in eV/Å)

The energy label is the total energy of the structure (PiNN's default, ``use_e_per_atom=False``);
``energy_per_atom=True`` uses E/N instead.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ekf_plugin.labels import IDX_M, N_ATOMS, energy_errors, force_errors
from ekf_plugin.units import BOHR, HARTREE

C_RATIO_AU = 0.28  # c_E/c_F in Bohr⁻² (SI Table S3, PiNN row)
C_FORCES_AU = 1.0  # Bohr²/Ha² (assumed absolute scale)
C_ENERGY_EV = C_RATIO_AU * C_FORCES_AU / HARTREE**2  # eV⁻²
C_FORCES_EV_ANG = C_FORCES_AU * BOHR**2 / HARTREE**2  # Å²/eV²

ENERGY, FORCES = 0, 1


def draw_kinds(n_structures: int, energy_fraction: float, generator: torch.Generator) -> List[int]:
    """Per structure: ENERGY with probability ``energy_fraction``, else FORCES (CPU generator)."""
    u = torch.rand(n_structures, generator=generator)  # (B,)
    return [ENERGY if float(v) < energy_fraction else FORCES for v in u]


def weighted_errors(
    pred: Dict[str, torch.Tensor],
    batch: Dict[str, torch.Tensor],
    kinds: List[int],
    generator: torch.Generator,
    energy_key: str = "energy",
    forces_key: str = "forces",
    n_force_components: int = 10,
    c_energy: float = C_ENERGY_EV,
    c_forces: float = C_FORCES_EV_ANG,
    energy_per_atom: bool = False,
) -> torch.Tensor:
    """ξ = √(c/n)(ŷ − y) for the labels drawn per structure; shape (m,), graph kept.

    Energy structures contribute one entry √c_E·ΔE [ΔE in eV, or eV/atom]; force structures
    ``n_force_components`` entries √(c_F/k)·ΔF [ΔF in eV/Å], drawn without replacement.
    """
    parts = []
    e_err: Optional[torch.Tensor] = None
    idx_m = batch[IDX_M]  # (N_total,)
    for b, kind in enumerate(kinds):
        if kind == ENERGY:
            if e_err is None:
                e_err = energy_errors(pred, batch, key=energy_key, per_atom=energy_per_atom)  # (B,)
            parts.append(e_err[b : b + 1] * c_energy**0.5)  # (1,)
        else:
            sel = idx_m == b  # (N_total,)
            sub_p = {forces_key: pred[forces_key][sel]}
            sub_b = {forces_key: batch[forces_key][sel]}
            f = force_errors(sub_p, sub_b, key=forces_key, n_components=n_force_components, generator=generator)
            parts.append(f * (c_forces / f.numel()) ** 0.5)  # (k,)
    return torch.cat(parts)


def atoms_per_structure(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """N_b as float, shape (B,)."""
    return batch[N_ATOMS].to(torch.get_default_dtype())
