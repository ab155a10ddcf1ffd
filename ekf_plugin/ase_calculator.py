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
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes


class EkfCalculator(Calculator):
    """ASE calculator around :class:`ekf_plugin.evaluation.ModelEvaluator`.

    Args:
        model: model path or ``AtomisticModel``.
        device: torch device (default CPU).
        **kw: passed to :class:`~ekf_plugin.evaluation.ModelEvaluator` (``dtype``, ``cutoff``,
            ``neighbor_list``, ``threads``, ``trust_pickle``).
        covariance: the EKF covariance (a file, a :class:`~ekf_plugin.uncertainty.Covariance`, or ``True`` for
            ``<model>.cov.pt``): then ``results["energy_uncertainty"]`` (σ_E, eV) on every call, and on request
            ``forces_uncertainty`` ((N,) σ per atom, eV/Å) and ``forces_uncertainty_components`` ((N, 3), eV/Å);
            σ = √(J P Jᵀ), docs/uncertainty.md. None (default): no uncertainty.
        uncertainty_forces: compute the force σ on every call (3·N Jacobian rows), not only on request.

    Loading a path runs no code from the file (see :func:`ekf_plugin.models.load_model`; a pickle outside
    the allow-list needs ``trust_pickle=True``). ``calculate`` raises ``ValueError`` for a structure without
    atoms or with NaN/inf positions or cell, and
    :class:`~ekf_plugin.evaluation.NonFiniteOutputError` (a ``ValueError``) when the model returns NaN/inf.
    """

    implemented_properties: List[str] = ["energy", "free_energy", "forces", "stress", "energy_uncertainty",
                                         "forces_uncertainty", "forces_uncertainty_components"]

    def __init__(self, model: Any, device: Optional[str] = None, covariance: Any = None,
                 uncertainty_forces: bool = False, **kw: Any) -> None:
        super().__init__()
        from .evaluation import ModelEvaluator

        self.evaluator = ModelEvaluator(model, device=device, **kw)
        self.uncertainty = None  # PredictiveUncertainty when a covariance is given
        self.uncertainty_forces = bool(uncertainty_forces)
        if covariance is not None and covariance is not False:
            from .uncertainty import PredictiveUncertainty, default_path

            if covariance is True:
                if not isinstance(model, (str, os.PathLike)):
                    raise ValueError("covariance=True reads <model>.cov.pt and needs a model path; pass the covariance file")
                covariance = default_path(model)
            self.uncertainty = PredictiveUncertainty(self.evaluator, covariance)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        periodic = bool(a.pbc.any())
        res = self.evaluator(a.numbers, a.positions, a.cell.array if periodic else None, pbc=a.pbc)
        self.results = {"energy": res.energy, "free_energy": res.energy, "forces": res.forces}
        if res.stress is not None:
            s = 0.5 * (res.stress + res.stress.T)  # (3, 3) eV/Å³
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        asked = [p for p in properties if "_uncertainty" in p]
        if self.uncertainty is None:
            if asked:
                raise PropertyNotImplementedError(f"{asked[0]} needs the EKF covariance: create the calculator with "
                                                  "covariance=<model>.cov.pt (or covariance=True)")
            return
        forces = self.uncertainty_forces or any(p.startswith("forces_uncertainty") for p in properties)
        u = self.uncertainty(a.numbers, a.positions, a.cell.array if periodic else None, pbc=a.pbc, forces=forces)
        self.results["energy_uncertainty"] = u.energy_std  # eV
        if forces:
            self.results["forces_uncertainty"] = u.forces_std_atoms  # (N,) eV/Å
            self.results["forces_uncertainty_components"] = u.forces_std  # (N, 3) eV/Å


def calculator(path: Union[str, os.PathLike, Any], device: Optional[str] = None, **kw: Any) -> EkfCalculator:
    """An ASE calculator for a trained model (path or ``AtomisticModel``); see :class:`EkfCalculator`."""
    return EkfCalculator(path, device=device, **kw)
