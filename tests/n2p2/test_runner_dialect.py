"""Loading RuNNer-dialect potentials: parity with n2p2, the float64 fix, every variant and every refusal."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from ekf_plugin.models import water_bpnn
from ekf_plugin.n2p2 import export_n2p2, load_n2p2_potential, parse_input_nn, read_input_data, read_scaling
from ekf_plugin.units import BOHR, HARTREE
from tests.bpnn._systems import converter, randomise_scaling, water_cluster, water_pair
from tests.helpers import shared_data_path
from tests.n2p2._runner import FREE_ATOM_HA, write_runner_copy

FRAMES = [0, 7, 9, 19]  # 192, 192, 96 and 48 atoms


def _errors(model, frames, ref):
    conv = converter(model)
    de, df = [], []
    for atoms, r in zip(frames, ref):
        out = model(conv(atoms))
        de.append((out["energy"].item() / HARTREE - r["energy_Ha"]) / len(atoms))  # Ha/atom
        df.append(np.abs(out["forces"].detach().numpy() / (HARTREE / BOHR) - np.array(r["forces_Ha_per_Bohr"])).max())
    return np.array(de), np.array(df)


def _reference(indices):
    frames = read_input_data(shared_data_path("n2p2-h2o-rpbe-d3", "input.data"))
    ref = json.loads(shared_data_path("n2p2-h2o-rpbe-d3", "n2p2_predictions.json").read_text())
    return [frames[i] for i in indices], [ref[i] for i in indices]


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "scaling, atom_energies, range_keywords",
    [("scalecenter", None, "absent"), ("center", FREE_ATOM_HA, "runner"), ("none", None, "absent")],
)
def test_runner_copy_matches_n2p2_predictions(tmp_path, scaling, atom_energies, range_keywords):
    """A RuNNer-dialect copy of H2O_RPBE-D3 (``!`` comments, five-column scaling.data with the energy line,
    elements ``O H``, no energy normalisation: output biases of −25 to +49 Ha) gives n2p2's own
    predictions within 1e-7 Ha/atom and 1e-6 Ha/Bohr (measured: ~1e-14 both)."""
    src = shared_data_path("n2p2-h2o-potentials", "H2O_RPBE-D3")
    d = write_runner_copy(src, tmp_path / "runner", scaling, atom_energies, range_keywords)
    text = (d / "input.nn").read_text()
    assert "!" in text and "elements O H" in text and "mean_energy" not in text
    assert len((d / "scaling.data").read_text().splitlines()[-1].split()) == 2
    model = load_n2p2_potential(d)
    assert model.n2p2_source["dialect"] == "runner" and model.n2p2_source["scaling"] == scaling
    biases = [abs(net[-1].bias.item()) for net in model.output_modules[0].networks]
    assert min(biases) > 20.0  # Ha: the unnormalised case of the issue
    de, df = _errors(model, *_reference(FRAMES))
    assert np.abs(de).max() < 1e-7 and df.max() < 1e-6, (de, df)
    assert np.abs(de).max() < 1e-10 and df.max() < 1e-10, (de, df)  # what float64 all the way gives


@pytest.mark.shared_data
def test_weights_go_straight_into_float64(tmp_path):
    """The cause of the constant offset: weights rounded to float32 before the cast to float64.

    The loaded parameters equal the file's numbers bit for bit; rounding them through float32 (the old
    loader) moves every frame's energy by the same ~5e-7 Ha/atom here (output biases of ~25 Ha), which
    is what this test would see with the old implementation."""
    src = shared_data_path("n2p2-h2o-potentials", "H2O_RPBE-D3")
    d = write_runner_copy(src, tmp_path / "runner")
    model = load_n2p2_potential(d)
    for z, net in zip((1, 8), model.output_modules[0].networks):
        values = np.array([float(x) for x in (d / f"weights.{z:03d}.data").read_text().split()])
        assert net[-1].bias.dtype == torch.float64
        assert net[-1].bias.item() == values[-1]  # bit-exact
        assert net[0].weight[3, 0].item() == values[3]  # first weight of neuron 4 (j = 0 outer, k inner)
    frames, ref = _reference([17, 19])
    de, _ = _errors(model, frames, ref)
    assert np.abs(de).max() < 1e-10
    with torch.no_grad():
        for p in model.output_modules[0].parameters():
            p.copy_(p.float().double())
    de32, _ = _errors(model, frames, ref)
    assert np.abs(de32).min() > 1e-7 and abs(de32[0] - de32[1]) < 0.05 * abs(de32[0])  # constant, above 1e-7


# ---- small synthetic potentials (no shared data) --------------------------------------------
@pytest.fixture
def exported(tmp_path):
    """A random plugin BPNN (Bohr/Hartree export) and its n2p2 directory."""
    model = water_bpnn(dtype=torch.float64, seed=5, energy_scale=0.5, atom_energies={"H": -12.0, "O": -2035.0})
    randomise_scaling(model, 2)
    d = export_n2p2(model, tmp_path / "pot", "Bohr", "Hartree")
    return model, d


def _energy(model, atoms=None):
    atoms = atoms if atoms is not None else water_cluster(3)
    return model(converter(model)(atoms))["energy"].item()


def _edit(d, pattern, repl):
    p = d / "input.nn"
    text, n = re.subn(pattern, repl, p.read_text(), flags=re.M)
    assert n, pattern
    p.write_text(text)


def test_parse_input_nn_comments_aliases_and_case(tmp_path):
    p = tmp_path / "input.nn"
    p.write_text("Elements H O   ! RuNNer comment\nsymfunction H 2 O 0.01 0.0 12.0 ! eta rs rc\n"
                 "scale_min_short_atomic -1.0 # n2p2 comment\natom_energy H -0.5 ! free atom\nuse_short_nn\n")
    s = parse_input_nn(p)
    assert s["elements"] == ["H", "O"]
    assert s["symfunction_short"] == [["H", "2", "O", "0.01", "0.0", "12.0"]]
    assert s["scale_min_short"] == ["-1.0"] and s["atom_energy"] == {"H": -0.5}
    assert s["_runner_markers"] == ["scale_min_short_atomic", "use_short_nn"]
    p.write_text("elements H O\nelements H O\n")
    with pytest.raises(ValueError, match="given twice"):
        parse_input_nn(p)


def test_read_scaling_five_columns_and_energy_line(tmp_path):
    p = tmp_path / "scaling.data"
    p.write_text("1 1 0.1 0.9 0.5\n1 2 0.2 0.8 0.4\n2 1 1.0 2.0 1.5\n -25.6 -25.4\n")
    s = read_scaling(p, 2)
    assert s[0].shape == (2, 4) and np.isnan(s[0][:, 3]).all() and s[1][0, :3].tolist() == [1.0, 2.0, 1.5]
    p.write_text("1 1 0.1 0.9 0.5\n -25.6 -25.4\n2 1 1.0 2.0 1.5\n")  # two numbers not at the end
    with pytest.raises(ValueError, match=r"scaling.data:2: expected 5 \(RuNNer\) or 6"):
        read_scaling(p, 2)


def test_scaling_variants_and_normalize_nodes_give_the_same_model(exported):
    """scale_symmetry_functions_sigma (mean = min, σ = max − min) and normalize_nodes (weights × width)
    rewrite the same potential; each must predict the same energy."""
    model, d = exported
    e0 = _energy(model)
    assert _energy(load_n2p2_potential(d)) == pytest.approx(e0, abs=1e-10)
    rows = []
    for line in (d / "scaling.data").read_text().splitlines():
        s = line.split()
        if s and not s[0].startswith("#"):
            mn, mx = float(s[2]), float(s[3])
            rows.append(f"{s[0]} {s[1]} {mn!r} {mx!r} {mn!r} {mx - mn!r}")
    (d / "scaling.data").write_text("\n".join(rows) + "\n")
    _edit(d, r"^scale_symmetry_functions$", "scale_symmetry_functions_sigma")
    assert load_n2p2_potential(d).n2p2_source["scaling"] == "scalesigma"
    assert _energy(load_n2p2_potential(d)) == pytest.approx(e0, abs=1e-9)
    for z in (1, 8):  # normalize_nodes: n2p2 divides each pre-activation by the previous layer's width
        p = d / f"weights.{z:03d}.data"
        lines = [s.split() for s in p.read_text().splitlines() if not s.startswith("#")]
        widths = {0: 30 if z == 8 else 27, 1: 25, 2: 25}
        out = []
        for s in lines:
            layer_in = int(s[3]) if s[1] == "a" else int(s[3]) - 1
            out.append(f"{float(s[0]) * widths[layer_in]!r}")
        p.write_text("\n".join(out) + "\n")
    (d / "input.nn").write_text((d / "input.nn").read_text() + "normalize_nodes\n")
    assert _energy(load_n2p2_potential(d)) == pytest.approx(e0, abs=1e-8)


def test_atom_energy_dialects(exported):
    """n2p2 always adds atom_energy; RuNNer only with remove_atom_energies."""
    model, d = exported
    atoms = water_cluster(3)
    e_n2p2 = _energy(load_n2p2_potential(d), atoms)
    offsets = parse_input_nn(d / "input.nn")["atom_energy"]
    total = (3 * offsets["O"] + 6 * offsets["H"]) * HARTREE
    (d / "input.nn").write_text((d / "input.nn").read_text() + "runner_mode 3 ! RuNNer\n")
    runner = load_n2p2_potential(d)
    assert runner.n2p2_source["dialect"] == "runner"
    assert _energy(runner, atoms) == pytest.approx(e_n2p2 - total, abs=1e-8)
    (d / "input.nn").write_text((d / "input.nn").read_text() + "remove_atom_energies\n")
    assert _energy(load_n2p2_potential(d), atoms) == pytest.approx(e_n2p2, abs=1e-10)
    assert _energy(load_n2p2_potential(d, dialect="n2p2"), atoms) == pytest.approx(e_n2p2, abs=1e-10)


def test_scale_range_defaults_to_0_1(exported):
    """scale_min_short/scale_max_short absent = 0/1 (n2p2's defaults), not the model's −1/1."""
    model, d = exported
    _edit(d, r"^scale_min_short .*\n", "")
    _edit(d, r"^scale_max_short .*\n", "")
    loaded = load_n2p2_potential(d)
    assert loaded.representation.scale_range == (0.0, 1.0)
    assert _energy(loaded) != pytest.approx(_energy(model), abs=1e-3)


@pytest.mark.parametrize(
    "line, message",
    [
        ("symfunction_short O 9 H H 0.01 1.0 1.0 12.0", "type 9 .wide angular. is not supported"),
        ("symfunction_short O 12 H H 1.0 1.0 12.0 4.0 6.0", "type 12 .polynomial angular. is not supported"),
        ("symfunction_short O 13 H H 1.0 1.0 12.0 4.0 6.0", "type 13"),
        ("use_electrostatics", "'use_electrostatics'"),
        ("nnp_generation 4", "nnp_type 4"),
        ("global_symfunction_short 2 0.01 0.0 12.0", "'global_symfunction_short'"),
        ("element_nodes_short O 10 10", "'element_nodes_short'"),
        ("atom_energy C -37.0", "atom_energy for 'C'"),
        ("(no mean_energy)", "incorrect normalisation header"),
        ("nn_type_short 2", "nn_type_short 2"),
    ],
)
def test_refusals_name_the_keyword(exported, line, message):
    _, d = exported
    if line == "(no mean_energy)":
        _edit(d, r"^mean_energy .*\n", "")
    else:
        (d / "input.nn").write_text((d / "input.nn").read_text() + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_n2p2_potential(d)


def test_refusals_activation_and_missing_header(exported):
    _, d = exported
    _edit(d, r"^global_activation_short .*$", "global_activation_short r r l")
    with pytest.raises(ValueError, match=r"activation\(s\) \['r'\] not supported"):
        load_n2p2_potential(d)
    _edit(d, r"^global_activation_short .*$", "global_activation_short t t l")
    for key in ("mean_energy", "conv_energy", "conv_length"):
        _edit(d, rf"^{key} .*\n", "")
    (d / "input.nn").write_text((d / "input.nn").read_text() + "normalize_data_set 1\n")
    with pytest.raises(ValueError, match="normalize_data_set is set but"):
        load_n2p2_potential(d)


def test_runner_sort_order_differs_only_for_angular_rs(tmp_path):
    """RuNNer sorts angular functions (η, ζ, λ, r_s), n2p2 (η, r_s, ζ, λ); with r_s ≠ 0 the loaded
    feature order follows the dialect."""
    from ekf_plugin.n2p2.reader import n2p2_symmetry_functions

    s = {"symfunction_short": [["O", "3", "H", "H", "0.01", "1.0", "1.0", "12.0", "0.5"],
                               ["O", "3", "H", "H", "0.01", "1.0", "4.0", "12.0", "0.0"]]}
    n2p2 = [f["zeta"] for f in n2p2_symmetry_functions(s, ["H", "O"], "n2p2")]
    runner = [f["zeta"] for f in n2p2_symmetry_functions(s, ["H", "O"], "runner")]
    assert n2p2 == [4.0, 1.0] and runner == [1.0, 4.0]


def test_periodic_and_cluster_parity_after_units(exported):
    """Bohr/Hartree files, Å/eV model: a loaded export agrees with the source for a cell and a cluster."""
    model, d = exported
    loaded = load_n2p2_potential(d)
    for atoms in (water_pair(), water_cluster(4)):
        a, b = model(converter(model)(atoms)), loaded(converter(loaded)(atoms))
        assert abs(a["energy"].item() - b["energy"].item()) < 1e-10
        assert (a["forces"] - b["forces"]).abs().max().item() < 1e-10
