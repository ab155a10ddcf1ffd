"""Closed-form energy and force rows (network_jacobian) in any column order, with foreign columns and absent
elements: equal to autograd's Jacobians (float64)."""

from __future__ import annotations

import pytest
import torch
from ase import Atoms

import schnetpack.properties as props
from ekf_plugin.bpnn.label_predictor import BPNNLabelPredictor
from ekf_plugin.bpnn.network_jacobian import NetworkJacobians
from ekf_plugin.jacobian import flat_jacobian
from ekf_plugin.models import water_bpnn
from ._systems import converter, randomise_scaling, water_cluster


def _setup(frames):
    model = water_bpnn(dtype=torch.float64, stress=False, seed=5, n_hidden=(6, 5))
    randomise_scaling(model)
    batch = converter(model)(frames)
    batch[props.idx] = torch.arange(len(frames))
    return model, BPNNLabelPredictor(model), batch


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("order", ["model", "reversed", "foreign"])
def test_rows_in_any_column_order_equal_autograd(order, native):
    """The rows are one concatenation when the networks' weights tile the columns (model or any other order),
    and written slot by slot otherwise (a column that is no network weight: zero); the compiled rows
    (``native``, :mod:`ekf_plugin.bpnn.native_rows`) and the torch path alike."""
    model, pred, batch = _setup([water_cluster(2, seed=1)])
    params = list(model.parameters())
    if order == "reversed":
        params = params[::-1]
    foreign = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    if order == "foreign":
        params = params[:2] + [foreign] + params[2:]
    rows = NetworkJacobians(pred._energy_modules()[0], params)
    rows.native = native
    assert (rows._order is None) == (order == "foreign")
    structure = pred._structure(batch, 0, with_rij=False)
    s, species = pred.features(batch, 0, structure), pred._species(structure)
    e, je = rows.energy(s, species)  # (1,), (1, n)
    e_ref = pred.energies(batch)
    torch.testing.assert_close(e, e_ref.detach(), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(je, flat_jacobian(e_ref, params), rtol=1e-10, atol=1e-12)
    pick = torch.tensor([0, 5, 7, 16])
    cols = pred.representation.feature_columns(structure, pick // 3, pick % 3)  # (k, N, W)
    f, jf = rows.forces(s, species, cols)  # (k,), (k, n)
    f_ref = pred.force_components(batch, 0, pick)
    torch.testing.assert_close(f, f_ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jf, flat_jacobian(f_ref, params), rtol=1e-9, atol=1e-11)
    if order == "foreign":
        start = sum(p.numel() for p in params[:2])
        assert torch.count_nonzero(jf[:, start : start + 3]) == 0 and torch.count_nonzero(je[:, start : start + 3]) == 0


def test_an_element_without_atoms_gets_zero_columns():
    """A structure of hydrogen only: the oxygen network's columns are zero, the rest equal autograd."""
    h2 = Atoms("H2", positions=[[0, 0, 0], [0.74, 0.05, 0.0]])
    model, pred, batch = _setup([h2])
    params = list(model.parameters())
    rows = pred.closed_form(params)
    e, je = pred.energies_and_rows(batch, rows)
    e_ref = pred.energies(batch)
    torch.testing.assert_close(je, flat_jacobian(e_ref, params), rtol=1e-10, atol=1e-12)
    f, jf = pred.force_components_and_rows(batch, 0, torch.tensor([0, 4]), rows)
    f_ref = pred.force_components(batch, 0, torch.tensor([0, 4]))
    torch.testing.assert_close(jf, flat_jacobian(f_ref, params), rtol=1e-9, atol=1e-11)
    oxygen = pred._energy_modules()[0].elements.index("O")
    net_o = {id(p) for p in pred._energy_modules()[0].networks[oxygen].parameters()}
    start = 0
    for p in params:
        if id(p) in net_o:
            assert torch.count_nonzero(jf[:, start : start + p.numel()]) == 0
            assert torch.count_nonzero(je[:, start : start + p.numel()]) == 0
        start += p.numel()
    assert torch.count_nonzero(jf) > 0


@pytest.mark.parametrize("world", [2, 3])
def test_energy_shares_of_the_element_networks_sum_to_the_energy_and_its_row(world):
    """``share`` = (r, W): the networks e % W == r (atom energies in share 0); the W shares add up to the whole
    energy and row, and their rows touch disjoint columns (so a sum over processes is exact)."""
    model, pred, batch = _setup([water_cluster(2, seed=3)])
    rows = NetworkJacobians(pred._energy_modules()[0], list(model.parameters()))
    structure = pred._structure(batch, 0, with_rij=False)
    s, species = pred.features(batch, 0, structure), pred._species(structure)
    e, je = rows.energy(s, species)
    parts = [rows.energy(s, species, (r, world)) for r in range(world)]
    torch.testing.assert_close(sum(p[0] for p in parts), e, rtol=1e-14, atol=1e-12)
    assert torch.equal(sum(p[1] for p in parts), je), "the shares' rows sum to the row exactly"
    touched = torch.stack([p[1][0] != 0 for p in parts])  # (W, n)
    assert int(touched.sum(0).max()) <= 1, "no column in two shares"
    assert [bool(p[1].any()) for p in parts] == [r < 2 for r in range(world)], "two elements: shares 0 and 1"
    batch_e, batch_rows = pred.energies_and_rows(batch, rows, (1, world))
    torch.testing.assert_close(batch_e, parts[1][0])
    torch.testing.assert_close(batch_rows, parts[1][1])
