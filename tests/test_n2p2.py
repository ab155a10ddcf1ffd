"""n2p2 interoperability: reading input.data and the parity of a loaded potential with n2p2 itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ekf_plugin.n2p2 import assign_weights, load_n2p2_potential, read_input_data
from ekf_plugin.units import BOHR, HARTREE
from tests.bpnn._systems import converter
from tests.helpers import shared_data_path


def test_read_input_data_units_and_counts():
    path = shared_data_path("n2p2-h2o-rpbe-d3", "input.data")
    frames = read_input_data(path)
    assert len(frames) == 20
    assert sorted({len(a) for a in frames}) == [48, 96, 192]
    first = [line.split() for line in path.read_text().splitlines()[:12]]
    atom = next(s for s in first if s[0] == "atom")
    lattice = next(s for s in first if s[0] == "lattice")
    np.testing.assert_allclose(frames[0].positions[0], np.array(atom[1:4], float) * BOHR)
    np.testing.assert_allclose(frames[0].get_forces()[0], np.array(atom[7:10], float) * HARTREE / BOHR)
    assert frames[0].cell[0, 0] == pytest.approx(float(lattice[1]) * BOHR)
    assert frames[0].get_chemical_symbols()[0] == atom[4]


def test_assign_weights_follows_n2p2_connection_order():
    from ekf_plugin.bpnn.networks import mlp

    net = mlp(2, [3], "tanh")
    values = np.arange(1, 2 * 3 + 3 + 3 * 1 + 1 + 1, dtype=float)  # 13 connections
    assign_weights(net, values)
    # a(l_s=0, n_s=j) -> (l_e=1, n_e=k) is value 1 + 3 j + k: neuron k of layer 1 has weights [1+k, 4+k]
    np.testing.assert_array_equal(net[0].weight.detach().numpy(), [[1, 4], [2, 5], [3, 6]])
    np.testing.assert_array_equal(net[0].bias.detach().numpy(), [7, 8, 9])
    np.testing.assert_array_equal(net[2].weight.detach().numpy(), [[10, 11, 12]])
    with pytest.raises(ValueError, match="weights file has"):
        assign_weights(net, values[:-1])


def test_parity_with_n2p2_predictions():
    """Energies within 1e-7 Ha/atom, forces within 1e-6 Ha/Bohr of n2p2's own float64 predictions."""
    model = load_n2p2_potential(shared_data_path("n2p2-h2o-potentials", "H2O_RPBE-D3"))
    frames = read_input_data(shared_data_path("n2p2-h2o-rpbe-d3", "input.data"))
    ref = json.loads(shared_data_path("n2p2-h2o-rpbe-d3", "n2p2_predictions.json").read_text())
    assert len(ref) == len(frames) == 20
    conv = converter(model)
    de, df = [], []
    for atoms, r in zip(frames, ref):
        out = model(conv(atoms))
        de.append(abs(out["energy"].item() / HARTREE - r["energy_Ha"]) / len(atoms))
        df.append(np.abs(out["forces"].detach().numpy() / (HARTREE / BOHR) - np.array(r["forces_Ha_per_Bohr"])).max())
    assert max(de) < 1e-7, max(de)
    assert max(df) < 1e-6, max(df)
    # float64 from the file to the output (measured 1.9e-14 Ha/atom, 4.8e-15 Ha/Bohr); weights rounded
    # through float32 before the cast (the loader before issue 14) gave 1.3e-9 Ha/atom and 1.3e-8 Ha/Bohr here
    assert max(de) < 1e-11 and max(df) < 1e-11, (max(de), max(df))
    # the model really predicts (differs from the DFT labels by a typical NNP error, not by 0)
    assert model.representation.n_features == [27, 30]


def test_potential_gives_stress_for_cells():
    model = load_n2p2_potential(shared_data_path("n2p2-h2o-potentials", "H2O_RPBE-D3"))
    atoms = read_input_data(shared_data_path("n2p2-h2o-rpbe-d3", "input.data"))[-1]
    out = model(converter(model)(atoms))
    assert out["stress"].shape == (1, 3, 3) and torch.isfinite(out["stress"]).all()
    assert out["energy"].dtype == torch.float64


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="input.nn"):
        load_n2p2_potential(tmp_path)


# ---- issue 13 (safety): the error bound the parity test's comment promises, stress vs finite differences ----


def test_potential_error_against_dft_labels_is_a_typical_nnp_error():
    """The RPBE-D3 potential on its RPBE-D3 frames: not 0 (it predicts, it does not echo the labels), and
    within a trained NNP's error. For speed the 13 frames of 48 and 96 atoms (measured 0.93 meV/atom and
    40 meV/Å RMSE; all 20 frames: 0.78 meV/atom, 38 meV/Å)."""
    model = load_n2p2_potential(shared_data_path("n2p2-h2o-potentials", "H2O_RPBE-D3"))
    frames = [a for a in read_input_data(shared_data_path("n2p2-h2o-rpbe-d3", "input.data")) if len(a) < 192]
    assert len(frames) == 13
    conv = converter(model)
    de, df = [], []
    for atoms in frames:
        out = model(conv(atoms))
        de.append((out["energy"].item() - atoms.get_potential_energy()) / len(atoms))  # eV/atom
        df.append((out["forces"].detach().numpy() - atoms.get_forces()).ravel())  # eV/Å
    rmse_e = 1e3 * float(np.sqrt(np.mean(np.square(de))))  # meV/atom
    rmse_f = 1e3 * float(np.sqrt(np.mean(np.square(np.concatenate(df)))))  # meV/Å
    assert 0.2 < rmse_e < 3.0, rmse_e
    assert 10.0 < rmse_f < 100.0, rmse_f


def test_potential_stress_matches_finite_differences_of_the_energy():
    """stress = (1/V) ∂E/∂ε (eV/Å³) against central differences of E under a homogeneous strain (h = 1e-5)."""
    model = load_n2p2_potential(shared_data_path("n2p2-h2o-potentials", "H2O_RPBE-D3"))
    atoms = min(read_input_data(shared_data_path("n2p2-h2o-rpbe-d3", "input.data")), key=len)  # 48 atoms
    conv = converter(model)
    stress = model(conv(atoms))["stress"][0].detach().numpy()  # (3, 3) eV/Å³

    def energy(eps):
        strained = atoms.copy()
        strained.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        return model(conv(strained))["energy"].item()

    h, volume = 1e-5, atoms.get_volume()
    for i, j in ((0, 0), (2, 2), (0, 1), (1, 2)):
        eps = np.zeros((3, 3))
        eps[i, j] = eps[j, i] = h if i == j else h / 2
        numeric = (energy(eps) - energy(-eps)) / (2 * h) / volume
        assert stress[i, j] == pytest.approx(numeric, abs=1e-7), (i, j)
    assert np.abs(stress).max() > 1e-3, "a liquid-water cell is not stress free: the comparison is not vacuous"
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)


# ---- end issue 13 block ----
