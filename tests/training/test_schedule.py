"""The study's label schedule: unit conversion of c_E/c_F, draw frequencies, and ξ = √(c/n)(ŷ − y)."""

from __future__ import annotations

import pytest
import torch
from ase import units

from ekf_plugin.training.schedule import (
    C_ENERGY_EV,
    C_FORCES_EV_ANG,
    ENERGY,
    FORCES,
    draw_kinds,
    weighted_errors,
)


def test_weights_keep_the_tables_ratio_and_the_chosen_scale():
    # c_E/c_F = 0.28 Bohr⁻² (SI Table S3) expressed in Å⁻²
    assert C_ENERGY_EV / C_FORCES_EV_ANG == pytest.approx(0.28 / units.Bohr**2, rel=1e-12)
    assert C_ENERGY_EV / C_FORCES_EV_ANG == pytest.approx(1.0, abs=2e-4)
    # the absolute scale makes c·η = 1 at the study's EKF learning rate η = 1e-3
    assert C_FORCES_EV_ANG * 1e-3 == pytest.approx(1.0, rel=1e-12)


def test_energy_and_force_updates_in_about_equal_numbers():
    g = torch.Generator().manual_seed(0)
    kinds = draw_kinds(4000, 0.5, g)
    frac = sum(k == ENERGY for k in kinds) / len(kinds)
    assert 0.47 < frac < 0.53
    assert all(k == FORCES for k in draw_kinds(50, 0.0, g))


def _fake(n_atoms=(3, 4)):
    g = torch.Generator().manual_seed(1)
    idx = torch.cat([torch.full((n,), b) for b, n in enumerate(n_atoms)])
    N = idx.numel()
    batch = {
        "_idx_m": idx, "_n_atoms": torch.tensor(n_atoms),
        "energy": torch.randn(len(n_atoms), generator=g, dtype=torch.float64),
        "forces": torch.randn(N, 3, generator=g, dtype=torch.float64),
    }
    pred = {
        "energy": torch.randn(len(n_atoms), generator=g, dtype=torch.float64),
        "forces": torch.randn(N, 3, generator=g, dtype=torch.float64),
    }
    return pred, batch


def test_weighted_errors_energy_then_forces():
    pred, batch = _fake()
    xi = weighted_errors(pred, batch, [ENERGY, FORCES], torch.Generator().manual_seed(2), n_force_components=10)
    assert xi.shape == (11,)
    assert float(xi[0]) == pytest.approx(C_ENERGY_EV**0.5 * float(pred["energy"][0] - batch["energy"][0]))
    dF = (pred["forces"][3:] - batch["forces"][3:]).reshape(-1) * (C_FORCES_EV_ANG / 10) ** 0.5  # structure 1: atoms 3..6
    matches = [int(torch.isclose(dF, v).nonzero().numel()) for v in xi[1:]]
    assert matches == [1] * 10, "each force entry is one distinct component of structure 1"
    assert len({float(v) for v in xi[1:]}) == 10


def test_weighted_errors_per_atom_energy_and_all_components():
    pred, batch = _fake()
    xi = weighted_errors(pred, batch, [FORCES, ENERGY], torch.Generator(), n_force_components=100, energy_per_atom=True,
                         c_energy=1.0, c_forces=1.0)
    assert xi.shape == (9 + 1,)  # 3 atoms × 3 components (fewer than 100: all of them), then one energy
    assert float(xi[-1]) == pytest.approx(float(pred["energy"][1] - batch["energy"][1]) / 4)
    torch.testing.assert_close(xi[:9], (pred["forces"][:3] - batch["forces"][:3]).reshape(-1) / 3.0)


def test_reduced_rows_are_signed_sums_of_group_force_errors():
    """Row 0: √c_E mean_b|ΔE_b|/N_b; rows 1..G: √c_F mean |ΔF| of S atoms; ∂row/∂ŷ = signed (mean) weights."""
    from ekf_plugin.training.schedule import reduced_row_errors

    g = torch.Generator().manual_seed(4)
    n_atoms = (5, 7)
    N = sum(n_atoms)
    batch = {"_idx_m": torch.cat([torch.full((n,), b) for b, n in enumerate(n_atoms)]), "_n_atoms": torch.tensor(n_atoms),
             "energy": torch.randn(2, generator=g, dtype=torch.float64),
             "forces": torch.randn(N, 3, generator=g, dtype=torch.float64)}
    e_hat = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    f_hat = torch.randn(N, 3, generator=g, dtype=torch.float64, requires_grad=True)
    pred = {"energy": e_hat, "forces": f_hat}
    xi = reduced_row_errors(pred, batch, torch.Generator().manual_seed(9), n_force_groups=3, force_group_size=4,
                            c_energy=4.0, c_forces=9.0, energy_per_atom=True)
    assert xi.shape == (4,)
    de = (e_hat - batch["energy"]) / torch.tensor(n_atoms, dtype=torch.float64)
    assert float(xi[0]) == pytest.approx(2.0 * float(de.abs().mean()), rel=1e-14)
    atoms = torch.randperm(N, generator=torch.Generator().manual_seed(9))[:12].view(3, 4)  # the same draw
    df = f_hat - batch["forces"]
    for k in range(3):
        assert float(xi[1 + k]) == pytest.approx(3.0 * float(df[atoms[k]].abs().mean()), rel=1e-14)
        grad, = torch.autograd.grad(xi[1 + k], f_hat, retain_graph=True)
        expect = torch.zeros_like(f_hat)
        expect[atoms[k]] = 3.0 * torch.sign(df[atoms[k]]).detach() / 12.0
        torch.testing.assert_close(grad, expect, rtol=0, atol=1e-15)
    assert len(set(atoms.reshape(-1).tolist())) == 12, "atoms drawn without replacement"
