"""The study's water preset: counts, documented order, equality with n2p2's input.nn."""

from __future__ import annotations

import pytest
import torch

from ekf_plugin.bpnn import BehlerParrinello, G2, G3, water_paper, water_paper_bohr
from ekf_plugin.bpnn.cutoff import CutoffFunction
from ekf_plugin.bpnn.presets import from_config
from ekf_plugin.units import BOHR
from tests.helpers import shared_data_path


def test_water_preset_has_30_oxygen_and_27_hydrogen_functions_in_documented_order():
    fs = water_paper_bohr()
    o = [f for f in fs if f.center == "O"]
    h = [f for f in fs if f.center == "H"]
    assert len(o) == 30 and len(h) == 27
    blocks = lambda fs: [(type(f).__name__, getattr(f, "neighbor", None) or f.neighbors) for f in fs]
    assert blocks(o) == [("G2", "H")] * 8 + [("G2", "O")] * 8 + [("G3", ("H", "H"))] * 6 + [("G3", ("H", "O"))] * 4 + [("G3", ("O", "O"))] * 4
    assert blocks(h) == [("G2", "H")] * 8 + [("G2", "O")] * 8 + [("G3", ("H", "O"))] * 7 + [("G3", ("O", "O"))] * 4
    assert [f.eta for f in o[:8]] == [0.001, 0.01, 0.03, 0.06, 0.15, 0.30, 0.60, 1.50]
    assert [f.rs for f in o[:8]] == [0.0] * 4 + [0.9] * 4
    assert {f.rs for f in o[12:16]} == {4.0} and {f.rs for f in h[4:8]} == {1.9}
    assert [(f.lam, f.zeta, f.eta) for f in h[16:23]] == [(1, 4, 0.01), (1, 1, 0.03), (1, 1, 0.07), (1, 1, 0.2),
                                                          (-1, 4, 0.01), (-1, 1, 0.03), (-1, 1, 0.07)]
    rep = BehlerParrinello(["H", "O"])
    assert rep.n_features == [27, 30] and rep.n_atom_basis == 30
    assert float(rep.cutoff) == pytest.approx(12 * BOHR)


def test_preset_in_angstrom_is_the_bohr_set_converted():
    for a, b in zip(water_paper(), water_paper_bohr()):
        assert a.eta == pytest.approx(b.eta / BOHR**2) and a.rs == pytest.approx(b.rs * BOHR)


def test_preset_equals_n2p2_input_nn():
    path = shared_data_path("n2p2-h2o-rpbe-d3", "input.nn")
    lines = set()
    for line in path.read_text().splitlines():
        s = line.split("#")[0].split()
        if s and s[0] == "symfunction_short":
            if s[2] == "2":
                lines.add(("G2", s[1], (s[3],), float(s[4]), float(s[5]), None, None))
            else:
                lines.add(("G3", s[1], tuple(sorted((s[3], s[4]))), float(s[5]), 0.0, float(s[6]), float(s[7])))
    ours = set()
    for f in water_paper_bohr():
        if isinstance(f, G2):
            ours.add(("G2", f.center, (f.neighbor,), f.eta, f.rs, None, None))
        else:
            ours.add(("G3", f.center, tuple(sorted(f.neighbors)), f.eta, f.rs, f.lam, f.zeta))
    assert len(lines) == 57 and ours == lines


def test_config_mappings_and_bad_arguments():
    fs = from_config([{"center": "O", "type": "G2", "neighbors": ["H"], "eta": 0.01, "rs": 1.0},
                      {"center": 8, "type": "G3", "neighbors": ["H", "O"], "eta": 0.01, "lambda": -1, "zeta": 2}], "Bohr")
    assert isinstance(fs[0], G2) and fs[0].rs == pytest.approx(BOHR) and fs[0].eta == pytest.approx(0.01 / BOHR**2)
    assert isinstance(fs[1], G3) and fs[1].neighbors == ("H", "O")
    with pytest.raises(ValueError, match="lambda"):
        G3("O", ("H", "H"), 0.1, 0.5, 1.0)
    with pytest.raises(ValueError, match="not in the model's elements"):
        BehlerParrinello(["O"], [G2("O", "H", 0.1)])
    with pytest.raises(ValueError, match="n_atom_basis"):
        BehlerParrinello(["H", "O"], n_atom_basis=12)
    with pytest.raises(ValueError, match="preset"):
        BehlerParrinello(["H", "O"], "nope")


@pytest.mark.parametrize("kind", ["cos", "tanhu", "tanh", "exp", "poly1", "poly2", "poly3", "poly4"])
def test_cutoff_functions_vanish_smoothly(kind):
    fc = CutoffFunction(4.0, kind, alpha=0.0)
    r = torch.linspace(0.5, 4.5, 401, dtype=torch.float64, requires_grad=True)
    f = fc(r)
    (df,) = torch.autograd.grad(f.sum(), r)
    assert torch.all(f[r.detach() >= 4.0] == 0)
    near = (r.detach() > 3.999) & (r.detach() < 4.0)
    assert torch.all(f.detach() >= 0) and torch.all(f.detach() <= 1.0 + 1e-12)
    assert torch.all(df[r.detach() <= 3.9] <= 1e-12)  # monotone non-increasing
    if kind not in ("cos",):
        r0 = torch.tensor([4.0 - 1e-6], dtype=torch.float64, requires_grad=True)
        (d0,) = torch.autograd.grad(fc(r0).sum(), r0)
        assert abs(float(d0)) < 1e-6
    if kind == "tanh":
        assert float(CutoffFunction(4.0, "tanh")(torch.tensor([0.0]))) == pytest.approx(1.0)
    del near


def test_cutoff_rejects_bad_arguments():
    with pytest.raises(ValueError):
        CutoffFunction(-1.0)
    with pytest.raises(ValueError):
        CutoffFunction(1.0, "nope")
