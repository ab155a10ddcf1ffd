"""Uncertainty from the Kalman covariance: keep P with a model, predictive variance J P Jᵀ, frame selection.

* :mod:`.covariance`: :class:`Covariance`, extraction from an EKF or an ``spktrain`` checkpoint, the safe
  ``<model>.cov.pt`` file format.
* :mod:`.predictive`: :class:`PredictiveUncertainty` (σ of energies in eV and forces in eV/Å).

See docs/uncertainty.md.
"""

from .covariance import (Covariance, CovarianceError, CovarianceMismatchError, covariance_from_checkpoint,
                         covariance_from_optimizer, default_path, load_covariance, read_checkpoint, save_covariance)
from .predictive import (PredictiveUncertainty, UncertaintyResult, calibration_factor, energy_uncertainty,
                         forces_uncertainty, predictive_variance, spearman)

__all__ = ["Covariance", "CovarianceError", "CovarianceMismatchError", "covariance_from_checkpoint",
           "covariance_from_optimizer", "default_path", "load_covariance", "read_checkpoint", "save_covariance",
           "PredictiveUncertainty", "UncertaintyResult", "energy_uncertainty", "forces_uncertainty",
           "calibration_factor", "predictive_variance", "spearman"]
