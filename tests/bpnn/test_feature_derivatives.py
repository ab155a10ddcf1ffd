"""∂G/∂r columns from the local pairs and triples equal the full autograd Jacobian of the features."""

from __future__ import annotations

import pytest
import torch

import schnetpack.properties as props
from ekf_plugin.bpnn import G2, G3, BehlerParrinello
from ekf_plugin.bpnn.representation import pair_vectors
from ekf_plugin.models import water_bpnn

from ._systems import converter, randomise_scaling, water_cluster, water_pair

CUSTOM = [  # r_s ≠ 0, non-integer ζ, all element triplets incl. H–HH (Å)
    G2("O", "H", 0.5, 0.9), G2("H", "O", 0.3, 1.2), G2("H", "H", 0.2),
    G3("O", ("H", "H"), 0.1, 1.0, 1.5, 0.4), G3("O", ("H", "O"), 0.05, -1.0, 2.0),
    G3("H", ("H", "H"), 0.02, 1.0, 3.0), G3("H", ("O", "O"), 0.03, -1.0, 1.0, 0.2),
]


def _full_jacobian(rep, batch):
    """(3N, N, W) ∂s/∂r of the scaled features by autograd over all positions."""
    species = rep.species_table[batch[props.Z]]

    def scaled(r):
        s = dict(batch)
        s[props.R] = r
        s[props.Rij] = pair_vectors(s)
        return rep(s)["scalar_representation"]  # (N, W)

    jac = torch.autograd.functional.jacobian(scaled, batch[props.R])  # (N, W, N, 3)
    assert species.numel() == jac.shape[0]
    return jac.permute(2, 3, 0, 1).reshape(-1, jac.shape[0], jac.shape[1])


@pytest.mark.parametrize("system", ["periodic_pair", "cluster"])
@pytest.mark.parametrize("convention", ["n2p2", "ordered"])
@pytest.mark.parametrize("functions", ["water_paper", "custom"])
def test_columns_equal_autograd_jacobian(system, convention, functions):
    # the 5.5 Å box is smaller than 2 r_c: atoms see several periodic images of the same neighbour
    atoms = water_pair() if system == "periodic_pair" else water_cluster(4)
    sf = CUSTOM if functions == "custom" else functions
    cutoff_type = "cos" if functions == "custom" else "tanhu"
    rep = BehlerParrinello(("H", "O"), sf, cutoff=6.35, cutoff_type=cutoff_type, angular_convention=convention).double()
    model = water_bpnn(dtype=torch.float64)
    model.representation = rep
    randomise_scaling(model)
    batch = converter(model)(atoms)
    batch[props.Rij] = pair_vectors(batch)
    n = len(atoms)
    ref = _full_jacobian(rep, batch)  # (3N, N, W)
    flat = torch.arange(3 * n)
    cols = rep.feature_columns(batch, flat // 3, flat % 3)  # (3N, N, W)
    assert float(ref.abs().max()) > 1e-2
    torch.testing.assert_close(cols, ref, rtol=1e-10, atol=1e-12)


def test_columns_of_an_atom_without_neighbours_are_zero():
    atoms = water_cluster(2)
    atoms.positions[3:] += 20.0  # second molecule far away
    model = water_bpnn(dtype=torch.float64)
    batch = converter(model)(atoms)
    batch[props.Rij] = pair_vectors(batch)
    cols = model.representation.feature_columns(batch, torch.tensor([0, 4]), torch.tensor([1, 2]))  # (2, N, W)
    assert float(cols[0, :3].abs().max()) > 0  # atom 0 moves its own molecule's features
    assert float(cols[0, 3:].abs().max()) == 0.0  # but not the far molecule's
    assert float(cols[1, :3].abs().max()) == 0.0


def test_radial_only_functions():
    rep = BehlerParrinello(("H", "O"), [G2("O", "H", 0.5), G2("H", "O", 0.3), G2("H", "H", 0.2)], cutoff=6.35).double()
    model = water_bpnn(dtype=torch.float64)
    model.representation = rep
    batch = converter(model)(water_pair())
    batch[props.Rij] = pair_vectors(batch)
    flat = torch.arange(3 * len(water_pair()))
    torch.testing.assert_close(rep.feature_columns(batch, flat // 3, flat % 3), _full_jacobian(rep, batch))
