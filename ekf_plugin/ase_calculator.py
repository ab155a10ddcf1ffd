"""An ASE calculator for any model the plugin can load (``spktrain`` ``best_model``, our export,
n2p2 potential directories): ``ekf_plugin.calculator(path)`` (this module is named
``ase_calculator`` so that the package attribute ``calculator`` stays the function).

Results in ASE units: ``energy``/``free_energy`` in eV, ``forces`` in eV/Å (N, 3) and ``stress``
in eV/Å³ (Voigt, 6; ASE's sign: ``dE/dε / V``), computed in float64 with a minimum-image
neighbor list, so unwrapped positions are fine. SchNetPack's own ``SpkCalculator`` needs an
``AtomsConverter`` with a neighbor-list transform and float32 by default; this one needs only the
model.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Union

import numpy as np
from ase.calculators.calculator import Calculator, all_changes


class EkfCalculator(Calculator):
    """ASE calculator around :class:`ekf_plugin.evaluation.ModelEvaluator`.

    Args:
        model: model path or ``AtomisticModel``.
        device: torch device (default CPU).
        **kw: passed to :class:`~ekf_plugin.evaluation.ModelEvaluator` (``dtype``, ``cutoff``,
            ``neighbor_list``, ``threads``, ``trust_pickle``).

    Loading a path runs no code from the file (see :func:`ekf_plugin.models.load_model`; a pickle outside
    the allow-list needs ``trust_pickle=True``). ``calculate`` raises ``ValueError`` for a structure without
    atoms or with NaN/inf positions or cell, and
    :class:`~ekf_plugin.evaluation.NonFiniteOutputError` (a ``ValueError``) when the model returns NaN/inf.
    """

    implemented_properties: List[str] = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: Any, device: Optional[str] = None, **kw: Any) -> None:
        super().__init__()
        from .evaluation import ModelEvaluator

        self.evaluator = ModelEvaluator(model, device=device, **kw)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        periodic = bool(a.pbc.any())
        res = self.evaluator(a.numbers, a.positions, a.cell.array if periodic else None, pbc=a.pbc)
        self.results = {"energy": res.energy, "free_energy": res.energy, "forces": res.forces}
        if res.stress is not None:
            s = 0.5 * (res.stress + res.stress.T)  # (3, 3) eV/Å³
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


def calculator(path: Union[str, os.PathLike, Any], device: Optional[str] = None, **kw: Any) -> EkfCalculator:
    """An ASE calculator for a trained model (path or ``AtomisticModel``); see :class:`EkfCalculator`."""
    return EkfCalculator(path, device=device, **kw)
