"""Uncertainty along an MD run: σ_E (and the largest per-atom σ_F) every N force calls, for i-PI's extras.

:class:`UncertaintyMonitor` wraps :class:`~ekf_plugin.uncertainty.predictive.PredictiveUncertainty` for an MD
client: it computes σ every ``every`` calls (the cost of one Jacobian row and one pass over P for σ_E;
3·N rows for σ_F), returns the latest values on every call (so each step's extras carry the same keys,
which i-PI's ``extras`` output needs), and logs a warning when σ_E per atom exceeds ``threshold``: the model
is then outside the region its training data determined.

Extras keys (JSON, units in the names; i-PI records them as text, e.g. ``<trajectory filename='unc'
stride='10' extra_type='ekf_sigma_E_eV'> extras </trajectory>``):

* ``ekf_sigma_E_eV``: σ_E of the total energy (eV);
* ``ekf_sigma_E_per_atom_meV``: σ_E / N (meV/atom);
* ``ekf_sigma_F_max_eV_per_A``: the largest per-atom σ_F = √(Σ_α σ_aα²) (eV/Å), only with ``forces=True``;
* ``ekf_uncertainty_call``: the force call (0-based) at which these values were computed.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Union

import numpy as np

from .covariance import Covariance
from .predictive import PredictiveUncertainty

log = logging.getLogger(__name__)

__all__ = ["UncertaintyMonitor"]


class UncertaintyMonitor:
    """σ every ``every`` force calls of an MD client (see the module docstring).

    Args:
        evaluator: the client's :class:`~ekf_plugin.evaluation.ModelEvaluator` (model and neighbour list reused).
        covariance: a :class:`Covariance` or the path of a covariance file.
        every: compute σ every this many calls (≥ 1; the first call always computes).
        forces: also the largest per-atom force σ (3·N Jacobian rows: much more expensive than σ_E).
        threshold: warn when σ_E / N exceeds this many meV/atom (None: never).
        log_fn: where warnings go (default: this module's logger at WARNING).
    """

    def __init__(self, evaluator: Any, covariance: Union[Covariance, str], every: int = 10, forces: bool = False,
                 threshold: Optional[float] = None, log_fn: Any = None) -> None:
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold must be > 0 meV/atom, got {threshold}")
        self.unc = PredictiveUncertainty(evaluator, covariance)
        self.every, self.forces, self.threshold = int(every), bool(forces), threshold
        self.calls = 0
        self.warnings = 0
        self.latest: Dict[str, Any] = {}
        self._log = log_fn or (lambda msg: log.warning(msg))

    def __call__(self, numbers: Any, positions: Any, cell: Optional[Any] = None, pbc: Any = True) -> Dict[str, Any]:
        """Extras for this call: numbers (N,), positions (N, 3) Å, cell rows (3, 3) Å. Returns the latest values."""
        call = self.calls
        self.calls += 1
        if call % self.every:
            return dict(self.latest)
        r = self.unc(numbers, positions, cell, pbc, forces=self.forces)
        n = int(np.size(numbers))
        per_atom = 1e3 * r.energy_std / n
        out: Dict[str, Any] = {"ekf_sigma_E_eV": r.energy_std, "ekf_sigma_E_per_atom_meV": per_atom,
                               "ekf_uncertainty_call": call}
        if self.forces:
            out["ekf_sigma_F_max_eV_per_A"] = float(np.max(r.forces_std_atoms))
        self.latest = out
        if self.threshold is not None and math.isfinite(per_atom) and per_atom > self.threshold:
            self.warnings += 1
            self._log(f"force call {call}: energy uncertainty σ_E = {per_atom:.3g} meV/atom > threshold "
                      f"{self.threshold:g} meV/atom ({r.energy_std:.3g} eV): the structure is outside the region the "
                      "model's training data determined")
        return dict(out)
