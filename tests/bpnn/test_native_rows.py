"""The compiled energy and force rows (native_rows) against the torch closed form of network_jacobian, which the
other tests hold against autograd: any depth and width, identity and saturated tanh units, zero and NaN inputs,
and the fallback where a network does not fit the kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekf_plugin.bpnn import native_rows
from ekf_plugin.bpnn.feature_derivatives import ColumnTable
from ekf_plugin.bpnn.network_jacobian import NetworkJacobians
from ekf_plugin.bpnn.networks import ElementNetworks

pytestmark = pytest.mark.skipif(native_rows.rows_module() is None, reason="no C++ compiler for the native rows")


def _case(n_hidden, dtype, seed=0, identity=False, n_atoms=23, k=7, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    nets = ElementNetworks(("H", "O"), n_in=[9, 13], n_hidden=n_hidden, atom_energies={"H": -13.1, "O": -2040.5},
                           energy_scale=1.7, seed=seed).to(dtype)
    with torch.no_grad():
        for p in nets.parameters():  # non-zero biases and O(1) pre-activations
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * spread / max(1.0, p.shape[-1] ** 0.5))
    if identity and n_hidden:
        nets.networks[1][1] = nn.Identity()  # oxygen's first hidden layer linear
    s = torch.randn(n_atoms, 13, generator=g, dtype=dtype)  # (N, W)
    species = torch.randint(0, 2, (n_atoms,), generator=g)  # (N,)
    cols = torch.randn(k, n_atoms, 13, generator=g, dtype=dtype)  # (k, N, W)
    cols[torch.rand(k, n_atoms, generator=g) < 0.4] = 0.0  # atoms outside a label's cutoff sphere
    cols[0, :, 4] = 0.0  # a feature with a zero column everywhere
    return nets, s, species, cols


def _both(rows, fn):
    rows.native = True
    got = fn()
    rows.native = False
    ref = fn()
    rows.native = True
    return got, ref


@pytest.mark.parametrize("n_hidden", [(), (5,), (6, 5), (25, 25), (40, 9, 33), (3, 70, 2, 17)])
@pytest.mark.parametrize("identity", [False, True])
def test_native_rows_equal_the_torch_closed_form_in_float64(n_hidden, identity):
    nets, s, species, cols = _case(n_hidden, torch.float64, seed=len(n_hidden), identity=identity)
    params = list(nets.parameters())[::-1]  # a column order that is not the model's
    rows = NetworkJacobians(nets, params)
    (e, je), (e_ref, je_ref) = _both(rows, lambda: rows.energy(s, species))
    torch.testing.assert_close(e, e_ref, rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(je, je_ref, rtol=1e-12, atol=1e-12)
    (f, jf), (f_ref, jf_ref) = _both(rows, lambda: rows.forces(s, species, cols))
    torch.testing.assert_close(f, f_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jf, jf_ref, rtol=1e-12, atol=1e-12)
    v, v_ref = _both(rows, lambda: rows.force_values(s, species, cols))  # values alone: reverse mode natively
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    assert jf.abs().sum() > 0 and je.abs().sum() > 0
    for r, world in [(0, 2), (1, 2)]:  # the shares of a split energy update
        (es, js), (es_ref, js_ref) = _both(rows, lambda: rows.energy(s, species, (r, world)))
        torch.testing.assert_close(es, es_ref, rtol=1e-13, atol=1e-10)
        torch.testing.assert_close(js, js_ref, rtol=1e-12, atol=1e-12)


def test_native_rows_in_float32_and_with_saturated_units():
    """float32 to its round-off; pre-activations of ±50 (tanh = ±1, σ' = 0) as the torch path has them."""
    for spread, dtype, tol in [(1.0, torch.float32, 2e-5), (60.0, torch.float64, 1e-12)]:
        nets, s, species, cols = _case((25, 25), dtype, seed=3, spread=spread)
        rows = NetworkJacobians(nets, list(nets.parameters()))
        (e, je), (e_ref, je_ref) = _both(rows, lambda: rows.energy(s, species))
        (f, jf), (f_ref, jf_ref) = _both(rows, lambda: rows.forces(s, species, cols))
        for got, ref in [(e, e_ref), (je, je_ref), (f, f_ref), (jf, jf_ref)]:
            assert got.dtype == dtype
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_an_element_without_atoms_and_a_label_without_neighbours_give_zero_columns():
    nets, s, species, cols = _case((6, 5), torch.float64, seed=4)
    species = torch.zeros_like(species)  # hydrogen only
    cols[2] = 0.0  # a label whose atom has no neighbours of either element
    rows = NetworkJacobians(nets, list(nets.parameters()))
    (f, jf), (f_ref, jf_ref) = _both(rows, lambda: rows.forces(s, species, cols))
    torch.testing.assert_close(jf, jf_ref, rtol=1e-12, atol=1e-12)
    n_h = sum(p.numel() for p in nets.networks[0].parameters())
    assert torch.count_nonzero(jf[:, n_h:]) == 0 and torch.count_nonzero(jf[2]) == 0 and f[2] == 0
    (e, je), (e_ref, je_ref) = _both(rows, lambda: rows.energy(s, species))
    torch.testing.assert_close(e, e_ref, rtol=1e-13, atol=1e-10)
    assert torch.count_nonzero(je[:, n_h:]) == 0


def test_nan_features_stay_nan():
    """A NaN feature (bad input upstream) must not come out as a finite energy, force or row."""
    nets, s, species, cols = _case((25, 25), torch.float64, seed=5)
    s[3, 2] = float("nan")
    rows = NetworkJacobians(nets, list(nets.parameters()))
    e, je = rows.energy(s, species)
    assert torch.isnan(e).all() and torch.isnan(je).any()
    f, jf = rows.forces(s, species, cols)
    touched = cols[:, 3].abs().sum(1) > 0  # labels whose column reaches atom 3
    assert torch.isnan(f[touched]).all() and not torch.isnan(f[~touched]).any()


@pytest.mark.parametrize("n_hidden", [(300,), (4,) * 8])
def test_networks_the_kernel_does_not_fit_take_the_torch_path(n_hidden):
    """Wider than 256 float32 units or deeper than 8 linear layers: the kernel declines, the rows are the torch
    path's."""
    nets, s, species, cols = _case(n_hidden, torch.float32, seed=6)
    rows = NetworkJacobians(nets, list(nets.parameters()))
    module = native_rows.rows_module()
    assert native_rows.force_rows(module, rows._layout, s, species, cols, 1.0, rows.n) is None
    (f, jf), (f_ref, jf_ref) = _both(rows, lambda: rows.forces(s, species, cols))
    assert torch.equal(jf, jf_ref) and torch.equal(f, f_ref)


def test_tied_weights_take_the_torch_path():
    """One Linear in two element networks: its columns would be scaled twice by the kernel, so it declines."""
    nets, s, species, cols = _case((6, 5), torch.float64, seed=7)
    nets.networks[1][2] = nets.networks[0][2]  # the second hidden layer shared
    rows = NetworkJacobians(nets, list(nets.parameters()))
    assert not rows._layout.disjoint
    assert native_rows.force_rows(native_rows.rows_module(), rows._layout, s, species, cols, 1.0, rows.n) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_column_table_gives_the_rows_of_its_dense_columns(dtype):
    """Columns as a table of slots (the feature kernel's layout, gathered by the rows kernel itself) give bitwise
    the rows of the gathered columns; the torch path gathers them first."""
    nets, s, species, _ = _case((6, 5), dtype, seed=8)
    g = torch.Generator().manual_seed(8)
    k, n_atoms, n_slots = 5, s.shape[0], 21
    table = torch.randn(k, n_atoms, n_slots, generator=g, dtype=dtype)  # (k, N, S)
    table[torch.rand(k, n_atoms, generator=g) < 0.4] = 0.0
    slot = torch.randint(0, n_slots, (2, 13), generator=g)  # (E, W)
    factor = torch.rand(2, 13, generator=g, dtype=dtype) + 0.5  # (E, W)
    cols = ColumnTable(table, slot, factor, species)
    dense = cols.dense()  # (k, N, W)
    assert dense.shape == cols.shape == (k, n_atoms, 13)
    rows = NetworkJacobians(nets, list(nets.parameters()))
    f, jf = rows.forces(s, species, cols)
    f_dense, jf_dense = rows.forces(s, species, dense)
    assert torch.equal(f, f_dense) and torch.equal(jf, jf_dense)
    rows.native = False
    f_torch, jf_torch = rows.forces(s, species, cols)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(jf_torch, jf, rtol=tol, atol=tol * float(jf.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_force_values_alone_equal_the_values_of_the_rows(dtype):
    """The force components without their rows (a threshold selection's candidates: by reverse mode, each atom's
    energy gradient dotted with its columns) equal those of the rows kernel (forward tangents) to round-off, for dense
    columns and for a column table, and a label whose columns are all zero gets exactly 0; the torch path gives the
    torch closed form's values."""
    nets, s, species, cols = _case((6, 5), dtype, seed=3, k=9)
    rows = NetworkJacobians(nets, list(nets.parameters()))
    f, _ = rows.forces(s, species, cols)
    got = rows.force_values(s, species, cols)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5 * float(f.abs().max()))
    assert got.shape == (9,) and got.dtype == dtype
    torch.testing.assert_close(got, f, **tol)
    g = torch.Generator().manual_seed(3)
    table = torch.randn(4, s.shape[0], 17, generator=g, dtype=dtype)  # (k, N, S)
    table[1] = 0.0  # a label whose sphere holds no atom: F = 0
    ct = ColumnTable(table, torch.randint(0, 17, (2, 13), generator=g), torch.rand(2, 13, generator=g, dtype=dtype),
                     species)
    f_t, _ = rows.forces(s, species, ct)
    got_t = rows.force_values(s, species, ct)
    torch.testing.assert_close(got_t, f_t, **tol)
    assert got_t[1] == 0 and f_t[1] == 0 and bool((f_t != 0).sum() == 3)
    rows.native = False
    torch.testing.assert_close(rows.force_values(s, species, cols), f, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=1e-5 if dtype == torch.float32 else 1e-12)
