"""Predictive variance of energies and forces from the EKF covariance: σ² = J P Jᵀ (+ R on request).

For a structure, the row j = ∂E/∂w (1, n) of the predicted energy gives the filter's variance of E,
σ_E² = j P jᵀ (eV²); the rows of force components give σ_F² = diag(J_F P J_Fᵀ) ((eV/Å)²). This is the
*epistemic* part: how much the weights the labels seen so far leave undetermined can move the
prediction. ``include_noise=True`` adds the label noise the filter's R = r·I implies
(:meth:`~ekf_plugin.uncertainty.covariance.Covariance.label_noise`): then σ² is the filter's predictive
variance of a new *label* (for a linear model y = x·w with P(0) = p0·I and R = I/η this is exactly the
Bayesian posterior predictive variance x*ᵀ(I/p0 + η XᵀX)⁻¹x* + 1/η, tested to 1e-10).

Rows: BPNN potentials (ekf-plugin's ``ElementNetworks`` of tanh/linear layers) use the closed-form rows of
:mod:`ekf_plugin.bpnn.network_jacobian` with the scaled symmetry functions and their columns ∂s/∂r from
:class:`~ekf_plugin.bpnn.label_predictor.BPNNLabelPredictor`; any other model uses autograd
(:func:`ekf_plugin.jacobian.flat_jacobian`, double backward for force rows).

Block-decoupled P (several blocks): σ² = Σ_b J_b P_b J_bᵀ, the block-diagonal approximation: covariances
between weights of different blocks are taken as zero, exactly as the block-decoupled filter itself
assumes when it computes its innovation A = Σ_b J_b P_b J_bᵀ + R.

Scale: P is the posterior of the filter's noise model, in which a label is as uncertain as R says
(``task=ekf_paper``: σ = √(r/c_E) ≈ 1 eV per total energy, √(r·10/c_F) ≈ 3.2 eV/Å per force component at
η = 1e-3). The absolute numbers are therefore those of that model, not of the true errors; ranks (which
structure is more uncertain) do not depend on it, and :func:`calibration_factor` rescales σ on held-out
frames with reference labels.

Units: positions Å, energy and σ_E eV, σ_F eV/Å. Shapes are given per function.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .covariance import Covariance, load_covariance

__all__ = ["PredictiveUncertainty", "UncertaintyResult", "predictive_variance", "energy_uncertainty", "forces_uncertainty",
           "calibration_factor", "spearman"]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


@dataclass
class UncertaintyResult:
    """Prediction and its standard deviations for one structure (float64, eV and Å).

    Attributes:
        energy: predicted energy E (eV).
        energy_std: σ_E = √(j P jᵀ [+ R]) (eV).
        forces_std: (N, 3) σ of each force component (eV/Å), or None when forces were not asked for
            (atoms not asked for are NaN).
        forces_std_atoms: (N,) σ_a = √(Σ_α σ_aα²) per atom (eV/Å), the RMS length of the force error vector,
            or None.
        include_noise: whether the label noise R was added.
    """

    energy: float
    energy_std: float
    forces_std: Optional[np.ndarray] = None
    forces_std_atoms: Optional[np.ndarray] = None
    include_noise: bool = False


class PredictiveUncertainty:
    """σ of energies and forces of one structure at a time from a model and its EKF covariance.

    Args:
        model: a :class:`~ekf_plugin.evaluation.ModelEvaluator` (e.g. the ASE calculator's or the i-PI client's;
            its model and neighbour list are reused), a SchNetPack ``AtomisticModel``, or a model path.
        covariance: a :class:`~ekf_plugin.uncertainty.covariance.Covariance` or the path of a covariance file.
        check_weights: refuse a covariance saved for other weights (relative tolerance ``rtol``).
        closed_form: BPNN closed-form rows; ``None`` (default): whenever the model qualifies.
        chunk: force rows per batch (memory: chunk × n floats, plus chunk × N × W features for the BPNN).
        trust_pickle: for a model path, see :func:`ekf_plugin.models.load_model`.
    """

    def __init__(self, model: Any, covariance: Union[Covariance, str, os.PathLike], check_weights: bool = True,
                 rtol: float = 1e-6, closed_form: Optional[bool] = None, chunk: int = 48,
                 trust_pickle: bool = False) -> None:
        from ekf_plugin.evaluation import ModelEvaluator

        if isinstance(model, ModelEvaluator):
            ev = model
        else:
            ev = ModelEvaluator(model, dtype=torch.float64, fast_path=False, trust_pickle=trust_pickle)
        self.evaluator = ev
        self.model = ev.model
        cov = covariance if isinstance(covariance, Covariance) else load_covariance(covariance)
        self.covariance = cov.to(device=ev.device, dtype=torch.float64)
        self.params = self.covariance.parameters_of(self.model)
        if check_weights:
            self.covariance.check_weights(self.model, rtol)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = int(chunk)
        self._predictor = self._rows = None
        from ekf_plugin.bpnn.label_predictor import BPNNLabelPredictor, supports

        if closed_form is not False and supports(self.model):
            predictor = BPNNLabelPredictor(self.model)
            rows = predictor.closed_form(self.params)
            if rows is not None:
                self._predictor, self._rows = predictor, rows
        if closed_form and self._rows is None:
            raise ValueError("closed_form=True needs a BPNN whose filtered weights are all in tanh/linear element networks")

    @property
    def closed_form(self) -> bool:
        """True when rows come from the BPNN closed form, False for autograd."""
        return self._rows is not None

    # ---------------------------------------------------------------- algebra
    def variance(self, J: torch.Tensor) -> torch.Tensor:
        """diag(J P Jᵀ) (m,) for rows J (m, n) in P's column order (block-diagonal P: Σ_b J_b P_b J_bᵀ)."""
        return predictive_variance(J, self.covariance)

    # ---------------------------------------------------------------- rows
    def _inputs(self, numbers: ArrayLike, positions: ArrayLike, cell: Optional[ArrayLike], pbc: Any):
        from ekf_plugin.evaluation import check_structure

        check_structure(numbers, positions, cell)
        inputs = self.evaluator.build_inputs(numbers, positions, cell, pbc)
        inputs.pop("_idx", None)  # no feature caching keyed by a fake dataset index
        return inputs

    def energy_rows(self, numbers: ArrayLike, positions: ArrayLike, cell: Optional[ArrayLike] = None,
                    pbc: Any = None) -> Tuple[float, torch.Tensor]:
        """(E in eV, row ∂E/∂w (1, n)) for one structure (positions (N, 3) Å, cell rows Å)."""
        inputs = self._inputs(numbers, positions, cell, pbc)
        if self._rows is not None:
            p = self._predictor
            structure = p._structure(inputs, 0)
            s = p.features(inputs, 0, structure)
            e, row = self._rows.energy(s, p._species(structure))
            return float(e.sum()), row
        e = self._energy_graph(inputs)
        from ekf_plugin.jacobian import flat_jacobian

        return float(e.detach()), flat_jacobian(e.reshape(1), self.params)

    def _energy_graph(self, inputs):
        from schnetpack import properties as props

        from ekf_plugin.training.task import energy_only

        with torch.enable_grad():
            inputs[props.R].requires_grad_(True)
            outputs = self.model.model_outputs
            self.model.model_outputs = [k for k in outputs if k == "energy"]  # no forces/stress in the output
            try:
                with energy_only(self.model):
                    out = self.model(inputs)
            finally:
                self.model.model_outputs = outputs
            return out["energy"].sum()

    def force_rows(self, numbers: ArrayLike, positions: ArrayLike, cell: Optional[ArrayLike] = None,
                   pbc: Any = None, atoms: Optional[Sequence[int]] = None):
        """Yield ``(flat component indices (k,), F (k,) eV/Å, rows (k, n))`` in chunks of ``self.chunk`` for
        the Cartesian force components of ``atoms`` (default all; flat index 3·atom + axis)."""
        n_atoms = int(np.size(numbers))
        atoms_t = torch.arange(n_atoms) if atoms is None else torch.as_tensor(list(atoms), dtype=torch.long)
        if atoms_t.numel() and (int(atoms_t.min()) < 0 or int(atoms_t.max()) >= n_atoms):
            raise ValueError(f"atom indices must be in [0, {n_atoms}), got {atoms_t.min().item()}..{atoms_t.max().item()}")
        picks = (atoms_t[:, None] * 3 + torch.arange(3)[None, :]).reshape(-1)  # (3·A,)
        inputs = self._inputs(numbers, positions, cell, pbc)
        if self._rows is not None:
            p = self._predictor
            structure = p._structure(inputs, 0)
            s = p.features(inputs, 0, structure)
            species = p._species(structure)
            for start in range(0, picks.numel(), self.chunk):
                pick = picks[start:start + self.chunk].to(s.device)
                cols = p.representation.feature_columns(structure, pick // 3, pick % 3).to(s.dtype)  # (k, N, W)
                f, rows = self._rows.forces(s, species, cols)
                yield pick.cpu(), f, rows
            return
        from schnetpack import properties as props

        from ekf_plugin.jacobian import flat_jacobian

        with torch.enable_grad():
            e = self._energy_graph(inputs)
            g, = torch.autograd.grad(e, inputs[props.R], create_graph=True)
            forces = -g.reshape(-1)  # (3N,) eV/Å
            for start in range(0, picks.numel(), self.chunk):
                pick = picks[start:start + self.chunk]
                f = forces[pick.to(forces.device)]
                yield pick, f.detach(), flat_jacobian(f, self.params)

    # ---------------------------------------------------------------- results
    def __call__(self, numbers: ArrayLike, positions: ArrayLike, cell: Optional[ArrayLike] = None, pbc: Any = None,
                 forces: bool = False, atoms: Optional[Sequence[int]] = None,
                 include_noise: bool = False) -> UncertaintyResult:
        """σ_E (and with ``forces`` σ_F per component and per atom) of one structure.

        Args:
            numbers: (N,) atomic numbers. positions: (N, 3) Å. cell: (3, 3) Å, lattice vectors as rows, or None.
            pbc: (3,) bool (default: periodic when a non-singular cell is given).
            forces: also the force σ (costs 3·N rows; ``atoms`` restricts it to some atoms).
            include_noise: add the label noise R (see the module docstring).
        """
        energy, row = self.energy_rows(numbers, positions, cell, pbc)
        var_e = float(self.variance(row)[0])
        n_atoms = int(np.size(numbers))
        if include_noise:
            var_e += self.covariance.label_noise("energy", n_atoms)
        res = UncertaintyResult(energy, math.sqrt(max(var_e, 0.0)), include_noise=include_noise)
        if forces:
            var = np.full(3 * n_atoms, np.nan)
            noise = self.covariance.label_noise("force") if include_noise else 0.0
            for pick, _, rows in self.force_rows(numbers, positions, cell, pbc, atoms):
                var[pick.numpy()] = self.variance(rows).cpu().numpy() + noise
            var = np.clip(var.reshape(n_atoms, 3), 0.0, None)
            res.forces_std = np.sqrt(var)
            res.forces_std_atoms = np.sqrt(var.sum(1))
        return res

    def atoms(self, atoms: Any, forces: bool = False, include_noise: bool = False) -> UncertaintyResult:
        """:meth:`__call__` for an ASE ``Atoms`` (Å)."""
        periodic = bool(atoms.pbc.any())
        return self(atoms.numbers, atoms.positions, atoms.cell.array if periodic else None, atoms.pbc,
                    forces=forces, include_noise=include_noise)


def predictive_variance(J: torch.Tensor, covariance: Covariance) -> torch.Tensor:
    """diag(J P Jᵀ) (m,) for rows J (m, n) in P's column order, in P's dtype and device.

    With several blocks this is Σ_b J_b P_b J_bᵀ (block-diagonal approximation). The label noise is not
    included: add ``covariance.label_noise(...)`` for the predictive variance of a new label.
    """
    P0 = covariance.P[0]
    J = J.to(dtype=P0.dtype, device=P0.device)
    if J.dim() != 2 or J.shape[1] != covariance.n:
        raise ValueError(f"rows must have shape (m, {covariance.n}), got {tuple(J.shape)}")
    out = J.new_zeros(J.shape[0])
    for (a, b), Pb in zip(covariance.blocks, covariance.P):
        Jb = J[:, a:b]
        out += ((Jb @ Pb) * Jb).sum(1)
    return out


def energy_uncertainty(model: Any, covariance: Union[Covariance, str, os.PathLike], atoms: Any,
                       include_noise: bool = False) -> float:
    """σ_E in eV of an ASE ``Atoms`` (one-off; build :class:`PredictiveUncertainty` once for many structures)."""
    return PredictiveUncertainty(model, covariance).atoms(atoms, include_noise=include_noise).energy_std


def forces_uncertainty(model: Any, covariance: Union[Covariance, str, os.PathLike], atoms: Any,
                       per: str = "atom", include_noise: bool = False) -> np.ndarray:
    """σ of the forces of an ASE ``Atoms`` in eV/Å: (N,) per atom (``per="atom"``) or (N, 3) per component."""
    if per not in ("atom", "component"):
        raise ValueError(f"per must be 'atom' or 'component', got {per!r}")
    res = PredictiveUncertainty(model, covariance).atoms(atoms, forces=True, include_noise=include_noise)
    return res.forces_std_atoms if per == "atom" else res.forces_std


def calibration_factor(errors: ArrayLike, stds: ArrayLike) -> float:
    """k such that k·σ is calibrated in the mean-square sense on held-out data: k = √mean((err/σ)²).

    Args:
        errors: (M,) prediction − reference, same units as ``stds``. stds: (M,) σ > 0.
    """
    e = np.asarray(errors, dtype=np.float64).reshape(-1)
    s = np.asarray(stds, dtype=np.float64).reshape(-1)
    if e.shape != s.shape or not e.size or not (s > 0).all():
        raise ValueError("errors and stds must be non-empty arrays of the same length with stds > 0")
    return float(np.sqrt(np.mean((e / s) ** 2)))


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation of two (M,) arrays (average ranks for ties)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(np.asarray(a, dtype=np.float64)), rankdata(np.asarray(b, dtype=np.float64))
    if ra.size < 2:
        raise ValueError("need at least two values")
    return float(np.corrcoef(ra, rb)[0, 1])
