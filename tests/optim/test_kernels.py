"""The filter kernels (SciPy symmetric BLAS vs full-matrix torch), closed-form Jacobians, the innovation
gate, the P-diagonal guard and state from other optimizers (float64 unless stated)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ekf_models import mlp, regression_data  # noqa: E402

from ekf_plugin.jacobian import flat_jacobian  # noqa: E402
from ekf_plugin.optim import EKF  # noqa: E402
from ekf_plugin.optim.ekf import EKFDivergenceError  # noqa: E402
from ekf_plugin.optim.kernels import BlasKernel, TorchKernel, select_kernel, symmetric_from_upper  # noqa: E402


def _batches(m_rows=(1, 3, 2, 1, 4)):
    x, y = regression_data()
    out, i = [], 0
    for r in m_rows:
        out.append((x[i : i + r], y[i : i + r]))
        i += r
    return out


def _train(kernel, blocks="dense", **kw):
    net = mlp()
    opt = EKF(net.parameters(), lr=0.3, kernel=kernel, blocks=blocks, symmetrize_every=0, **kw)
    for xb, yb in _batches():
        opt.step(lambda: (net(xb) - yb).reshape(-1))
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]), opt


def test_auto_kernel_is_blas_on_cpu_and_torch_elsewhere():
    assert isinstance(select_kernel("auto", torch.device("cpu"), torch.float64), BlasKernel)
    assert isinstance(select_kernel("torch", torch.device("cpu"), torch.float64), TorchKernel)
    with pytest.raises(ValueError, match="kernel must be one of"):
        select_kernel("fast", torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match="needs float32/float64 blocks on the CPU"):
        select_kernel("blas", torch.device("meta"), torch.float64)


@pytest.mark.parametrize("blocks", ["dense", 7])
def test_blas_kernel_equals_torch_kernel(blocks):
    """Same updates (m = 1 and m > 1, one or several blocks): weights and P agree to round-off."""
    w_b, opt_b = _train("blas", blocks)
    w_t, opt_t = _train("torch", blocks)
    torch.testing.assert_close(w_b, w_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt_b.covariance(), opt_t.covariance(), rtol=0, atol=1e-12)
    P = opt_b.covariance()
    assert torch.equal(P, P.T), "the BLAS kernel's P is exactly symmetric (one triangle kept)"
    raw = opt_b.ekf_state["P"][0]
    assert not torch.equal(raw, raw.T), "only the upper triangle is updated in place (the other is stale)"


def test_blas_kernel_float32_blocks():
    w_b, opt_b = _train("blas", dtype=torch.float32)
    w_t, opt_t = _train("torch", dtype=torch.float32)
    torch.testing.assert_close(w_b, w_t, rtol=0, atol=1e-5)


def test_state_dict_holds_full_p_and_resumes_under_the_other_kernel():
    net_a = mlp()
    opt_a = EKF(net_a.parameters(), lr=0.3, kernel="blas")
    batches = _batches()
    for xb, yb in batches[:3]:
        opt_a.step(lambda: (net_a(xb) - yb).reshape(-1))
    sd = opt_a.state_dict()
    P = sd["state"]["ekf"]["P"][0]
    assert torch.equal(P, P.T)
    net_b = mlp()
    net_b.load_state_dict(net_a.state_dict())
    opt_b = EKF(net_b.parameters(), lr=0.3, kernel="torch")
    opt_b.load_state_dict(sd)
    for xb, yb in batches[3:]:
        opt_a.step(lambda: (net_a(xb) - yb).reshape(-1))
        opt_b.step(lambda: (net_b(xb) - yb).reshape(-1))
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, tile", [(1, 128), (7, 3), (300, 128), (257, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_from_upper_mirrors_the_upper_triangle_and_ignores_the_lower(n, tile, dtype):
    g = torch.Generator().manual_seed(n)
    P = torch.randn(n, n, generator=g, dtype=dtype)  # lower triangle: garbage the result must not read
    S = symmetric_from_upper(P, tile=tile)
    assert S.data_ptr() != P.data_ptr()
    assert torch.equal(S, torch.triu(P) + torch.triu(P, 1).T)
    assert torch.equal(S, S.T)


def test_state_dict_p_is_a_copy_under_both_kernels():
    """The P in a state dict never aliases the filter's own block (BLAS kernel: a new symmetric tensor;
    torch kernel: a clone), so a checkpoint taken mid-run is not changed by later updates."""
    for kernel in ("blas", "torch"):
        net = mlp()
        opt = EKF(net.parameters(), lr=0.3, kernel=kernel)
        xb, yb = _batches()[0]
        opt.step(lambda: (net(xb) - yb).reshape(-1))
        P_saved = opt.state_dict()["state"]["ekf"]["P"][0]
        before = P_saved.clone()
        opt.step(lambda: (net(xb) - yb).reshape(-1))
        assert all(P_saved.data_ptr() != p.data_ptr() for p in opt.ekf_state["P"])
        assert torch.equal(P_saved, before)


def test_closure_may_return_its_own_jacobian():
    """(ξ, J) from the closure gives the same update as the autograd Jacobian of ξ."""
    net_a, net_b = mlp(), mlp()
    opt_a = EKF(net_a.parameters(), lr=0.3)
    opt_b = EKF(net_b.parameters(), lr=0.3)
    params_b = list(net_b.parameters())
    for xb, yb in _batches():
        opt_a.step(lambda: (net_a(xb) - yb).reshape(-1))

        def closure():
            xi = (net_b(xb) - yb).reshape(-1)
            return xi.detach(), flat_jacobian(xi, params_b)

        opt_b.step(closure)
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-13)
    with pytest.raises(RuntimeError, match="expected"):
        opt_b.step(lambda: (torch.zeros(2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)))


def test_innovation_gate_rejects_an_outlier_label_and_keeps_the_state(caplog):
    net = mlp()
    opt = EKF(net.parameters(), lr=0.3, innovation_gate=10.0, max_failures=3)
    x, y = regression_data()
    opt.step(lambda: (net(x[:2]) - y[:2]).reshape(-1))
    w_before = [p.detach().clone() for p in net.parameters()]
    P_before = opt.covariance()
    bad = y[2:3].clone()
    bad[0, 0] = 1e6  # an absurd label: |ξ|/√A ≈ 1e6·√η
    with caplog.at_level("WARNING"):
        opt.step(lambda: (net(x[2:3]) - bad).reshape(-1))
    assert "innovation gate" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(w_before, net.parameters()))
    assert torch.equal(opt.covariance(), P_before) and opt.ekf_state["rejected"] == 1
    opt.step(lambda: (net(x[3:4]) - y[3:4]).reshape(-1))  # a good label passes the gate
    assert opt.ekf_state["failures"] == 0 and opt.ekf_state["step"] == 2
    with pytest.raises(EKFDivergenceError, match="innovation gate"):
        for _ in range(3):
            opt.step(lambda: (net(x[2:3]) - bad).reshape(-1))
    # without the gate the same label is accepted and moves the weights far
    net2 = mlp()
    opt2 = EKF(net2.parameters(), lr=0.3)
    opt2.step(lambda: (net2(x[2:3]) - bad).reshape(-1))
    assert opt2.ekf_state["rejected"] == 0


@pytest.mark.parametrize("kernel", ["blas", "torch"])
def test_update_that_would_make_diag_p_non_positive_is_rejected(kernel, caplog):
    """float32 P, huge η: P − VᵀV rounds to a zero diagonal; the update is refused, P stays positive."""
    w = torch.nn.Parameter(torch.ones(1))
    opt = EKF([w], lr=1e12, dtype=torch.float32, kernel=kernel, max_failures=5)
    with caplog.at_level("WARNING"):
        opt.step(lambda: (w * 1.0 - 3.0).reshape(1))
    assert "positive definiteness" in caplog.text
    assert float(opt.covariance()[0, 0]) == 1.0 and opt.ekf_state["rejected"] == 1


def test_loading_another_optimizers_state_says_so():
    net = mlp()
    adam = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = regression_data()
    ((net(x) - y) ** 2).sum().backward()
    adam.step()
    opt = EKF(net.parameters(), lr=0.3)
    with pytest.raises(ValueError, match="not written by the EKF .*no covariance P"):
        opt.load_state_dict(adam.state_dict())


def test_blas_kernel_leaves_the_flat_jacobian_path_exact():
    """The default (auto) kernel still equals the closed-form Bayesian posterior of a linear model."""
    g = torch.Generator().manual_seed(5)
    N, d, p0, eta = 12, 4, 0.5, 3.0
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = torch.randn(N, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = EKF([w], lr=eta, p0=p0)
    assert isinstance(opt.kernel, BlasKernel)
    for i in range(0, N, 3):
        opt.step(lambda: X[i : i + 3] @ w - y[i : i + 3])
    prec = np.eye(d) / p0 + eta * X.numpy().T @ X.numpy()
    np.testing.assert_allclose(w.detach().numpy(), np.linalg.solve(prec, eta * X.numpy().T @ y.numpy()), atol=1e-12)
    np.testing.assert_allclose(opt.covariance().numpy(), np.linalg.inv(prec), atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("h,w,m", [(13, 29, 1), (16, 600, 10), (7, 5, 3), (131, 257, 4), (50, 301, 17)])
def test_rectangle_product_of_a_sharded_p_in_one_pass_equals_the_two_torch_products(dtype, tol, h, w, m):
    from ekf_plugin.optim.native import load, rect_xt

    if load() is None:
        pytest.skip("no C++ compiler for the native kernels")
    g = torch.Generator().manual_seed(h * w + m)
    R, Jl, Jr = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((h, w), (m, h), (m, w)))
    X1, X2 = rect_xt(R.to(dtype), Jl.to(dtype), Jr.to(dtype))  # h % 8 != 0: the tail rows too
    assert X1.dtype == X2.dtype == dtype and X1.shape == (m, h) and X2.shape == (m, w)
    torch.testing.assert_close(X1.double(), Jr @ R.T, rtol=tol, atol=tol * w)
    torch.testing.assert_close(X2.double(), Jl @ R, rtol=tol, atol=tol * h)
    blas, ref = BlasKernel().rect_xt(R, Jl[:, :], Jr[:, ::1]), TorchKernel().rect_xt(R, Jl, Jr)
    for a, b in zip(blas, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert rect_xt(R.T, Jr, Jl) is None, "a non-contiguous rectangle goes to the torch products"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("h,w,m", [(13, 29, 1), (16, 600, 10), (50, 301, 35)])
def test_rectangle_update_of_a_sharded_p_equals_the_dense_product(dtype, tol, h, w, m):
    """R −= Vlᵀ Vr (the rectangle's part of P −= Vᵀ V in the sharded filter): the BLAS kernel's ``?gemm`` on R's
    column-major view and the torch kernel's ``addmm_`` both equal the float64 product; a non-contiguous R (no
    column-major view) takes the torch way under the BLAS kernel too."""
    g = torch.Generator().manual_seed(h * w + m)
    R0, Vl, Vr = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((h, w), (m, h), (m, w)))
    want = R0 - Vl.T @ Vr  # (h, w)
    for kernel in (BlasKernel(), TorchKernel()):
        R = R0.to(dtype, copy=True)
        kernel.rect_sub_gram_(R, Vl.to(dtype), Vr.to(dtype))
        assert R.dtype == dtype
        torch.testing.assert_close(R.double(), want, rtol=tol, atol=tol * m)
    big = R0.to(dtype).repeat(1, 2)  # (h, 2w): R as a non-contiguous view into it
    BlasKernel().rect_sub_gram_(big[:, :w], Vl.to(dtype), Vr.to(dtype))
    torch.testing.assert_close(big[:, :w].double(), want, rtol=tol, atol=tol * m)
    torch.testing.assert_close(big[:, w:], R0.to(dtype), rtol=0, atol=0)  # nothing written beside it


@pytest.mark.parametrize("m", [1, 3, 10])
def test_portable_build_of_the_filter_kernels_gives_the_same_product(m):
    """Built without ``-march=native`` (the fallback of ``native.load`` for compilers that refuse it; no AVX, so
    no register constraints in the blocked product), X = P Jᵀ still equals the dense product."""
    import ctypes

    from ekf_plugin.native import compiler, native_library
    from ekf_plugin.optim.native import SOURCE

    if compiler() is None:
        pytest.skip("no C++ compiler for the native kernels")
    lib = native_library(SOURCE, ("-O2", "-fopenmp-simd", "-fPIC", "-shared", "-fno-math-errno"), name="ekf_filter_portable")
    fn = lib.ekf_xt_f64
    fn.argtypes, fn.restype = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2, None
    g = torch.Generator().manual_seed(m)
    n = 61  # panels of 24 rows and a tail
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    P = A @ A.T / n
    stored = torch.where(torch.ones(n, n, dtype=torch.bool).triu(), P, torch.tensor(float("nan"), dtype=torch.float64))
    J = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.empty(m, n, dtype=torch.float64)
    fn(stored.data_ptr(), J.data_ptr(), X.data_ptr(), n, m)
    torch.testing.assert_close(X, J @ P, rtol=1e-12, atol=1e-12)


def _gain_reference(X, J, xi, dS, c, noise, W, wsq, g):
    """native.gain's algebra in float64 torch (its C++ comment): X (S Jᵀ)ᵀ corrected to (P Jᵀ)ᵀ, A, L, u, V, Δw,
    dmin and max |V|."""
    X = X.double().clone()
    if W is not None:
        X -= (J.double() @ W.double().T) @ W.double()  # (m, n)
    if g is not None:
        X += J.double() * g.double()
    X *= c
    A = 0.5 * (J.double() @ X.T + X @ J.double().T) + noise * torch.eye(J.shape[0], dtype=torch.float64)  # (m, m)
    L = torch.linalg.cholesky(A)
    u = torch.linalg.solve_triangular(L, xi.double()[:, None], upper=False)[:, 0]  # (m,)
    V = torch.linalg.solve_triangular(L, X, upper=False)  # (m, n)
    extra = (g.double() if g is not None else 0) - (wsq.double() if wsq is not None else 0)
    d = c * (dS.double() + extra) - (V * V).sum(0)  # (n,)
    return A, V, V.T @ u, float(d.min()), float(V.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, m, r", [(37, 1, 0), (64, 3, 5), (203, 10, 70), (16, 10, 0), (101, 2, 1)])
def test_compiled_gain_equals_its_reference_algebra(dtype, n, m, r):
    """native.gain (the update's small algebra in one call: vector lanes over the columns with a tail, deferred rows
    in groups of 64) against the same algebra in float64 torch: A, V, Δw, dmin, the checks on max |V| and dmin, a
    NaN anywhere in X refused, and the weights stepped through their pointers."""
    from ekf_plugin.optim import native

    if native.load() is None:
        pytest.skip("no C++ compiler for the native kernels")
    g_ = torch.Generator().manual_seed(n + m + r)
    J = torch.randn(m, n, generator=g_, dtype=dtype)  # (m, n)
    X0 = (J @ torch.eye(n, dtype=dtype) * 0.5 + 0.01 * torch.randn(m, n, generator=g_, dtype=dtype)).contiguous()
    xi = torch.randn(m, generator=g_, dtype=dtype)
    W = (0.02 * torch.randn(r, n, generator=g_, dtype=dtype)) if r else None  # (r, n) deferred rows
    wsq = (W * W).sum(0) if r else None  # (n,)
    gd = 1e-3 * torch.rand(n, generator=g_, dtype=dtype)
    dS = 0.5 + torch.rand(n, generator=g_, dtype=dtype)
    c = 1.25
    A_ref, V_ref, dw_ref, dmin_ref, vmax_ref = _gain_reference(X0, J, xi, dS, c, 0.1, W, wsq, gd)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    weights = [torch.zeros(n // 2, dtype=dtype), torch.zeros(n - n // 2, dtype=dtype)]
    X = X0.clone()
    ok, info, dmin, A, dw, stepped = native.gain(X, J, xi, dS, c, 0.1, 1e30, None, W, wsq, gd, weights=weights)
    assert ok and info == 0 and stepped
    torch.testing.assert_close(A.double(), A_ref, **tol)
    torch.testing.assert_close(X.double(), V_ref, **tol)  # V in place
    torch.testing.assert_close(dw.double(), dw_ref, **tol)
    assert dmin == pytest.approx(dmin_ref, rel=1e-4 if dtype == torch.float32 else 1e-10)
    torch.testing.assert_close(torch.cat(weights).double(), -dw_ref, **tol)
    for big, expect in ((0.999 * vmax_ref, False), (1.001 * vmax_ref, True)):  # the max |V| check, at its edge
        X = X0.clone()
        assert native.gain(X, J, xi, dS, c, 0.1, big, None, W, wsq, gd)[0] is expect
    # dmin: the diagonal of P after the update must stay positive; lowering dS by more than dmin makes it not
    shift = (dmin_ref + 1e-3 * abs(dmin_ref) + 1e-6) / c
    X = X0.clone()
    refused = native.gain(X, J, xi, dS - shift, c, 0.1, 1e30, None, W, wsq, gd)
    assert not refused[0] and refused[2] < 0
    for col in (0, n - 1, n // 2):  # a NaN in a vector lane or in the tail is refused, not stepped
        X = X0.clone()
        X[m - 1, col] = float("nan")
        w = [torch.zeros(n, dtype=dtype)]
        out = native.gain(X, J, xi, dS, c, 0.1, 1e30, None, W, wsq, gd, weights=w)
        assert not out[0] and not out[5] and not bool(w[0].any())
