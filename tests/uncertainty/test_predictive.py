"""Predictive variance J P Jᵀ: Bayesian closed form for a linear model, BPNN closed-form rows vs autograd."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ekf_plugin import EKF
from ekf_plugin.jacobian import flat_jacobian
from ekf_plugin.uncertainty import (CovarianceMismatchError, PredictiveUncertainty, calibration_factor,
                                    covariance_from_optimizer, predictive_variance, spearman)
from tests.bpnn._systems import water_pair
from tests.uncertainty._models import random_covariance, tiny_bpnn


def _train_linear(X, y, eta, p0, batch, blocks="dense", bias=False):
    torch.manual_seed(0)
    model = torch.nn.Linear(X.shape[1], 1, bias=bias, dtype=torch.float64)
    w0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt = EKF(model.parameters(), lr=eta, p0=p0, blocks=blocks)
    for i in range(0, X.shape[0], batch):
        opt.step(lambda: model(X[i:i + batch]).reshape(-1) - y[i:i + batch])
    return model, opt, w0


@pytest.mark.parametrize("batch", [1, 3])
def test_linear_model_variance_is_the_bayesian_posterior_predictive_variance(batch):
    """y = Xw, prior w ~ N(w0, p0 I), noise N(0, 1/η): the filter's x*ᵀ P x* + 1/η equals
    x*ᵀ (I/p0 + η XᵀX)⁻¹ x* + 1/η to 1e-10, and its weights equal the posterior mean."""
    g = torch.Generator().manual_seed(1)
    d, N, eta, p0 = 4, 30, 0.7, 2.5
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64) + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    model, opt, w0 = _train_linear(X, y, eta, p0, batch)
    cov = covariance_from_optimizer(opt, model)
    assert cov.dense and cov.names == ["weight"] and cov.noise == pytest.approx(1 / eta)
    xs = torch.randn(6, d, generator=g, dtype=torch.float64)
    J = flat_jacobian(model(xs).reshape(-1), cov.parameters_of(model))  # (6, d) = xs
    var = predictive_variance(J, cov) + cov.label_noise()
    Sigma = torch.linalg.inv(torch.eye(d, dtype=torch.float64) / p0 + eta * X.T @ X)
    closed = ((xs @ Sigma) * xs).sum(1) + 1 / eta
    assert float((var - closed).abs().max()) < 1e-10
    assert float((predictive_variance(J, cov) - ((xs @ Sigma) * xs).sum(1)).abs().max()) < 1e-10
    w_post = Sigma @ (w0 / p0 + eta * X.T @ y)
    assert float((model.weight.detach().reshape(-1) - w_post).abs().max()) < 1e-10
    assert float(var.min()) > 1 / eta  # the epistemic part is positive


def test_blocked_covariance_is_the_block_diagonal_approximation():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = X.sum(1) + 1.0
    model, opt, _ = _train_linear(X, y, 0.5, 1.0, 2, blocks="tensor", bias=True)
    cov = covariance_from_optimizer(opt, model)
    assert not cov.dense and cov.blocks == [(0, 3), (3, 4)]
    xs = torch.randn(5, 3, generator=g, dtype=torch.float64)
    J = flat_jacobian(model(xs).reshape(-1), cov.parameters_of(model))  # (5, 4)
    full = cov.full()
    assert float(full[:3, 3:].abs().max()) == 0.0
    torch.testing.assert_close(predictive_variance(J, cov), ((J @ full) * J).sum(1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("blocks", [None, (40, 27, 200)])
def test_bpnn_closed_form_uncertainty_equals_autograd_through_the_full_model(blocks):
    """Energy and force σ from the hand-written network rows = autograd through the whole model (positions →
    neighbour list → symmetry functions → networks, double backward for forces), dense and blocked P."""
    model = tiny_bpnn()
    n = sum(p.numel() for p in model.parameters())
    sizes = None if blocks is None else [*blocks, n - sum(blocks)]
    cov = random_covariance(model, sizes, seed=4)
    fast = PredictiveUncertainty(model, cov)
    slow = PredictiveUncertainty(copy.deepcopy(model), cov, closed_form=False)
    assert fast.closed_form and not slow.closed_form
    atoms = water_pair(pbc=True)
    a, b = fast.atoms(atoms, forces=True), slow.atoms(atoms, forces=True)
    assert a.energy == pytest.approx(b.energy, rel=1e-12)
    assert a.energy_std == pytest.approx(b.energy_std, rel=1e-10) and a.energy_std > 0
    np.testing.assert_allclose(a.forces_std, b.forces_std, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.forces_std_atoms, np.sqrt((a.forces_std**2).sum(1)), rtol=1e-12)
    assert a.forces_std.shape == (len(atoms), 3) and (a.forces_std > 0).all()
    # the energy is the model's own prediction
    from ekf_plugin.evaluation import ModelEvaluator

    ref = ModelEvaluator(copy.deepcopy(model), fast_path=False)(atoms.numbers, atoms.positions, atoms.cell.array)
    assert a.energy == pytest.approx(ref.energy, rel=1e-12)


def test_subset_of_atoms_and_label_noise_of_the_paper_scaling():
    model = tiny_bpnn()
    lw = {"c_energy": 999.9, "c_forces": 1000.0, "n_force_components": 10, "energy_per_atom": False}
    cov = random_covariance(model, seed=1, label_weights=lw, noise=1000.0)  # η = 1e-3
    assert cov.label_noise("energy") == pytest.approx(1000 / 999.9)
    assert cov.label_noise("force") == pytest.approx(10.0)
    cov.label_weights = {**lw, "energy_per_atom": True}
    assert cov.label_noise("energy", n_atoms=6) == pytest.approx(36 * 1000 / 999.9)
    cov.label_weights = {"label_mode": "reduced"}
    with pytest.raises(ValueError, match="reduced rows"):
        cov.label_noise("force")
    cov.label_weights = lw
    unc = PredictiveUncertainty(model, cov)
    atoms = water_pair(pbc=False)
    plain, noisy = unc.atoms(atoms, forces=True), unc.atoms(atoms, forces=True, include_noise=True)
    assert noisy.energy_std**2 == pytest.approx(plain.energy_std**2 + 1000 / 999.9, rel=1e-12)
    np.testing.assert_allclose(noisy.forces_std**2, plain.forces_std**2 + 10.0, rtol=1e-12)
    part = unc(atoms.numbers, atoms.positions, forces=True, atoms=[1, 4])
    np.testing.assert_allclose(part.forces_std[[1, 4]], plain.forces_std[[1, 4]], rtol=1e-12)
    assert np.isnan(part.forces_std[0]).all()
    with pytest.raises(ValueError, match="atom indices"):
        unc(atoms.numbers, atoms.positions, forces=True, atoms=[6])


def test_covariance_of_other_weights_is_refused():
    model = tiny_bpnn()
    cov = random_covariance(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 0.01
    with pytest.raises(CovarianceMismatchError, match="other weights"):
        PredictiveUncertainty(model, cov)
    PredictiveUncertainty(model, cov, check_weights=False)
    other = tiny_bpnn(hidden=(6, 4))
    with pytest.raises(CovarianceMismatchError, match="shape"):
        PredictiveUncertainty(other, cov)


def test_calibration_factor_and_spearman():
    assert calibration_factor([2.0, -2.0], [1.0, 1.0]) == pytest.approx(2.0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        calibration_factor([1.0], [0.0])
