"""Exactness and robustness tests of the EKF optimizer (plain PyTorch, float64)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ekf_models import mlp, regression_data  # noqa: E402

from ekf_plugin.optim import EKF, plan_blocks  # noqa: E402
from ekf_plugin.optim.ekf import EKFDivergenceError  # noqa: E402

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- linear model = RLS
@pytest.mark.parametrize("m", [1, 4])
def test_linear_model_one_pass_equals_bayesian_ridge(m):
    """y = Xw, P0 = p0 I, R = I/η, Q = 0: one pass of the filter = closed-form posterior mean and covariance."""
    g = torch.Generator().manual_seed(3)
    N, d, p0, eta = 24, 5, 0.7, 2.5
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
    w0 = torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    opt = EKF([w], lr=eta, p0=p0, q=0.0, symmetrize_every=0)
    for i in range(0, N, m):
        opt.step(lambda: X[i : i + m] @ w - y[i : i + m])
    Xn, yn, w0n = X.numpy(), y.numpy(), w0.numpy()
    prec = np.eye(d) / p0 + eta * Xn.T @ Xn
    w_ref = np.linalg.solve(prec, w0n / p0 + eta * Xn.T @ yn)
    np.testing.assert_allclose(w.detach().numpy(), w_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(opt.covariance().numpy(), np.linalg.inv(prec), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- MLP = dense NumPy Algorithm 2
def _reference_steps(net, batches, eta, p0, q, q_decay=1.0, fading=None, nu=1.0, blocks=None):
    """Straightforward NumPy Algorithm 2 (ξ = ŷ − y, w ← w − Kξ), J from torch.func.jacrev."""
    names = [k for k, _ in net.named_parameters()]
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    n = sum(v.numel() for v in params.values())
    P = p0 * np.eye(n)
    lam = fading
    for xb, yb in batches:
        def err(pr):
            return (functional_call(net, pr, (xb,)) - yb).reshape(-1)

        jac = jacrev(err)(params)
        J = np.concatenate([jac[k].reshape(jac[k].shape[0], -1).numpy() for k in names], axis=1)
        xi = err(params).detach().numpy()
        if blocks is not None:  # block-diagonal P: zero the coupling (shared innovation)
            mask = np.zeros((n, n))
            for a, b in blocks:
                mask[a:b, a:b] = 1
            P = P * mask
        r = lam if lam is not None else 1.0 / eta
        A = np.linalg.inv(J @ P @ J.T + r * np.eye(len(xi)))
        K = P @ J.T @ A
        P = (np.eye(n) - K @ J) @ P
        if lam is not None:
            P = P / lam
            lam = nu * lam + 1 - nu
        P = P + q * np.eye(n)
        q = q * q_decay
        w = np.concatenate([params[k].reshape(-1).numpy() for k in names]) - K @ xi
        off = 0
        for k in names:
            c = params[k].numel()
            params[k] = torch.from_numpy(w[off : off + c].copy()).reshape(params[k].shape)
            off += c
    return np.concatenate([params[k].reshape(-1).numpy() for k in names]), P


def _run(net, batches, **kw):
    opt = EKF(net.parameters(), symmetrize_every=0, **kw)
    for xb, yb in batches:
        opt.step(lambda: (net(xb) - yb).reshape(-1))
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy(), opt


def _batches(k=5, size=3):
    x, y = regression_data()
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(k)]


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=1e-2, p0=1.0, q=0.0),
        dict(lr=0.3, p0=2.0, q=1e-3, q_decay=0.9),
        dict(lr=0.3, p0=0.5, fading_lambda=0.97, fading_nu=0.99),
    ],
    ids=["paper", "process-noise", "fading-memory"],
)
def test_mlp_steps_equal_numpy_algorithm2(kw):
    batches = _batches()
    w, opt = _run(mlp(), batches, **kw)
    w_ref, P_ref = _reference_steps(
        mlp(), batches, kw["lr"], kw["p0"], kw.get("q", 0.0), kw.get("q_decay", 1.0),
        kw.get("fading_lambda"), kw.get("fading_nu", 1.0),
    )
    np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(opt.covariance().numpy(), P_ref, rtol=0, atol=1e-10)
    P = opt.covariance()
    assert float((P - P.T).abs().max()) < 1e-14, "P must stay symmetric to round-off"


def test_symmetrize_every_keeps_p_exactly_symmetric():
    net = mlp()
    opt = EKF(net.parameters(), lr=0.3, symmetrize_every=1)
    for xb, yb in _batches():
        opt.step(lambda: (net(xb) - yb).reshape(-1))
    P = opt.covariance()
    assert torch.equal(P, P.T)


def test_blocked_single_block_equals_dense():
    batches = _batches()
    w_dense, opt_d = _run(mlp(), batches, lr=0.1)
    w_group, opt_g = _run(mlp(), batches, lr=0.1, blocks="group")
    w_big, opt_b = _run(mlp(), batches, lr=0.1, blocks=10_000)
    assert len(opt_g.blocks) == 1 and len(opt_b.blocks) == 1
    np.testing.assert_allclose(w_group, w_dense, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w_big, w_dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt_g.covariance(), opt_d.covariance(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("blocks", ["tensor", 7])
def test_blocked_equals_numpy_block_diagonal_filter(blocks):
    batches = _batches()
    w, opt = _run(mlp(), batches, lr=0.2, blocks=blocks)
    assert len(opt.blocks) > 1
    w_ref, P_ref = _reference_steps(mlp(), batches, 0.2, 1.0, 0.0, blocks=opt.blocks)
    np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
    mask = torch.zeros(opt.n, opt.n, dtype=torch.bool)
    for a, b in opt.blocks:
        mask[a:b, a:b] = True
    np.testing.assert_allclose(opt.covariance().numpy(), P_ref * mask.numpy(), rtol=0, atol=1e-10)


def test_plan_blocks():
    assert plan_blocks([3, 5, 2], [0, 0, 1], "dense") == [(0, 10)]
    assert plan_blocks([3, 5, 2], [0, 0, 1], "group") == [(0, 8), (8, 10)]
    assert plan_blocks([3, 5, 2], [0, 0, 1], "tensor") == [(0, 3), (3, 8), (8, 10)]
    assert plan_blocks([3, 5, 2], [0, 0, 1], 4) == [(0, 3), (3, 7), (7, 10)]
    assert plan_blocks([12], [0], 5) == [(0, 5), (5, 10), (10, 12)]


# ----------------------------------------------------------------------------- sign and training
def test_error_falls_on_regression():
    """w ← w − Kξ with ξ = ŷ − y reduces the training error (wrong sign would blow it up)."""
    torch.manual_seed(0)
    net = mlp(dtype=torch.float32)
    x, y = regression_data(200, dtype=torch.float32)
    opt = EKF(net.parameters(), lr=0.1)
    with torch.no_grad():
        rmse0 = float(((net(x) - y) ** 2).mean().sqrt())
    for epoch in range(3):
        for i in range(0, 200, 4):
            opt.step(lambda: (net(x[i : i + 4]) - y[i : i + 4]).reshape(-1))
    with torch.no_grad():
        rmse1 = float(((net(x) - y) ** 2).mean().sqrt())
    assert rmse1 < 0.3 * rmse0, (rmse0, rmse1)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert opt.ekf_state["P"][0].dtype == torch.float64


def test_step_hooks_and_profiler_range_as_torch_optim():
    """EKF.step runs torch.optim's step hooks itself (global pre first, global post last; a pre-hook may replace
    the closure) and records the profiler's Optimizer.step range while a profiler runs."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    torch.manual_seed(0)
    net = mlp(dtype=torch.float32)
    x, y = regression_data(8, dtype=torch.float32)
    opt = EKF(net.parameters(), lr=0.1)
    assert not hasattr(EKF.step, "__wrapped__"), "torch.optim must not wrap EKF.step again"
    calls = []
    closure = lambda: (net(x[:4]) - y[:4]).reshape(-1)  # noqa: E731
    other = lambda: (net(x[4:]) - y[4:]).reshape(-1)  # noqa: E731
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", a[1] is closure))),
        opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", a[1] is closure)) or ((o, other), {})),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", a[1] is other))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", a[1] is other))),
    ]
    with torch.no_grad():
        expected = other().double()  # ξ before the update, of the pre-hook's closure
    try:
        xi = opt.step(closure)
    finally:
        for h in handles:
            h.remove()
    assert calls == [("global pre", True), ("pre", True), ("post", True), ("global post", True)]
    torch.testing.assert_close(xi, expected)
    assert opt.ekf_state["step"] == 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step(closure)
    assert any(e.name == "Optimizer.step#EKF.step" for e in prof.events())
    assert opt.ekf_state["step"] == 2


# ----------------------------------------------------------------------------- guards
def test_nan_label_is_rejected_and_state_kept(caplog):
    net = mlp()
    x, y = regression_data()
    opt = EKF(net.parameters(), lr=0.1, max_failures=3)
    opt.step(lambda: (net(x[:2]) - y[:2]).reshape(-1))
    w_before = [p.detach().clone() for p in net.parameters()]
    P_before = opt.covariance().clone()
    step_before = opt.ekf_state["step"]
    y_bad = y[2:4].clone()
    y_bad[0, 1] = float("nan")
    with caplog.at_level(logging.WARNING, logger="ekf_plugin.optim.ekf"):
        opt.step(lambda: (net(x[2:4]) - y_bad).reshape(-1))
    assert "rejected" in caplog.text and "non-finite" in caplog.text
    assert opt.ekf_state["rejected"] == 1 and opt.ekf_state["step"] == step_before
    for p, q in zip(net.parameters(), w_before):
        assert torch.equal(p, q)
    assert torch.equal(opt.covariance(), P_before)
    opt.step(lambda: (net(x[4:6]) - y[4:6]).reshape(-1))  # a good update resets the failure count
    assert opt.ekf_state["failures"] == 0 and opt.ekf_state["step"] == step_before + 1
    with pytest.raises(EKFDivergenceError, match="consecutive"):
        for _ in range(3):
            opt.step(lambda: (net(x[2:4]) - y_bad).reshape(-1))
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("kernel,fading", [("auto", None), ("torch", None), ("auto", 0.97), ("native", 0.97)])
def test_deferred_rows_give_the_same_filter_as_immediate_updates(kernel, fading):
    """P = c(S + diag(g) − WᵀW) with rows and process noise g applied every ``defer_rows``: the same weights and
    P as applying every update at once (to round-off), whatever the label count per update, with the fading
    memory's 1/λ (c); reading P applies them; a rejected update leaves the deferred rows and noise alone."""
    x, y = regression_data()
    nets = [mlp(), mlp()]
    kw = dict(lr=0.2, q=1e-4, kernel=kernel, fading_lambda=fading, fading_nu=0.99)
    opts = [EKF(n.parameters(), defer_rows=d, **kw) for n, d in zip(nets, (0, 7))]
    sizes = [1, 3, 1, 1, 2, 3, 1, 2, 1, 1, 3]  # labels (×2 outputs) per update: the deferred block fills unevenly
    at = 0
    seen = set()
    for k in sizes:
        for net, opt in zip(nets, opts):
            opt.step(lambda: (net(x[at : at + k]) - y[at : at + k]).reshape(-1))
        seen.add(None if opts[1]._deferred[0] is None else opts[1]._deferred[0].shape[0])
        W = opts[1]._deferred[0]
        if W is not None:  # the kept diag(WᵀW) that the positivity check reads
            torch.testing.assert_close(opts[1]._wsq[0], (W * W).sum(0), rtol=1e-12, atol=1e-15)
        else:
            assert opts[1]._wsq[0] is None
        at += k
    assert None in seen and len(seen) > 2, f"rows were deferred and applied: {seen}"
    assert opts[1]._deferred[0] is not None, "the last rows are still pending here"
    W, g = opts[1]._deferred[0].clone(), opts[1]._gdiag.clone()
    y_bad = y[:2].clone()
    y_bad[0, 0] = float("nan")
    opts[1].step(lambda: (nets[1](x[:2]) - y_bad).reshape(-1))  # rejected
    assert torch.equal(opts[1]._deferred[0], W) and torch.equal(opts[1]._gdiag, g)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(opts[1].covariance(), opts[0].covariance(), rtol=1e-12, atol=1e-13)
    assert opts[1]._deferred[0] is None and opts[1]._gdiag is None, "covariance() applied the deferred work"
    with pytest.raises(ValueError, match="defer_rows"):
        EKF(mlp().parameters(), defer_rows=-1)


@pytest.mark.parametrize("kw", [dict(q=1e-4), dict(fading_lambda=0.97, fading_nu=0.99, defer_rows=0),
                                dict(q=1e-3, innovation_gate=3.0, dtype=torch.float32)])
def test_compiled_update_algebra_equals_the_torch_algebra(monkeypatch, kw):
    """The update's small algebra in one compiled call (native.gain: corrections of X for deferred rows and
    noise, A, Cholesky, V, the checks, w −= Δw) gives the torch algebra's weights and P, rejections included,
    and bumps the weights' version counters like an in-place update (the label predictor's caches key on them)."""
    from ekf_plugin.optim import ekf as ekf_module
    from ekf_plugin.optim import native

    if native.load() is None:
        pytest.skip("no C++ compiler for the native kernels")
    x, y = regression_data()
    runs = {}
    for compiled in (True, False):
        monkeypatch.setattr(ekf_module, "_NATIVE_GAIN", compiled)
        calls = []
        if compiled:
            real = native.gain
            monkeypatch.setattr(native, "gain", lambda *a, **k: calls.append(1) or real(*a, **k))
        net = mlp()
        opt = EKF(net.parameters(), lr=0.2, defer_rows=kw.get("defer_rows", 7), **{k: v for k, v in kw.items() if k != "defer_rows"})
        for at, k in enumerate([1, 3, 1, 2, 3, 1, 1, 2, 3, 1]):
            yb = y[at : at + k].clone()
            if at == 4:
                yb[0, 0] = float("nan")  # rejected: weights, P and the deferred rows unchanged
            if at == 6 and "innovation_gate" in kw:
                yb = yb + 1e3  # an outlier the gate refuses
            opt.step(lambda: (net(x[at : at + k]) - yb).reshape(-1))
        runs[compiled] = ([p.detach().clone() for p in net.parameters()], opt.covariance(), opt.rejected_updates)
        assert (len(calls) > 0) == compiled
        before = [p._version for p in net.parameters()]
        opt.step(lambda: (net(x[:2]) - y[:2]).reshape(-1))
        assert all(b < p._version for b, p in zip(before, net.parameters())), "an update bumps the weights' versions"
    (w1, P1, r1), (w0, P0, r0) = runs[True], runs[False]
    assert r1 == r0 >= 1
    tol = dict(rtol=1e-5, atol=1e-6) if kw.get("dtype") == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for a, b in zip(w1, w0):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(P1, P0, **tol)


def test_plain_backward_use_is_rejected():
    net = mlp()
    x, y = regression_data()
    opt = EKF(net.parameters())
    loss = ((net(x) - y) ** 2).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="1-D error vector"):
        opt.step(lambda: ((net(x) - y) ** 2).sum())
    with pytest.raises(RuntimeError, match="graph"):
        opt.step(lambda: (net(x) - y).reshape(-1).detach())


@pytest.mark.parametrize(
    "kw",
    [dict(lr=0.0), dict(lr=-1.0), dict(p0=0.0), dict(q=-1.0), dict(q_decay=1.5), dict(blocks="bogus"),
     dict(blocks=0), dict(fading_lambda=1.5), dict(max_failures=0), dict(dtype=torch.int32)],
)
def test_bad_arguments_raise_value_error(kw):
    with pytest.raises(ValueError):
        EKF(mlp().parameters(), **kw)


def test_too_large_dense_p_is_refused_with_advice(caplog):
    big = torch.nn.Parameter(torch.zeros(20_000))
    with pytest.raises(ValueError, match="blocks="):
        EKF([big], max_dense_bytes=2**30)
    with caplog.at_level(logging.INFO, logger="ekf_plugin.optim.ekf"):
        opt = EKF([big], blocks=1000, max_dense_bytes=2**30)
    assert "P memory" in caplog.text
    assert opt.memory_bytes == 20 * 1000**2 * 8


def test_eta_growth_schedule_and_torch_scheduler():
    net = mlp()
    x, y = regression_data()
    opt = EKF(net.parameters(), lr=0.01, eta_growth=10.0, eta_max=0.5)
    for i in range(3):
        opt.step(lambda: (net(x[i : i + 1]) - y[i : i + 1]).reshape(-1))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    opt2 = EKF(net.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    for i in range(4):
        opt2.step(lambda: (net(x[i : i + 1]) - y[i : i + 1]).reshape(-1))
        sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.25)


# ----------------------------------------------------------------------------- state dict
def test_state_dict_round_trip_continues_exactly(tmp_path):
    batches = _batches(k=8, size=2)
    kw = dict(lr=0.2, q=1e-3, q_decay=0.9, eta_growth=1.1, blocks="tensor", symmetrize_every=3)
    net_a = mlp()
    opt_a = EKF(net_a.parameters(), **kw)
    for k, (xb, yb) in enumerate(batches):
        if k == 4:
            opt_a.state_dict()  # the run that writes the checkpoint (applies its deferred rows) and goes on
        opt_a.step(lambda: (net_a(xb) - yb).reshape(-1))
    net_b = mlp()
    opt_b = EKF(net_b.parameters(), **kw)
    for xb, yb in batches[:4]:
        opt_b.step(lambda: (net_b(xb) - yb).reshape(-1))
    torch.save({"model": net_b.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    net_c = mlp(seed=9)
    net_c.load_state_dict(ck["model"])
    opt_c = EKF(net_c.parameters(), **kw)
    opt_c.load_state_dict(ck["opt"])
    for xb, yb in batches[4:]:
        opt_c.step(lambda: (net_c(xb) - yb).reshape(-1))
    for p, q in zip(net_a.parameters(), net_c.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(opt_a.covariance(), opt_c.covariance())
    assert opt_a.ekf_state["step"] == opt_c.ekf_state["step"] == 8
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"]


def test_state_dict_is_a_copy():
    net = mlp()
    x, y = regression_data()
    opt = EKF(net.parameters())
    sd = opt.state_dict()
    P0 = sd["state"]["ekf"]["P"][0].clone()
    opt.step(lambda: (net(x[:1]) - y[:1]).reshape(-1))
    assert torch.equal(sd["state"]["ekf"]["P"][0], P0)


# ----------------------------------------------------------------------------- multistream
def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.slow
def test_multistream_gloo_two_processes_equals_single_process_on_union(tmp_path):
    port = _free_port()
    worker = HERE / "_multistream_worker.py"
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(r), "2", port, str(tmp_path / f"r{r}.pt")])
        for r in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in range(2))
    for a, b in zip(r0["w"], r1["w"]):
        assert torch.equal(a, b), "weights must stay identical across processes"
    assert torch.equal(r0["P"], r1["P"])
    net = mlp()
    x, y = regression_data()
    opt = EKF(net.parameters(), lr=0.5, q=1e-4)
    for i in range(0, 40, 4):
        xb, yb = x[i : i + 4], y[i : i + 4]
        opt.step(lambda: torch.cat([(net(xb[r::2]) - yb[r::2]).reshape(-1) for r in range(2)]))
    for a, b in zip(net.parameters(), r0["w"]):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-10)
    torch.testing.assert_close(opt.covariance(), r0["P"], rtol=0, atol=1e-10)
