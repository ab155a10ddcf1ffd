"""Fast BPNN label path: same labels, errors, Jacobians and EKF updates as the full model, with a feature cache."""

from __future__ import annotations

import copy

import pytest
import torch

import schnetpack as spk
import schnetpack.properties as props
from ekf_plugin.jacobian import flat_jacobian
from ekf_plugin.models import water_bpnn
from ekf_plugin.optim import EKF
from ekf_plugin.training import PaperScheduleTask
from ekf_plugin.bpnn.label_predictor import BPNNLabelPredictor, supports
from ekf_plugin.training.schedule import draw_kinds
from ._systems import converter, randomise_scaling, water_cluster, water_pair

from tests.training._toy import outputs, toy_model


def _model():
    model = water_bpnn(dtype=torch.float64, stress=False, seed=3)
    randomise_scaling(model)
    return model


def _batch(model, seed=0):
    """Two structures (periodic pair + cluster) with made-up labels (eV, eV/Å) and dataset indices."""
    frames = [water_pair(seed=seed), water_cluster(3, seed=seed)]
    batch = converter(model)(frames)
    g = torch.Generator().manual_seed(seed)
    batch["energy"] = torch.randn(2, generator=g, dtype=torch.float64)
    batch["forces"] = torch.randn(batch[props.R].shape, generator=g, dtype=torch.float64)
    batch[props.idx] = torch.tensor([5, 9])
    return batch


def test_energies_and_force_components_equal_the_full_model_with_their_jacobians():
    model = _model()
    batch = _batch(model)
    full = model(dict(batch))
    pred = BPNNLabelPredictor(model)
    params = list(model.parameters())
    e = pred.energies(batch)  # (2,)
    torch.testing.assert_close(e, full["energy"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat_jacobian(e, params), flat_jacobian(full["energy"], params), rtol=1e-10, atol=1e-12)
    n0 = int(batch[props.n_atoms][0])
    pick = torch.tensor([0, 4, 17, 2])  # flat (atom·3 + axis) indices into structure 1
    f = pred.force_components(batch, 1, pick)  # (4,)
    ref = full["forces"][n0:].reshape(-1)[pick]
    torch.testing.assert_close(f, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_jacobian(f, params), flat_jacobian(ref, params), rtol=1e-9, atol=1e-11)


def test_features_are_cached_by_index_and_recomputed_when_positions_change():
    model = _model()
    batch = _batch(model)
    pred = BPNNLabelPredictor(model)
    s = pred.features(batch, 0)
    assert pred.features(batch, 0) is s, "second call is served from the cache"
    moved = dict(batch)
    moved[props.R] = batch[props.R].clone()
    moved[props.R][1, 0] += 0.05  # one atom of structure 0
    s2 = pred.features(moved, 0)
    assert s2 is not s and not torch.equal(s2, s), "changed positions under the same _idx are recomputed"
    pred.max_cache_bytes = 0
    pred.clear()
    assert pred.features(batch, 1) is not pred.features(batch, 1), "nothing cached beyond max_cache_bytes"


def test_supports_only_bpnn_potentials():
    assert supports(_model())
    assert not supports(toy_model())
    with pytest.raises(TypeError, match="BehlerParrinello"):
        BPNNLabelPredictor(toy_model())
    with pytest.raises(ValueError, match="fast_labels=True"):
        PaperScheduleTask(toy_model(), outputs(), fast_labels=True)


def _same_updates(tasks, batch, energy_fraction=0.5, rows_for=lambda key: False):
    """Six EKF updates (B = 2 structures, both kinds drawn) with each task; asserts equal ξ and weights across them."""
    xis = {}
    for key, task in tasks.items():
        opt = EKF(task.model.parameters(), lr=1e-2)
        xis[key] = []
        for _ in range(6):
            kinds = draw_kinds(2, energy_fraction, task.label_rng)
            params = opt.params if rows_for(key) else None
            xis[key].append(opt.step(lambda: task._errors(batch, kinds, {}, params)))
    (a_xi, b_xi), (a, b) = xis.values(), tasks.values()
    for x, y in zip(a_xi, b_xi):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_ekf_updates_with_fast_labels_equal_the_full_model_path():
    model = _model()
    batch = _batch(model, seed=1)
    tasks = {fast: PaperScheduleTask(copy.deepcopy(model), outputs(), fast_labels=fast, seed=4) for fast in (True, False)}
    assert tasks[True].label_predictor is not None and tasks[False].label_predictor is None
    _same_updates(tasks, batch)
    assert not torch.equal(next(tasks[True].model.parameters()), next(model.parameters())), "weights moved"


@pytest.mark.parametrize("hidden", [(25, 25), (7, 5, 4)])
def test_closed_form_rows_equal_autograd_jacobians(hidden):
    """Energy and force rows written out by hand (network_jacobian) = autograd through the networks."""
    model = water_bpnn(dtype=torch.float64, stress=False, seed=3, n_hidden=hidden, energy_scale=0.37,
                       atom_energies={"H": -1.3, "O": -7.0})
    randomise_scaling(model)
    batch = _batch(model)
    pred = BPNNLabelPredictor(model)
    params = list(model.parameters())
    rows = pred.closed_form(params)
    assert rows is not None and pred.closed_form(params) is rows
    e, je = pred.energies_and_rows(batch, rows)  # (2,), (2, n)
    e_ref = pred.energies(batch)
    torch.testing.assert_close(e, e_ref.detach(), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(je, flat_jacobian(e_ref, params), rtol=1e-10, atol=1e-12)
    pick = torch.tensor([0, 4, 17, 2, 26])
    f, jf = pred.force_components_and_rows(batch, 1, pick, rows)
    f_ref = pred.force_components(batch, 1, pick)
    torch.testing.assert_close(f, f_ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jf, flat_jacobian(f_ref, params), rtol=1e-9, atol=1e-11)
    assert float(jf.abs().sum()) > 0


def test_threshold_selection_chooses_the_same_labels_on_the_fast_and_the_full_model_path():
    """task.force_selection='threshold': the fast path (candidates' values from cached features, closed-form rows)
    and the full model pick the same components and make the same EKF updates; the selection state is saved in
    and restored from a checkpoint."""
    model = _model()
    batch = _batch(model, seed=2)
    tasks = {fast: PaperScheduleTask(copy.deepcopy(model), outputs(), fast_labels=fast, seed=4,
                                     force_selection="threshold", n_force_components=5) for fast in (True, False)}
    _same_updates(tasks, batch, energy_fraction=0.3, rows_for=lambda fast: fast)
    ms = tasks[True].selection.mean_square
    assert ms is not None and ms == pytest.approx(tasks[False].selection.mean_square, rel=1e-9)
    ckpt = {}
    tasks[True].on_save_checkpoint(ckpt)
    fresh = PaperScheduleTask(copy.deepcopy(model), outputs(), seed=0, force_selection="threshold")
    fresh.on_load_checkpoint(ckpt)
    assert fresh.selection.mean_square == ms
    with pytest.raises(ValueError, match="force_selection"):
        PaperScheduleTask(copy.deepcopy(model), outputs(), force_selection="largest")


def test_threshold_selection_computes_each_force_structures_columns_once(monkeypatch):
    """The chosen components' dG/dr columns are gathered from the candidates' columns (one feature_columns call
    per force structure, not two), bitwise equal to a fresh evaluation; a pick outside the candidates, another
    frame or moved positions compute anew."""
    model = _model()
    batch = _batch(model, seed=2)
    pred = BPNNLabelPredictor(model)
    rows = pred.closed_form(list(model.parameters()))
    rep = model.representation
    calls = []
    original = type(rep).feature_column_table  # feature_columns goes through it too

    def counted(self, inputs, atoms, components, species=None):
        calls.append(atoms.numel())
        return original(self, inputs, atoms, components, species)

    cand = torch.tensor([7, 0, 13, 2, 25, 4, 19, 11])  # flat indices into structure 1 (9 atoms: 27 components)
    pred.energy_and_force_values(batch, 1, cand)
    monkeypatch.setattr(type(rep), "feature_column_table", counted)
    chosen = cand[torch.tensor([5, 0, 3])]
    f, jf = pred.force_components_and_rows(batch, 1, chosen, rows)
    assert calls == [], "the chosen columns come from the candidates"
    f_new, jf_new = pred.force_components_and_rows(batch, 1, chosen, rows)  # the candidates are taken once
    assert calls == [3]
    assert torch.equal(f, f_new) and torch.equal(jf, jf_new)
    pred.energy_and_force_values(batch, 1, cand)  # the candidates' columns: 8
    pred.force_components_and_rows(batch, 1, torch.tensor([7, 1]), rows)  # 1 is no candidate: 2 anew
    pred.energy_and_force_values(batch, 1, cand)
    pred.force_components_and_rows(batch, 0, torch.tensor([0, 2]), rows)  # another structure of the batch
    pred.energy_and_force_values(batch, 1, cand)
    moved = dict(batch)
    moved[props.R] = batch[props.R].clone()
    moved[props.R][-1, 0] += 0.05  # an atom of structure 1
    pred.force_components_and_rows(moved, 1, chosen, rows)
    assert calls == [3, 8, 2, 8, 2, 8, 3]
    task = PaperScheduleTask(copy.deepcopy(model), outputs(), fast_labels=True, seed=4, force_selection="threshold",
                             n_force_components=3)
    opt = EKF(task.model.parameters(), lr=1e-2)
    calls.clear()
    opt.step(lambda: task._errors(batch, [1, 1], {}, opt.params))  # two force structures
    assert calls == [9, 9], "candidates only (3 components x 3 trials per structure)"
    # the autograd path (Adam, or the EKF without closed-form rows) gathers the chosen columns as well
    calls.clear()
    pred.energy_and_force_values(batch, 1, cand)
    f_grad = pred.force_components(batch, 1, chosen)
    assert calls == [8], "the chosen columns come from the candidates"
    assert torch.equal(f_grad.detach(), pred.force_components(batch, 1, chosen).detach()) and calls == [8, 3]
    torch.testing.assert_close(f_grad.detach(), f, rtol=1e-12, atol=1e-12)
    adam = PaperScheduleTask(copy.deepcopy(model), outputs(), fast_labels=True, seed=4, force_selection="threshold",
                             n_force_components=3)
    calls.clear()
    xi = adam._errors(batch, [1, 1], {})  # no params: the autograd path, as the Adam baseline trains
    assert xi.requires_grad and calls == [9, 9], "candidates only on the autograd path too"


def test_closed_form_candidates_give_the_chosen_labels_values_and_rows_from_one_column_table(monkeypatch):
    """A threshold selection's candidates with closed-form rows (``candidate_force_values``): their values equal
    the autograd pass's (``energy_and_force_values``) to round-off; the chosen components' values equal the
    candidates' own to round-off (those by reverse mode, these with their rows by forward tangents), and their values
    and rows (``force_components_and_rows``) come from the candidates' column table without computing columns again,
    bitwise equal to a fresh evaluation."""
    model = _model()
    batch = _batch(model, seed=5)
    pred = BPNNLabelPredictor(model)
    rows = pred.closed_form(list(model.parameters()))
    cand = torch.tensor([7, 0, 13, 2, 25, 4, 19, 11])  # flat indices into structure 1
    ref = pred.energy_and_force_values(batch, 1, cand)[1]
    values = pred.candidate_force_values(batch, 1, cand, rows)
    assert values.shape == (8,) and not values.requires_grad
    torch.testing.assert_close(values, ref, rtol=1e-12, atol=1e-12)
    rep = model.representation
    calls = []
    original = type(rep).feature_column_table

    def counted(self, inputs, atoms, components, species=None):
        calls.append(atoms.numel())
        return original(self, inputs, atoms, components, species)

    monkeypatch.setattr(type(rep), "feature_column_table", counted)
    chosen = torch.tensor([5, 0, 3])  # positions among the candidates
    f, jf = pred.force_components_and_rows(batch, 1, cand[chosen], rows)
    assert calls == [], "the chosen columns come from the candidates' table"
    torch.testing.assert_close(f, values[chosen], rtol=1e-12, atol=1e-12)
    f_new, jf_new = pred.force_components_and_rows(batch, 1, cand[chosen], rows)  # computed anew
    assert calls == [3] and torch.equal(f, f_new) and torch.equal(jf, jf_new)
    # an autograd force label after closed-form candidates takes the same columns, gathered into the dense layout
    pred.candidate_force_values(batch, 1, cand, rows)
    f_grad = pred.force_components(batch, 1, cand[chosen])
    assert calls == [3, 8]
    torch.testing.assert_close(f_grad.detach(), f, rtol=1e-12, atol=1e-12)


def test_the_autograd_path_takes_the_candidates_graph_once_and_bitwise(monkeypatch):
    """With ``graph=True`` the candidates' pass keeps ∇_s E with its graph and ``force_components`` of the chosen
    components uses it instead of a second pass through the networks: the same values and the same weight
    gradients bitwise, taken once, and refused after the weights changed in place (an optimizer step)."""
    model = _model()
    batch = _batch(model, seed=5)
    pred = BPNNLabelPredictor(model)
    cand, chosen = torch.tensor([7, 0, 13, 2, 25, 4]), torch.tensor([13, 4, 0])
    passes = []
    original = BPNNLabelPredictor._energy_from

    def counted(self, structure, s):
        passes.append(1)
        return original(self, structure, s)

    monkeypatch.setattr(BPNNLabelPredictor, "_energy_from", counted)

    def loss_and_grads(graph: bool):
        model.zero_grad()
        values = pred.energy_and_force_values(batch, 1, cand, graph=graph)[1]
        f = pred.force_components(batch, 1, chosen)  # (3,) eV/Å with its graph to the weights
        (f * torch.tensor([1.0, -2.0, 0.5], dtype=f.dtype)).sum().backward()
        return values, f.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    passes.clear()
    v_two, f_two, g_two = loss_and_grads(graph=False)
    assert len(passes) == 2
    passes.clear()
    v_one, f_one, g_one = loss_and_grads(graph=True)
    assert len(passes) == 1, "one pass through the networks"
    assert torch.equal(v_one, v_two) and torch.equal(f_one, f_two)
    assert len(g_one) == len(g_two) > 0 and all(torch.equal(a, b) for a, b in zip(g_one, g_two))
    passes.clear()
    pred.force_components(batch, 1, chosen)  # taken once: a second call passes again
    assert len(passes) == 1
    pred.energy_and_force_values(batch, 1, cand, graph=True)
    with torch.no_grad():
        next(model.parameters()).mul_(1.01)  # an optimizer step between: the kept graph has the old weights
    passes.clear()
    f_new = pred.force_components(batch, 1, chosen)
    assert len(passes) == 1 and not torch.equal(f_new.detach(), f_one)
    pred.energy_and_force_values(batch, 1, cand, graph=True)
    passes.clear()
    pred.force_components(batch, 0, torch.tensor([0, 2]))  # another structure of the batch
    assert len(passes) == 1


def test_adam_steps_with_the_shared_candidates_graph_equal_two_passes(monkeypatch):
    """Adam on the task's threshold-selected labels (the autograd path, as `experiment=water_bpnn_adam` trains):
    three updates with the candidates' graph shared give bitwise the weights of three updates with two passes."""
    def train(share: bool):
        model = _model()
        batch = _batch(model, seed=6)
        task = PaperScheduleTask(model, outputs(), fast_labels=True, seed=4, force_selection="threshold",
                                 n_force_components=3)
        if not share:
            plain = BPNNLabelPredictor.energy_and_force_values
            monkeypatch.setattr(BPNNLabelPredictor, "energy_and_force_values",
                                lambda self, *a, graph=False, **k: plain(self, *a, graph=False, **k))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for kinds in ([1, 1], [0, 1], [1, 1]):
            opt.zero_grad()
            xi = task._errors(batch, kinds, {})
            (xi * xi).sum().backward()
            opt.step()
        monkeypatch.undo()
        return [p.detach().clone() for p in model.parameters()]

    shared, two = train(True), train(False)
    assert all(torch.equal(a, b) for a, b in zip(shared, two))
    assert not all(torch.equal(a, b) for a, b in zip(shared, [p.detach() for p in _model().parameters()]))


def test_closed_form_rows_refuse_foreign_parameters_and_activations():
    model = _model()
    pred = BPNNLabelPredictor(model)
    assert pred.closed_form([torch.nn.Parameter(torch.zeros(3))]) is None, "a weight outside the networks"
    soft = water_bpnn(dtype=torch.float64, stress=False, seed=3, activation="softplus")
    assert BPNNLabelPredictor(soft).closed_form(list(soft.parameters())) is None


def test_ekf_updates_with_closed_form_rows_equal_the_autograd_path():
    model = _model()
    batch = _batch(model, seed=2)
    tasks = {cf: PaperScheduleTask(copy.deepcopy(model), outputs(), fast_labels=True, seed=4) for cf in (True, False)}
    _same_updates(tasks, batch, rows_for=lambda cf: cf)


def test_prepare_fits_the_scaling_and_caches_the_features_in_one_pass():
    """prepare() = BehlerParrinello.fit_scaling + the features the first epoch would compute, from one pass."""
    model_a = water_bpnn(dtype=torch.float64, stress=False, seed=3)
    model_b = copy.deepcopy(model_a)
    batches = [_batch(model_a, seed=s) for s in (0, 1)]
    for k, b in enumerate(batches):
        b[props.idx] = torch.tensor([2 * k, 2 * k + 1])
    model_a.representation.fit_scaling(batches)
    pred = BPNNLabelPredictor(model_b)
    assert not pred.scaling_unchanged()
    assert pred.prepare(batches, fit_scaling=True) == 4
    rep_a, rep_b = model_a.representation, model_b.representation
    # prepare() computes the functions with the MD step's kernels, fit_scaling() with the representation's
    torch.testing.assert_close(rep_b.scale_weight, rep_a.scale_weight, rtol=1e-13, atol=0)
    torch.testing.assert_close(rep_b.scale_bias, rep_a.scale_bias, rtol=1e-13, atol=1e-13)
    assert pred.scaling_unchanged()
    ref = BPNNLabelPredictor(model_a)
    for b in batches:
        for s in range(2):
            cached = pred.features(b, s)
            assert pred._cache[int(b[props.idx][s])][0] is cached, "served from the prepared cache"
            torch.testing.assert_close(cached, ref.features(b, s), rtol=0, atol=1e-12)
    rep_b.scale_bias.add_(0.1)
    assert not pred.scaling_unchanged(), "a changed scaling invalidates the prepared cache"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_raw_features_from_the_md_kernels_equal_the_representation(dtype):
    """The prepare pass's raw functions (MD step kernels in float64, their own neighbour list, rounded to the
    positions' dtype) equal the representation's forward on the batch's list, periodic and not."""
    model = _model().to(dtype)
    batch = _batch(model)
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    pred = BPNNLabelPredictor(model)
    assert pred._fast_features() is not None, "the native kernels build on this machine (CPU)"
    for b in range(2):
        structure = pred._structure(batch, b)
        got = pred.raw_features(batch, b, structure)  # (N_b, W)
        ref = model.representation.raw_features(dict(structure))  # (N_b, W)
        assert got.dtype == dtype
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(got, ref, **tol)


def test_single_structure_batches_take_the_shortcut_with_the_same_labels():
    model = _model()
    batch = _batch(model)
    one = converter(model)([water_cluster(3, seed=0)])  # structure 1 of `batch` alone
    one[props.idx] = torch.tensor([9])
    pred = BPNNLabelPredictor(model)
    assert pred._structure(one, 0)[props.R] is one[props.R], "no copy for a one-structure batch"
    pick = torch.tensor([0, 4, 17])
    torch.testing.assert_close(pred.force_components(one, 0, pick), pred.force_components(batch, 1, pick),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.energies(one), pred.energies(batch)[1:], rtol=1e-12, atol=1e-12)


def test_energy_and_force_values_equal_the_full_model():
    model = _model()
    batch = _batch(model, seed=3)
    full = model(dict(batch))
    pred = BPNNLabelPredictor(model)
    n0 = int(batch[props.n_atoms][0])
    pick = torch.tensor([1, 5, 26, 3])
    e, f = pred.energy_and_force_values(batch, 1, pick)
    torch.testing.assert_close(e, full["energy"][1:].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f, full["forces"][n0:].reshape(-1)[pick].detach(), rtol=1e-10, atol=1e-12)
    assert not e.requires_grad and not f.requires_grad


def test_kept_validation_columns_give_the_same_forces_and_follow_positions_pick_and_weights():
    """keep_columns: the second call reuses the columns (same values); moved atoms, another pick or a cleared
    cache compute them again; the weights still count (the columns do not depend on them)."""
    model = _model()
    batch = _batch(model, seed=4)
    pred = BPNNLabelPredictor(model)
    n0 = int(batch[props.n_atoms][0])
    pick = torch.tensor([2, 7, 11])
    e, f = pred.energy_and_force_values(batch, 1, pick, keep_columns=True)
    kept = pred._columns[9][1]
    e2, f2 = pred.energy_and_force_values(batch, 1, pick, keep_columns=True)
    assert pred._columns[9][1] is kept and torch.equal(f2, f) and torch.equal(e2, e)
    with torch.no_grad():  # new weights: same columns, the forces of the new model
        for p in model.parameters():
            p.mul_(1.1)
    _, f3 = pred.energy_and_force_values(batch, 1, pick, keep_columns=True)
    torch.testing.assert_close(f3, model(dict(batch))["forces"][n0:].reshape(-1)[pick].detach(), rtol=1e-10, atol=1e-12)
    moved = dict(batch)
    moved[props.R] = batch[props.R].clone()
    moved[props.R][n0 + 1, 2] += 0.05
    _, f4 = pred.energy_and_force_values(moved, 1, pick, keep_columns=True)
    torch.testing.assert_close(f4, model(dict(moved))["forces"][n0:].reshape(-1)[pick].detach(), rtol=1e-10, atol=1e-12)
    assert pred._columns[9][1] is not kept, "moved atoms: new columns"
    other = torch.tensor([0, 1])
    _, f5 = pred.energy_and_force_values(moved, 1, other, keep_columns=True)
    torch.testing.assert_close(f5, model(dict(moved))["forces"][n0:].reshape(-1)[other].detach(), rtol=1e-10, atol=1e-12)
    pred.clear()
    assert not pred._columns and pred._bytes == 0


def _validate(task, batches):
    import pytorch_lightning as pl

    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False)
    return trainer.validate(task, loader, verbose=False)[0]


def test_sampled_validation_is_the_full_model_on_a_fixed_sample_of_force_components():
    """val_force_components = k: all energies and k fixed force components per structure, from cached features;
    the metrics equal the full model's on those components, and the sample is the same at every validation."""
    model = _model()
    batches = []
    for seed, idx in ((0, 3), (1, 8)):
        b = _batch(model, seed=seed)
        b[props.idx] = torch.tensor([idx, idx + 20])
        batches.append(b)
    task = PaperScheduleTask(model, outputs(), fast_labels=True, seed=2, val_force_components=5)
    first = _validate(task, batches)
    assert _validate(task, batches) == first, "the same components at every validation"
    # reference: the full model at the components the task says it draws
    e_err, f_err = [], []
    for b in batches:
        full = model(dict(b))
        nat = b[props.n_atoms].double()
        e_err.append((full["energy"].detach() - b["energy"]) / nat)
        start = torch.cumsum(b[props.n_atoms], 0) - b[props.n_atoms]
        for s in range(2):
            n3 = 3 * int(b[props.n_atoms][s])
            pick = torch.randperm(n3, generator=torch.Generator().manual_seed(2 * 1_000_003 + int(b[props.idx][s])))[:5]
            rows = start[s] * 3 + pick
            f_err.append(full["forces"].detach().reshape(-1)[rows] - b["forces"].reshape(-1)[rows])
    e_rmse = float(torch.cat(e_err).pow(2).mean().sqrt())
    f_rmse = float(torch.cat(f_err).pow(2).mean().sqrt())
    assert first["val_energy_per_atom_rmse"] == pytest.approx(e_rmse, rel=1e-6)  # Lightning logs float32
    assert first["val_forces_rmse_all"] == pytest.approx(f_rmse, rel=1e-6)
    # 0: the full model, every component (a plain BPNN: through the MD step's compiled kernels, a periodic and a
    # non-periodic structure per batch), the same metrics as the model's own forward and autograd forces
    task.val_force_components = 0
    every = _validate(task, batches)
    f_all = torch.cat([(model(dict(b))["forces"].detach() - b["forces"]).reshape(-1) for b in batches])
    assert every["val_forces_rmse_all"] == pytest.approx(float(f_all.pow(2).mean().sqrt()), rel=1e-6)
    assert every["val_energy_per_atom_rmse"] == pytest.approx(
        float(torch.cat([(model(dict(b))["energy"].detach() - b["energy"]) / b[props.n_atoms] for b in batches])
              .pow(2).mean().sqrt()), rel=1e-6)
    assert every["val_forces_rmse_all"] != pytest.approx(first["val_forces_rmse_all"], rel=1e-3)
    if task._full_model_step() is not None:  # the compiled kernels build here: the same as the model's own path
        for b in batches:
            stepped, own = task._stepped_predictions(b), model(dict(b))
            torch.testing.assert_close(stepped["energy"], own["energy"].detach(), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(stepped["forces"], own["forces"].detach(), rtol=1e-9, atol=1e-10)
        task._full_step = False  # the model's forward: the same metrics
        assert _validate(task, batches) == pytest.approx(every, rel=1e-6)


def test_prepare_on_float32_data_caches_what_the_float32_model_computes():
    """float32 positions: the cached features are float32, as the model's own forward pass has them (computed
    in float64 by the MD step's kernels and rounded, so closer to the float64 values than the float32 forward)."""
    model = water_bpnn(dtype=torch.float32, stress=False, seed=3)
    batches = [converter(model, torch.float32)([water_pair(seed=s), water_cluster(3, seed=s)]) for s in (0, 1)]
    for k, b in enumerate(batches):
        b[props.idx] = torch.tensor([2 * k, 2 * k + 1])
    assert batches[0][props.R].dtype == torch.float32
    pred = BPNNLabelPredictor(model)
    assert pred.prepare(batches, fit_scaling=True) == 4
    for b in batches:
        for s in range(2):
            structure = pred._structure(b, s)
            own = model.representation(dict(structure))["scalar_representation"]  # float32 forward
            rep64 = copy.deepcopy(model.representation).to(torch.float64)
            exact = rep64({k: v.double() if v.is_floating_point() else v for k, v in structure.items()})
            exact = exact["scalar_representation"]  # float64 forward on the same positions
            cached = pred.features(b, s)
            assert cached.dtype == torch.float32
            torch.testing.assert_close(cached, own, rtol=2e-5, atol=1e-5)
            torch.testing.assert_close(cached.double(), exact, rtol=1e-6, atol=1e-6)
            assert (cached.double() - exact).abs().max() <= (own.double() - exact).abs().max()


def test_structures_of_a_batch_are_sliced_or_selected_alike():
    """Grouped batches (SchNetPack's collate) are sliced by ranges; a batch with its pairs shuffled takes the
    index selection; both give each structure's own atoms and pairs."""
    model = _model()
    batch = _batch(model)
    pred = BPNNLabelPredictor(model)
    shuffled = dict(batch)
    perm = torch.randperm(batch[props.idx_i].numel(), generator=torch.Generator().manual_seed(0))
    for k in (props.idx_i, props.idx_j, props.offsets):
        shuffled[k] = batch[k][perm]
    assert pred._ranges(batch)[1] is not None and pred._ranges(shuffled)[1] is None
    for b in range(2):
        s1, s2 = pred._structure(batch, b), pred._structure(shuffled, b)
        assert torch.equal(s1[props.R], s2[props.R])
        key = lambda s: sorted(zip(s[props.idx_i].tolist(), s[props.idx_j].tolist(), s[props.offsets].sum(1).tolist()))  # noqa: E731
        assert key(s1) == key(s2) and len(key(s1)) > 0
