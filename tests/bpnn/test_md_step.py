"""The BPNN MD step (ekf_plugin.bpnn.md_step): same physics as the SchNetPack model, forces and virial
against finite differences, Verlet-list reuse, n2p2 parity through the evaluator, and the dispatch.

Most run the kernels eagerly; the exactness tests also run the native C++ kernels (``compile="native"``,
built in about a second where a C++ compiler exists, skipped otherwise). Set ``EKF_PLUGIN_TEST_COMPILE=1``
to also check the ``torch.compile`` path (tens of seconds).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ekf_plugin.bpnn import G2, G3
from ekf_plugin.bpnn.md_step import BPNNStep, VerletList, supports
from ekf_plugin.evaluation import ModelEvaluator
from ekf_plugin.models import water_bpnn

from ._systems import randomise_scaling

TRICLINIC = np.array([[6.2, 0.0, 0.0], [1.3, 6.0, 0.0], [0.6, -1.0, 5.9]])  # Å, rows

# r_s != 0 in G2 and G3, non-integer ζ, an H–HH triplet, all element triplets
CUSTOM = [G2("O", "H", 0.5, 0.3), G2("O", "O", 0.1), G2("O", "O", 0.3, 2.0), G2("H", "O", 0.2, 1.0),
          G2("H", "H", 0.05), G3("O", ("H", "H"), 0.05, 1.0, 1.0), G3("O", ("H", "H"), 0.02, -1.0, 4.0),
          G3("O", ("H", "O"), 0.03, -1.0, 2.5, 0.4), G3("O", ("O", "O"), 0.02, 1.0, 2.0),
          G3("H", ("H", "O"), 0.07, -1.0, 2.0), G3("H", ("O", "O"), 0.01, 1.0, 1.0),
          G3("H", ("H", "H"), 0.04, 1.0, 3.0, 0.2)]


def water_box(n_side: int = 2, spacing: float = 3.1, seed: int = 0, cell: np.ndarray = TRICLINIC):
    """(numbers, positions Å, cell Å): n_side³ water molecules on a jittered grid in ``cell``."""
    rng = np.random.default_rng(seed)
    mol = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    frac = (np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.25) / n_side
    pos, z = [], []
    for f in frac:
        q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        pos.extend(mol @ q.T + f @ cell + rng.normal(0, 0.05, 3))
        z.extend([8, 1, 1])
    return np.array(z), np.array(pos), cell


def make_model(functions="water_paper", cutoff=4.0, cutoff_type="tanhu", convention="n2p2", seed=3, dtype=torch.float64):
    m = water_bpnn(symmetry_functions=functions, cutoff=cutoff, cutoff_type=cutoff_type, angular_convention=convention,
                   dtype=dtype, seed=seed, atom_energies={"H": -13.1, "O": -430.0}, energy_scale=0.7)
    randomise_scaling(m, seed)
    return m.eval()


def general(model, z, r, h):
    return ModelEvaluator(model, fast_path=False)(z, r, h)


KERNELS = [False, "native"]  # eager torch ops, the native C++ loops


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small tensors: on a loaded 2-core machine two intra-op threads made the 1000-move test 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def step_with(model, kernels, **kw) -> BPNNStep:
    """A BPNNStep with the given kernels; skips when the native ones cannot be built here."""
    step = BPNNStep(model, compile=kernels, **kw)
    if kernels == "native" and step.compile != "native":
        pytest.skip("no C++ compiler: the native kernels fell back to eager")
    return step


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("functions,cutoff_type,convention", [("water_paper", "tanhu", "n2p2"),
                                                             (CUSTOM, "cos", "ordered"),
                                                             (CUSTOM, "poly2", "n2p2")])
def test_equals_the_schnetpack_model(functions, cutoff_type, convention, kernels):
    """Energy, forces, stress and virial equal the model's autograd path to round-off (triclinic cell,
    cutoff 4 Å > half the smallest box height, so several images of a neighbour count)."""
    model = make_model(functions, cutoff_type=cutoff_type, convention=convention)
    z, r, h = water_box()
    ref = general(model, z, r, h)
    ev = ModelEvaluator(model, compile=kernels)
    assert isinstance(ev.fast, BPNNStep)
    if kernels == "native" and ev.fast.compile != "native":
        pytest.skip("no C++ compiler")
    got = ev(z, r, h)
    assert got.energy == pytest.approx(ref.energy, rel=1e-13, abs=1e-11)
    np.testing.assert_allclose(got.forces, ref.forces, rtol=0, atol=1e-11)
    np.testing.assert_allclose(got.stress, ref.stress, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.virial, ref.virial, rtol=0, atol=1e-10)
    assert np.abs(ref.forces).max() > 1e-2 and np.abs(ref.virial).max() > 1e-2  # not trivially zero
    assert ev.fast.n_triples > 0


@pytest.mark.parametrize("kernels", KERNELS)
def test_forces_and_virial_match_finite_differences(kernels):
    model = make_model(CUSTOM)
    z, r, h = water_box(seed=1)
    step = step_with(model, kernels, skin=0.3)
    e0 = lambda rr, hh: float(step(z, rr, hh).energy)  # noqa: E731
    res = step(z, r, h)
    d = 1e-5
    for k, c in [(0, 0), (4, 1), (13, 2), (23, 0)]:
        rp, rm = r.copy(), r.copy()
        rp[k, c] += d
        rm[k, c] -= d
        fd = -(e0(rp, h) - e0(rm, h)) / (2 * d)
        assert float(res.forces[k, c]) == pytest.approx(fd, rel=1e-6, abs=1e-7)
    for a, b in [(0, 0), (1, 1), (2, 2), (0, 1), (2, 0), (1, 2)]:
        eps = np.zeros((3, 3))
        eps[a, b] = d
        up, dn = np.eye(3) + eps, np.eye(3) - eps
        fd = -(e0(r @ up.T, h @ up.T) - e0(r @ dn.T, h @ dn.T)) / (2 * d)  # W_ab = −∂E/∂ε_ab
        assert float(0.5 * (res.virial[a, b] + res.virial[b, a])) == pytest.approx(fd, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("kernels", KERNELS)
def test_verlet_list_reuse_equals_fresh_evaluation_after_1000_moves(kernels):
    """1000 small random moves and cell strains (NPT-like): results equal a fresh evaluation to
    round-off, the list is reused between rebuilds, and it is rebuilt when needed."""
    model = make_model([G2("O", "H", 0.5, 0.3), G2("H", "O", 0.2), G2("H", "H", 0.1), G2("O", "O", 0.1),
                        G3("O", ("H", "H"), 0.05, 1.0, 4.0), G3("H", ("H", "O"), 0.07, -1.0, 1.0),
                        G3("O", ("H", "O"), 0.03, 1.0, 1.0)], cutoff=3.5)
    z, r, h = water_box(seed=2)
    step = step_with(model, kernels, skin=0.4)
    rng = np.random.default_rng(0)
    max_dev = 0.0
    for it in range(1000):
        r = r + rng.normal(0, 0.01, r.shape)
        h = h @ (np.eye(3) + rng.normal(0, 2e-4, (3, 3)))
        res = step(z, r, h)
        if it % 250 == 249:
            fresh = BPNNStep(model, skin=0.4)(z, r, h)
            scale = float(fresh.forces.abs().max())
            max_dev = max(max_dev, float((res.forces - fresh.forces).abs().max()) / scale)
            assert float(res.energy) == pytest.approx(float(fresh.energy), rel=1e-13)
            torch.testing.assert_close(res.virial, fresh.virial, rtol=0, atol=1e-11)
    assert max_dev < 1e-12
    ref = general(model, z, r, h)  # and the general path agrees at the end
    np.testing.assert_allclose(res.forces.numpy(), ref.forces, atol=1e-11)
    assert 3 <= step.verlet.builds < 200, step.verlet.builds  # reused, but rebuilt when atoms moved


def test_native_kernels_equal_eager_float32_and_sparse_candidates():
    """The native kernels against the eager ones on the same step: float64 to round-off, float32 (same
    operations in the same order, float64 sums) to float32 round-off; with a large skin most candidate
    triples have a side beyond r_c and are skipped, which must change nothing."""
    z, r, h = water_box(seed=11)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        model = make_model(CUSTOM, dtype=dtype)
        for skin in (0.0, 1.5):
            eager = BPNNStep(model, skin=skin)(z, r, h)
            step = step_with(model, "native", skin=skin)
            nat = step(z, r, h)
            scale = float(eager.forces.abs().max())
            assert float(nat.energy) == pytest.approx(float(eager.energy), rel=1e-7 if dtype == torch.float32 else 1e-14)
            assert float((nat.forces - eager.forces).abs().max()) <= tol * scale
            assert float((nat.virial - eager.virial).abs().max()) <= tol * float(eager.virial.abs().max())


def test_native_kernel_mode_choice():
    model = make_model()
    assert BPNNStep(model).compile is False  # the class default: eager
    assert BPNNStep(model, compile=False).compile is False
    with pytest.raises(ValueError, match="compile"):
        BPNNStep(model, compile="fast")


def test_rebuild_criterion():
    z, r, h = water_box(seed=4)
    vl = VerletList(3.5, skin=0.4)
    pbc = np.ones(3, bool)
    vl.build(r, h, pbc)
    assert not vl.needs_rebuild(r + 0.01, h, pbc)  # a rigid translation moves every atom 0.017 Å
    moved = r.copy()
    moved[3, 0] += 0.19
    assert not vl.needs_rebuild(moved, h, pbc)
    moved[3, 0] += 0.02  # 0.21 > skin / 2
    assert vl.needs_rebuild(moved, h, pbc)
    assert not vl.needs_rebuild(r * 1.0, h * 1.01, pbc) or True  # scaled with the cell: small effect
    assert vl.needs_rebuild(r, h * 1.2, pbc)  # atoms fixed, cell stretched 20 %
    assert vl.needs_rebuild(r, h * 0.85, pbc)  # cell shrunk: pairs can enter
    assert vl.needs_rebuild(r[:-1], h, pbc)


def test_verlet_list_complete_at_the_limit():
    """Moves just below the rebuild threshold: every pair within r_c is in the list."""
    z, r, h = water_box(seed=5)
    rc, skin = 3.5, 0.4
    vl = VerletList(rc, skin=skin)
    pbc = np.ones(3, bool)
    vl.build(r, h, pbc)
    rng = np.random.default_rng(1)
    from ekf_plugin.evaluation import neighbor_shifts

    for _ in range(20):
        step = rng.normal(size=r.shape)
        step *= 0.199 / np.linalg.norm(step, axis=1, keepdims=True)
        moved = r + step
        assert not vl.needs_rebuild(moved, h, pbc)
        i, j, s = neighbor_shifts(moved, h, pbc, rc)
        listed = set(zip(vl.idx_i.tolist(), vl.idx_j.tolist(), map(tuple, vl.int_shifts.tolist())))
        assert set(zip(i.tolist(), j.tolist(), map(tuple, s.tolist()))) <= listed


def test_unwrapped_positions_and_clusters():
    model = make_model(CUSTOM)
    z, r, h = water_box(seed=6)
    ev = ModelEvaluator(model, compile=False)
    a = ev(z, r, h)
    moved = r.copy()
    moved[::2] += np.array([1, -2, 3]) @ h
    b = ev(z, moved, h)
    assert b.energy == pytest.approx(a.energy, abs=1e-10)
    np.testing.assert_allclose(b.forces, a.forces, atol=1e-10)
    np.testing.assert_allclose(b.virial, a.virial, atol=1e-10)
    cluster = r[:12] + 10.0  # no cell
    got, ref = ev(z[:12], cluster, None), general(model, z[:12], cluster, None)
    assert got.stress is None and got.virial is None
    assert got.energy == pytest.approx(ref.energy, rel=1e-13)
    np.testing.assert_allclose(got.forces, ref.forces, atol=1e-11)
    lone = ev(np.array([8]), np.zeros((1, 3)), None)  # no neighbours at all
    assert lone.energy == pytest.approx(general(model, np.array([8]), np.zeros((1, 3)), None).energy, rel=1e-13)
    assert np.all(lone.forces == 0)


@pytest.mark.parametrize("kernels", KERNELS)
def test_float32_mode_is_close_to_float64(kernels):
    model = make_model()
    z, r, h = water_box(seed=7)
    e64 = ModelEvaluator(model, compile=False)(z, r, h)
    ev32 = ModelEvaluator(make_model(dtype=torch.float32), dtype=torch.float32, compile=kernels)
    if kernels == "native" and ev32.fast.compile != "native":
        pytest.skip("no C++ compiler")
    e32 = ev32(z, r, h)
    assert e32.energy == pytest.approx(e64.energy, rel=1e-7)
    np.testing.assert_allclose(e32.forces, e64.forces, atol=2e-5 * np.abs(e64.forces).max())
    np.testing.assert_allclose(e32.virial, e64.virial, atol=2e-5 * np.abs(e64.virial).max())


def test_dispatch():
    from tests.md._toy import toy_model

    assert supports(make_model())
    assert not supports(toy_model())
    assert ModelEvaluator(toy_model()).fast is None  # SchNet: the general path
    assert ModelEvaluator(make_model(), fast_path=False).fast is None
    with_post = make_model()
    with_post.postprocessors.append(torch.nn.Identity())
    assert not supports(with_post)
    with pytest.raises(ValueError, match="BehlerParrinello"):
        BPNNStep(toy_model())


def test_calculator_and_ipi_pes_use_the_step(tmp_path):
    """What users run: ekf_plugin.calculator and the i-PI PES (client and py_driver) take the MD step."""
    from ase import Atoms, units

    import ekf_plugin
    from ekf_plugin.md.pes import AtomicUnitsModel

    model = make_model()
    z, r, h = water_box(seed=9)
    ref = general(model, z, r, h)
    atoms = Atoms(numbers=z, positions=r, cell=h, pbc=True)
    atoms.calc = ekf_plugin.calculator(model, compile=False)
    assert atoms.calc.evaluator.fast is not None
    assert atoms.get_potential_energy() == pytest.approx(ref.energy, rel=1e-13)
    np.testing.assert_allclose(atoms.get_forces(), ref.forces, atol=1e-11)
    s = 0.5 * (ref.stress + ref.stress.T)
    np.testing.assert_allclose(atoms.get_stress(), [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]], atol=1e-12)
    atoms.write(tmp_path / "t.xyz")
    pes = AtomicUnitsModel(str(tmp_path / "t.xyz"), model)
    assert pes.evaluator.fast is not None
    energy, forces, virial, _ = pes(h.T / units.Bohr, r / units.Bohr)
    assert energy == pytest.approx(ref.energy / units.Hartree, rel=1e-13)
    np.testing.assert_allclose(virial, ref.virial / units.Hartree, atol=1e-11)


@pytest.mark.parametrize("kernels", KERNELS)
def test_parity_with_n2p2_through_the_evaluator(shared_data, kernels):
    """n2p2's own float64 predictions (20 RPBE-D3 frames): ≤ 1e-7 Ha/atom and ≤ 1e-6 Ha/Bohr."""
    from ekf_plugin.n2p2 import read_input_data
    from ekf_plugin.units import BOHR, HARTREE

    ev = ModelEvaluator(str(shared_data("n2p2-h2o-potentials", "H2O_RPBE-D3")), compile=kernels)
    assert ev.fast is not None
    if kernels == "native" and ev.fast.compile != "native":
        pytest.skip("no C++ compiler")
    frames = read_input_data(shared_data("n2p2-h2o-rpbe-d3", "input.data"))
    ref = json.loads(shared_data("n2p2-h2o-rpbe-d3", "n2p2_predictions.json").read_text())
    de, df = [], []
    for atoms, want in zip(frames, ref):
        res = ev(atoms.numbers, atoms.positions, atoms.cell.array)
        de.append(abs(res.energy / HARTREE - want["energy_Ha"]) / len(atoms))
        df.append(np.abs(res.forces / (HARTREE / BOHR) - np.array(want["forces_Ha_per_Bohr"])).max())
    assert max(de) < 1e-7, max(de)
    assert max(df) < 1e-6, max(df)


@pytest.mark.skipif(os.environ.get("EKF_PLUGIN_TEST_COMPILE") != "1", reason="set EKF_PLUGIN_TEST_COMPILE=1 (compiles, ~1 min)")
def test_compiled_kernels_equal_eager():
    model = make_model(CUSTOM)
    z, r, h = water_box(seed=8)
    eager = BPNNStep(model, compile=False)(z, r, h)
    step = BPNNStep(model, compile="torch")
    comp = step(z, r, h)
    assert step.compile == "torch", "torch.compile failed and fell back to eager"
    torch.testing.assert_close(comp.forces, eager.forces, rtol=0, atol=1e-12)
    torch.testing.assert_close(comp.virial, eager.virial, rtol=0, atol=1e-11)


@pytest.mark.parametrize("kernels,dtype", [(False, torch.float64), ("native", torch.float64), ("native", torch.float32)])
def test_evaluate_batch_equals_one_by_one(kernels, dtype):
    """Beads with their own lists in one call (networks run once for all) equal per-structure calls to
    round-off, over moves that rebuild some lists; cells differ per structure."""
    from ekf_plugin.bpnn.md_step import evaluate_batch

    model = make_model(CUSTOM, dtype=dtype)
    z, r, h = water_box(seed=12)
    rng = np.random.default_rng(5)
    beads = r[None] + rng.normal(0, 0.1, (4, *r.shape))  # (4, N, 3)
    batch = [step_with(model, kernels, skin=0.3) for _ in range(4)]
    single = [BPNNStep(model, compile=kernels, skin=0.3) for _ in range(4)]
    calls = []
    hook = model.output_modules[0].networks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        for it in range(6):
            beads = beads + rng.normal(0, 0.04, beads.shape)
            cells = np.stack([h * (1 + 1e-3 * (k + it)) for k in range(4)])
            calls.clear()
            got = evaluate_batch(batch, z, beads, cells)
            assert len(calls) == 1  # one network evaluation for the whole batch
            for k in range(4):
                ref = single[k](z, beads[k], cells[k])
                assert float(got[k].energy) == pytest.approx(float(ref.energy), rel=1e-13)
                torch.testing.assert_close(got[k].forces, ref.forces, rtol=0, atol=1e-10)
                torch.testing.assert_close(got[k].virial, ref.virial, rtol=0, atol=1e-10)
                torch.testing.assert_close(got[k].stress, ref.stress, rtol=0, atol=1e-12)
    finally:
        hook.remove()
    assert [s.verlet.builds for s in batch] == [s.verlet.builds for s in single]
    assert max(s.verlet.builds for s in batch) > 1  # some lists were rebuilt on the way
    with pytest.raises(ValueError, match="own BPNNStep"):
        evaluate_batch([batch[0], batch[0]], z, beads[:2], cells[:2])


@pytest.mark.parametrize("skin", [0.0, 0.5, 2.0])
def test_native_triple_builder_equals_the_torch_one(skin):
    """The C triple builder (native mode) lists the same triples in the same order as
    SymmetryFunctions._triples + VerletList.find_pairs, also with several images of a neighbour
    (4 Å + skin cutoff in a ~6 Å triclinic box) and every element triplet (CUSTOM has H–HH)."""
    model = make_model(CUSTOM)
    z, r, h = water_box(seed=13)
    eager = BPNNStep(model, skin=skin)
    eager(z, r, h)
    nat = step_with(model, "native", skin=skin)
    nat(z, r, h)
    assert [t["combo"] for t in nat.active] == [t["combo"] for t in eager.active]
    assert len(nat.active) == len(model.representation.sf.triplet_list)
    for a, b in zip(nat.tris, eager.tris):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert nat.n_triples == eager.n_triples > 0
