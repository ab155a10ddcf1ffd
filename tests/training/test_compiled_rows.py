"""The compiled reduced-row update (``ekf_plugin.training.compiled_rows``) against the eager one, float64:
the same ξ, J, predictions and label draws on a small PaiNN (one compile serves new frames with other atom and
pair counts, total and per-atom energies, other weights c_E, c_F); models it does not apply to and a failed compile leave
the generator untouched and return None (the eager path then runs)."""

from __future__ import annotations

import pytest
import torch

from ekf_plugin.training.compiled_rows import CompiledReducedRows
from ekf_plugin.training.schedule import reduced_rows_with_jacobian
from tests.training._gnn import frames, model as gnn_model


def _eager(model, batch, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    b = dict(batch)
    params = list(model.parameters())
    xi, J, out = reduced_rows_with_jacobian(model, lambda: model(dict(b)), b, g, params, **kw)
    return xi.detach(), J, out, g


def test_compiled_rows_equal_eager_painn():
    model = gnn_model("painn")
    rows = CompiledReducedRows(model, list(model.parameters()))
    assert rows.active, rows.reason
    cases = [((9, 7), dict(n_force_groups=3, force_group_size=3)),  # G and S are fixed in the graph: one compile
             ((8, 5), dict(n_force_groups=3, force_group_size=3, c_energy=0.5, c_forces=2.0, energy_per_atom=False)),
             ((5, 3), dict(n_force_groups=3, force_group_size=3))]  # 9 > 8 atoms: groups drawn with replacement
    for seed, (n_atoms, kw) in enumerate(cases):
        batch = frames(n_atoms, seed=seed)
        xi_ref, J_ref, out_ref, g_ref = _eager(model, batch, seed, **kw)
        g = torch.Generator().manual_seed(seed)
        xi, J, out = rows(batch, g, **kw)
        assert J.shape == J_ref.shape == (1 + kw["n_force_groups"], sum(p.numel() for p in model.parameters()))
        torch.testing.assert_close(xi, xi_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(J, J_ref, rtol=1e-9, atol=1e-12)
        assert J.abs().max() > 1e-3 and (J[1:].abs().sum(1) > 0).all()
        torch.testing.assert_close(out["energy"].reshape(-1), out_ref["energy"].reshape(-1).detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(out["forces"], out_ref["forces"].detach(), rtol=0, atol=1e-12)
        assert torch.equal(g.get_state(), g_ref.get_state())  # the same draws, no more
    assert rows.active, rows.reason  # no fallback happened on the way


def test_not_applicable_and_failed_compile_leave_the_generator_alone(monkeypatch):
    stress = gnn_model("schnet", stress=True)
    rows = CompiledReducedRows(stress, list(stress.parameters()))
    assert not rows.active and "stress" in rows.reason
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    assert rows(frames((9,)), g) is None and torch.equal(g.get_state(), before)

    model = gnn_model("schnet")
    rows = CompiledReducedRows(model, list(model.parameters()))
    assert rows.active

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here"):
        assert rows(frames((9,)), g) is None
    assert torch.equal(g.get_state(), before) and not rows.active
    assert rows(frames((9,)), g) is None  # off for good, no second warning needed


def test_task_with_compile_rows_takes_the_eager_steps():
    """PaperScheduleTask(compile_rows=True) + EKF: the compiled rows are used and give the eager path's weights."""
    from ekf_plugin.optim import EKF
    from ekf_plugin.training import PaperScheduleTask
    from tests.training._toy import outputs

    batches = [frames((9, 7), seed=s) for s in range(3)]

    def run(compiled: bool):
        task = PaperScheduleTask(gnn_model("painn"), outputs(), optimizer_cls=EKF, label_mode="reduced",
                                 n_force_groups=2, force_group_size=3, c_energy=1.0, c_forces=1.0, compile_rows=compiled,
                                 optimizer_args={"lr": 1.0, "fading_lambda": 0.98, "fading_nu": 0.9987, "blocks": 300})
        opt = task.configure_optimizers()
        opt = opt[0][0] if isinstance(opt, tuple) else opt
        for b in batches:
            store = {}
            opt.step(lambda: task._errors(b, [], store, opt.params))
            assert set(store["pred"]) >= {"energy", "forces"}
        assert (task._compiled_rows is not None and task._compiled_rows.active) == compiled
        return torch.cat([p.detach().reshape(-1) for p in task.model.parameters()]), task.label_rng.get_state()

    (w_c, rng_c), (w_e, rng_e) = run(True), run(False)
    w0 = torch.cat([p.detach().reshape(-1) for p in gnn_model("painn").parameters()])
    assert float((w_c - w0).abs().max()) > 1e-4, "the updates moved the weights"
    torch.testing.assert_close(w_c, w_e, rtol=0, atol=1e-9)
    assert torch.equal(rng_c, rng_e)
