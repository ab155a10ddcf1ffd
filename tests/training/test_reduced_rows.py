"""Reduced-row EKF updates for GNNs (task=ekf), the fast paths against the plain ones (float64 throughout):

* the energy row taken from the model's force pass (``reduced_rows_with_jacobian``) equals the plain
  reduced rows + per-row backward passes (``reduced_row_errors`` + ``flat_jacobian``), with the same label draws;
* the batched Jacobian (``is_grads_batched``) equals the loop of backward passes on a PaiNN;
* the compiled filter kernel (``kernel="native"``: thin X = P Jᵀ and the fused P ← (P − VᵀV)/λ on the upper
  triangle) equals the dense algebra and the torch/BLAS kernels, float64 and float32, with and without fading.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import schnetpack as spk
from ekf_plugin.jacobian import flat_jacobian
from ekf_plugin.training.schedule import reduced_row_errors, reduced_rows_with_jacobian

from tests.training._gnn import frames as _frames, model as _model


def _plain(model, batch, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    pred = model(dict(batch))
    xi = reduced_row_errors(pred, batch, g, **kw)
    params = list(model.parameters())
    return xi.detach(), flat_jacobian(xi, params, vectorize=False), pred, g


@pytest.mark.parametrize("kind", ["painn", "schnet"])
@pytest.mark.parametrize("n_atoms", [(9,), (9, 7)], ids=["B=1", "B=2"])
@pytest.mark.parametrize("per_atom", [True, False])
def test_energy_row_from_the_force_pass_equals_plain_rows(kind, n_atoms, per_atom):
    model, batch = _model(kind), _frames(n_atoms)
    kw = dict(n_force_groups=3, force_group_size=2, c_energy=2.0, c_forces=3.0, energy_per_atom=per_atom)
    xi0, J0, pred0, g0 = _plain(model, batch, 5, **kw)
    g1 = torch.Generator().manual_seed(5)
    params = list(model.parameters())
    out = reduced_rows_with_jacobian(model, lambda: model(dict(batch)), batch, g1, params, **kw)
    assert out is not None, "the fast path applies to SchNetPack's Forces"
    xi1, J1, pred1 = out
    assert J1.shape == (4, sum(p.numel() for p in params))
    torch.testing.assert_close(xi1, xi0, rtol=0, atol=1e-12)
    torch.testing.assert_close(J1, J0, rtol=0, atol=1e-9 * float(J0.abs().max()))
    assert float(J0[0].abs().max()) > 0 and float(J0[1:].abs().max()) > 0
    torch.testing.assert_close(pred1["forces"].detach(), pred0["forces"].detach(), rtol=0, atol=1e-12)
    assert torch.equal(g0.get_state(), g1.get_state()), "the same label draws"
    assert len(model.output_modules) == 2, "the force module is back in place"


def test_fast_path_declines_stress_models_and_draws_nothing():
    model, batch = _model("schnet", stress=True), _frames((9,))
    batch[spk.properties.strain] = torch.zeros(1, 3, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    out = reduced_rows_with_jacobian(model, lambda: model(dict(batch)), batch, g, list(model.parameters()))
    assert out is None
    assert torch.equal(g.get_state(), state)


def test_batched_jacobian_equals_loop_on_painn_rows():
    """flat_jacobian(vectorize=True) (one batched backward) against one backward per row, double backward."""
    model, batch = _model("painn"), _frames((9, 7))
    pred = model(dict(batch))
    xi = reduced_row_errors(pred, batch, torch.Generator().manual_seed(2), n_force_groups=3, force_group_size=2)
    params = list(model.parameters())
    J_loop = flat_jacobian(xi, params, vectorize=False)
    J_vec = flat_jacobian(xi, params, vectorize=True)
    torch.testing.assert_close(J_vec, J_loop, rtol=0, atol=1e-9 * float(J_loop.abs().max()))


def test_task_uses_the_fast_rows_and_takes_the_same_steps(monkeypatch):
    """PaperScheduleTask(label_mode='reduced') + EKF: the fast path (one backward fewer) gives the same weights."""
    from ekf_plugin.optim import EKF
    from ekf_plugin.training import PaperScheduleTask
    import ekf_plugin.training.task as task_mod

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _toy import outputs  # noqa: PLC0415

    batches = [_frames((9,), seed=s) for s in range(3)]

    def run(fast: bool):
        task = PaperScheduleTask(_model("painn"), outputs(), optimizer_cls=EKF, label_mode="reduced", n_force_groups=2,
                                 force_group_size=3, c_energy=1.0, c_forces=1.0,
                                 optimizer_args={"lr": 1.0, "fading_lambda": 0.98, "fading_nu": 0.9987, "blocks": 300})
        opt = task.configure_optimizers()
        opt = opt[0][0] if isinstance(opt, tuple) else opt
        calls = []
        real = task_mod.reduced_rows_with_jacobian

        def spy(*a, **k):
            out = real(*a, **k) if fast else None
            calls.append(out is not None)
            return out

        monkeypatch.setattr(task_mod, "reduced_rows_with_jacobian", spy)
        for b in batches:
            opt.step(lambda: task._errors(b, [], {}, opt.params))
        assert calls == [fast] * len(batches)
        return torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])

    w_fast, w_plain = run(True), run(False)
    w0 = torch.cat([p.detach().reshape(-1) for p in _model("painn").parameters()])
    assert float((w_fast - w0).abs().max()) > 1e-4, "the updates moved the weights"
    torch.testing.assert_close(w_fast, w_plain, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------ native filter kernel
native = pytest.importorskip("ekf_plugin.optim.native")
_LIB = native.load()
needs_native = pytest.mark.skipif(_LIB is None, reason=f"no compiled kernel: {native.last_error()}")


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 3e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("n,m", [(1, 1), (3, 2), (7, 5), (37, 4), (37, 6), (100, 3), (100, 17), (517, 5), (1030, 9)])
def test_native_passes_equal_dense_algebra_reading_only_the_upper_triangle(dtype, tol, n, m):
    g = torch.Generator().manual_seed(n * 31 + m)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    P = A @ A.T / n + torch.eye(n, dtype=torch.float64)
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    V = 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)
    upper = torch.ones(n, n, dtype=torch.bool).triu()
    stored = torch.where(upper, P, torch.tensor(float("nan"), dtype=torch.float64)).to(dtype)  # lower: never read
    kern = native.NativeKernel()
    X = kern.xt(stored, J.to(dtype))
    torch.testing.assert_close(X.double(), J @ P, rtol=0, atol=tol * 10 * float((J @ P).abs().max()))
    Q = stored.clone()
    kern.sub_gram_(Q, V.to(dtype), 1 / 0.98)
    expect = (P - V.T @ V) / 0.98
    torch.testing.assert_close(Q.double()[upper], expect[upper], rtol=0, atol=tol * 10)
    assert bool(torch.isnan(Q[~upper]).all()), "the lower triangle is not written"
    R = stored.clone()
    kern.sub_gram_(R, V.to(dtype))  # scale 1: plain P − VᵀV
    torch.testing.assert_close(R.double()[upper], (P - V.T @ V)[upper], rtol=0, atol=tol * 10)


def _train(kernel, dtype=torch.float64, **kw):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "optim"))
    from _ekf_models import mlp, regression_data  # noqa: PLC0415

    from ekf_plugin.optim import EKF

    net = mlp(dtype=dtype)
    x, y = regression_data(dtype=dtype)
    opt = EKF(net.parameters(), lr=0.3, kernel=kernel, symmetrize_every=0, dtype=dtype, **kw)
    i = 0
    for r in (1, 3, 2, 1, 4, 5):
        opt.step(lambda: (net(x[i : i + r]) - y[i : i + r]).reshape(-1))
        i += r
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]), opt


@needs_native
@pytest.mark.parametrize("kw", [dict(), dict(blocks=7), dict(blocks=7, fading_lambda=0.97, fading_nu=0.99),
                                dict(fading_lambda=0.9, fading_nu=0.999, q=1e-3)],
                         ids=["dense", "blocks", "blocks-fading", "dense-fading-q"])
def test_ekf_with_native_kernel_equals_torch_kernel(kw):
    w_n, opt_n = _train("native", **kw)
    w_t, opt_t = _train("torch", **kw)
    assert opt_n.kernel.name == "native" and opt_n.kernel.fused_scale
    torch.testing.assert_close(w_n, w_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt_n.covariance(), opt_t.covariance(), rtol=0, atol=1e-12)
    assert opt_n.ekf_state["lam"] == opt_t.ekf_state["lam"]
    w32_n, _ = _train("native", dtype=torch.float32, **kw)
    w32_t, _ = _train("torch", dtype=torch.float32, **kw)
    torch.testing.assert_close(w32_n, w32_t, rtol=0, atol=1e-5)


@needs_native
def test_native_kernel_checkpoint_resumes_under_blas():
    w_a, opt_a = _train("native", blocks=7, fading_lambda=0.97, fading_nu=0.99)
    sd = copy.deepcopy(opt_a.state_dict())
    from ekf_plugin.optim import EKF

    from _ekf_models import mlp  # noqa: PLC0415 (on sys.path after _train)

    opt_b = EKF(mlp().parameters(), lr=0.3, kernel="blas", blocks=7, fading_lambda=0.97, fading_nu=0.99)
    opt_b.load_state_dict(sd)
    torch.testing.assert_close(opt_b.covariance(), opt_a.covariance(), rtol=0, atol=0)


def test_native_kernel_falls_back_with_a_warning(monkeypatch):
    from ekf_plugin.optim.kernels import BlasKernel, select_kernel

    monkeypatch.setitem(native._STATE, "lib", None)
    monkeypatch.setitem(native._STATE, "error", "no C++ compiler")
    with pytest.warns(UserWarning, match="kernel='native' is not available .*no C\\+\\+ compiler"):
        k = select_kernel("native", torch.device("cpu"), torch.float32)
    assert isinstance(k, BlasKernel) and not k.fused_scale
    with pytest.warns(UserWarning, match="not available"):
        assert select_kernel("native", torch.device("meta"), torch.float32).name == "torch"
    np.testing.assert_equal(BlasKernel.fused_scale, False)
