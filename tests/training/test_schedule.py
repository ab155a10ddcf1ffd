"""The study's label schedule: unit conversion of c_E/c_F, draw frequencies, ξ = √(c/n)(ŷ − y), threshold selection."""

from __future__ import annotations

import pytest
import torch
from ase import units

from ekf_plugin.training.schedule import (
    C_ENERGY_EV,
    C_FORCES_EV_ANG,
    ENERGY,
    FORCES,
    ThresholdSelection,
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


@pytest.mark.parametrize("n_atoms", [(4,), (3, 4)])
def test_label_errors_weight_closed_form_rows_like_their_values(n_atoms):
    """(ξ, J) from callables that return (values, rows): every row is weighted as its label, √c_E/N_b for an energy
    per atom and √(c_F/k) for a force component; one structure (rows weighted in place, no copy) as several."""
    from ekf_plugin.training.schedule import label_errors

    pred, batch = _fake(n_atoms)
    n, g = 5, torch.Generator().manual_seed(3)
    e_rows = torch.randn(len(n_atoms), n, generator=g, dtype=torch.float64)  # (B, n) ∂E_b/∂θ
    f_rows = torch.randn(sum(n_atoms) * 3, n, generator=g, dtype=torch.float64)  # (3N, n) ∂F/∂θ, flat components
    first = [0, *torch.tensor(n_atoms).cumsum(0).tolist()]

    def forces(b, pick):
        flat = 3 * first[b] + pick
        return pred["forces"].reshape(-1)[flat].clone(), f_rows[flat].clone()

    c_e, c_f, k = 2.0, 3.0, 4
    for kinds in ([ENERGY] * len(n_atoms), [FORCES] * len(n_atoms)):
        xi, J = label_errors(lambda: (pred["energy"].clone(), e_rows.clone()), forces, batch, kinds,
                             torch.Generator().manual_seed(4), n_force_components=k, c_energy=c_e, c_forces=c_f,
                             energy_per_atom=True)
        xi_ref = weighted_errors(pred, batch, kinds, torch.Generator().manual_seed(4), n_force_components=k,
                                 c_energy=c_e, c_forces=c_f, energy_per_atom=True)
        torch.testing.assert_close(xi, xi_ref, rtol=1e-12, atol=0)
        if kinds[0] == ENERGY:
            want = e_rows * (c_e**0.5 / torch.tensor(n_atoms, dtype=torch.float64))[:, None]  # (B, n)
        else:  # the drawn components: the rows whose values are the unweighted predictions
            draws = torch.Generator().manual_seed(4)
            picks = [torch.randperm(3 * nb, generator=draws)[:k] + 3 * first[b] for b, nb in enumerate(n_atoms)]
            want = f_rows[torch.cat(picks)] * (c_f / k) ** 0.5  # (B·k, n)
        torch.testing.assert_close(J, want, rtol=1e-12, atol=0)


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


def test_threshold_selection_takes_the_first_candidate_above_the_running_rmse():
    """n2p2's selection_mode 2 with a known error per component: slot j takes the first of its candidates whose
    error reaches threshold × RMSE (RMSE over the evaluated candidates), else its last candidate."""
    errors = torch.linspace(-3.0, 3.0, 60)  # component c has error errors[c]
    sel = ThresholdSelection(threshold=1.0, trials=3)
    seen = []

    def errors_of(cand):
        seen.append(cand.clone())
        return errors[cand]

    pick = sel.choose(60, 10, torch.Generator().manual_seed(4), errors_of)
    cand = seen[0]
    assert cand.numel() == 30 and len(set(cand.tolist())) == 30, "k · trials distinct candidates"
    rms = float((errors[cand].double() ** 2).mean() ** 0.5)
    assert sel.mean_square == pytest.approx(rms**2)
    for j in range(10):
        group = cand[j::10].tolist()  # slot j's candidates, in order
        above = [c for c in group if abs(float(errors[c])) >= rms]
        assert int(pick[j]) == (above[0] if above else group[-1])
    assert float(errors[pick].abs().mean()) > float(errors[cand].abs().mean()), "the chosen errors are the larger ones"
    # the running mean moves by `memory` per update and survives a state_dict round trip
    again = ThresholdSelection(threshold=1.0, trials=3)
    again.load_state_dict(sel.state_dict())
    sel.choose(60, 10, torch.Generator().manual_seed(5), lambda c: 2 * errors[c])
    again.choose(60, 10, torch.Generator().manual_seed(5), lambda c: 2 * errors[c])
    assert sel.mean_square == again.mean_square != rms**2
    # fewer components than k · trials: all of them are candidates; threshold 0 takes the first candidate
    first = ThresholdSelection(threshold=0.0, trials=3).choose(6, 2, torch.Generator().manual_seed(0), lambda c: errors[c])
    assert first.numel() == 2
    with pytest.raises(ValueError):
        ThresholdSelection(trials=0)


def test_weighted_errors_with_threshold_selection_use_the_chosen_components():
    pred, batch = _fake()
    sel = ThresholdSelection(threshold=1.0, trials=3)
    xi = weighted_errors(pred, batch, [ENERGY, FORCES], torch.Generator().manual_seed(2), n_force_components=4,
                         selection=sel, c_energy=1.0, c_forces=4.0)
    assert xi.shape == (5,) and sel.mean_square is not None
    dF = (pred["forces"][3:] - batch["forces"][3:]).reshape(-1)  # structure 1 (4 atoms, 12 components)
    assert all(int(torch.isclose(dF, v).nonzero().numel()) == 1 for v in xi[1:])
    assert float(xi[1:].abs().mean()) >= float(dF.abs().mean()) * 0.9
