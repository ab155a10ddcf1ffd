"""save_model / load_model round trips, n2p2 directories, helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ekf_plugin.models import load_model, model_cutoff, model_elements, save_model, water_bpnn
from ekf_plugin.units import BOHR
from tests.bpnn._systems import converter, randomise_scaling, water_pair
from tests.helpers import shared_data_path


def test_save_load_round_trip_with_weights_only(tmp_path):
    model = water_bpnn(dtype=torch.float64, seed=5)
    randomise_scaling(model, seed=2)
    model.output_modules[0].atom_energy.copy_(torch.tensor([-13.6, -2040.0]))
    path = save_model(model, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)  # our format needs no pickle
    assert raw["format"].startswith("ekf_plugin.bpnn")
    loaded = load_model(path)
    atoms = water_pair()
    a, b = model(converter(model)(atoms)), loaded(converter(loaded)(atoms))
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(a[key].detach().numpy(), b[key].detach().numpy(), rtol=1e-12, atol=1e-12)
    assert a["energy"].item() < -2000


def test_load_model_dtype_and_helpers(tmp_path):
    model = water_bpnn(seed=1)  # float32
    loaded = load_model(save_model(model, tmp_path / "m.pt"), dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64
    out = loaded(converter(loaded)(water_pair()))
    assert out["energy"].dtype == torch.float64 and out["stress"].shape == (1, 3, 3)
    assert model_cutoff(loaded) == pytest.approx(12 * BOHR, rel=1e-6)
    assert model_elements(loaded) == [1, 8]


def test_load_model_reads_n2p2_directory():
    model = load_model(shared_data_path("n2p2-h2o-potentials", "H2O_RPBE-D3"))
    assert model_elements(model) == [1, 8]
    out = model(converter(model)(water_pair()))
    assert set(out) >= {"energy", "forces", "stress"}


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither"):
        load_model(tmp_path / "other.pt")
