"""Which labels enter a Fisher spectrum: a fixed, seeded random subset of energy and force labels.

A label is one scalar target of the training loss: the energy of structure ``s`` (component ``-1``)
or one Cartesian force component ``c`` of structure ``s`` (``c = 3·atom + xyz``, 0 ≤ c < 3·n_atoms).
The selection depends only on ``seed`` and the data, never on the order in which structures are
later processed, so the same call picks the same labels in the callback, after a resume and in the
``ekf-plugin fisher`` command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import numpy as np

KINDS = ("energy", "forces", "both")
ENERGY_COMPONENT = -1  # component index marking an energy label


@dataclass(frozen=True)
class LabelSet:
    """Labels as two aligned integer arrays of shape (N,).

    Attributes:
        structure: index of the structure (into the data set the labels were drawn from).
        component: ``-1`` for the energy label, else the force component ``3·atom + xyz``.
    """

    structure: np.ndarray
    component: np.ndarray

    def __post_init__(self) -> None:
        s = np.asarray(self.structure, dtype=np.int64).reshape(-1)
        c = np.asarray(self.component, dtype=np.int64).reshape(-1)
        if s.shape != c.shape:
            raise ValueError(f"structure and component must have the same length, got {s.shape} and {c.shape}")
        if s.size and s.min() < 0:
            raise ValueError("structure indices must be >= 0")
        if c.size and c.min() < ENERGY_COMPONENT:
            raise ValueError("component indices must be -1 (energy) or >= 0 (force component)")
        object.__setattr__(self, "structure", s)
        object.__setattr__(self, "component", c)

    def __len__(self) -> int:
        return int(self.structure.size)

    @property
    def n_energy(self) -> int:
        return int((self.component == ENERGY_COMPONENT).sum())

    @property
    def n_forces(self) -> int:
        return int((self.component != ENERGY_COMPONENT).sum())

    def structures(self) -> List[int]:
        """Distinct structure indices, sorted."""
        return sorted(set(self.structure.tolist()))

    def by_structure(self) -> Dict[int, np.ndarray]:
        """Component indices per structure, in label order: {s: (k_s,) int array}."""
        out: Dict[int, list] = {}
        for s, c in zip(self.structure.tolist(), self.component.tolist()):
            out.setdefault(s, []).append(c)
        return {s: np.asarray(v, dtype=np.int64) for s, v in out.items()}

    def permuted(self, seed: int = 0) -> "LabelSet":
        """The same labels in another order (for checks that the spectrum ignores the order)."""
        p = np.random.default_rng(seed).permutation(len(self))
        return LabelSet(self.structure[p], self.component[p])

    def state(self) -> Dict[str, list]:
        """Plain lists (for checkpoints and JSON)."""
        return {"structure": self.structure.tolist(), "component": self.component.tolist()}


def split_counts(n_labels: int, kind: str, energy_fraction: float = 0.5) -> tuple:
    """(n_energy, n_forces) for ``n_labels`` labels of ``kind`` ('energy', 'forces' or 'both')."""
    if not isinstance(n_labels, (int, np.integer)) or isinstance(n_labels, bool) or n_labels < 1:
        raise ValueError(f"n_labels must be a positive integer, got {n_labels!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 < energy_fraction < 1.0:
        raise ValueError(f"energy_fraction must lie strictly between 0 and 1, got {energy_fraction!r}")
    if kind == "energy":
        return int(n_labels), 0
    if kind == "forces":
        return 0, int(n_labels)
    n_e = min(max(1, int(round(energy_fraction * n_labels))), n_labels - 1) if n_labels > 1 else 1
    return n_e, int(n_labels) - n_e


def sample_labels(
    n_structures: int,
    n_atoms_of: Callable[[int], int],
    n_labels: int,
    kind: str = "both",
    seed: int = 0,
    energy_fraction: float = 0.5,
    forces_per_structure: int = 10,
) -> LabelSet:
    """Draw a fixed random subset of labels.

    Structures are visited in one seeded random order. Energy labels come from the first
    ``n_energy`` structures of that order; force labels from the first structures too, up to
    ``forces_per_structure`` random components each (drawn with a generator seeded by
    ``(seed, s)``), so that few structures need a forward pass.

    Args:
        n_structures: number of structures to draw from (indices 0..n_structures-1).
        n_atoms_of: number of atoms of structure ``s`` (called only for visited structures).
        n_labels: total number of labels N (≥ 1).
        kind: 'energy', 'forces' or 'both' (split by ``energy_fraction``).
        seed: random seed.
        energy_fraction: share of energy labels when ``kind='both'``.
        forces_per_structure: force components taken per structure (≥ 1).

    Raises:
        ValueError: on bad arguments, or when the data hold fewer labels of a kind than asked for.
    """
    n_e, n_f = split_counts(n_labels, kind, energy_fraction)
    if n_structures < 1:
        raise ValueError("the data set holds no structures; cannot draw Fisher labels")
    if forces_per_structure < 1:
        raise ValueError(f"forces_per_structure must be >= 1, got {forces_per_structure!r}")
    if n_e > n_structures:
        raise ValueError(
            f"asked for {n_e} energy labels but the data hold only {n_structures} structures "
            "(one energy label each): lower n_labels or use kind='forces'"
        )
    order = np.random.default_rng(seed).permutation(n_structures)
    structure: List[int] = [int(s) for s in order[:n_e]]
    component: List[int] = [ENERGY_COMPONENT] * n_e
    left = n_f
    for s in order:
        if left == 0:
            break
        n_comp = 3 * int(n_atoms_of(int(s)))
        take = min(forces_per_structure, n_comp, left)
        picks = np.random.default_rng([seed, int(s)]).choice(n_comp, size=take, replace=False)
        structure += [int(s)] * take
        component += sorted(int(c) for c in picks)
        left -= take
    if left:
        raise ValueError(
            f"asked for {n_f} force labels but only {n_f - left} can be drawn with "
            f"forces_per_structure={forces_per_structure}: raise it or lower n_labels"
        )
    return LabelSet(np.asarray(structure), np.asarray(component))
