"""The sharded EKF filter (P split by rows between processes, ``ekf_plugin.optim.sharded``).

Single-process checks of the plan and of the sharded algebra (``shard="rows"`` with W = 1), and one
2-process gloo run (``_sharded_worker.py``) compared with a 1-process EKF on the same labels: weights
bitwise identical between the processes and equal to the 1-process filter to 1e-10, P assembled from the
shards equal to 1e-10, checkpoints moving between 1 and 2 processes, each process holding ~half of P.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ekf_plugin.optim import EKF
from ekf_plugin.optim.sharded import plan_shards, split_rows, triangle_row_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _ekf_models import mlp, regression_data  # noqa: E402

KW = dict(lr=0.5, q=1e-4)


@pytest.mark.parametrize("tri_cost", [1.0, 1.6, 3.0])
def test_triangle_row_split_balances_the_cost(tri_cost):
    for nb, world in ((2827, 2), (2827, 3), (26, 2), (5, 4), (1, 2)):
        cuts = triangle_row_split(nb, world, tri_cost)
        assert cuts[0] == 0 and cuts[-1] == nb and all(a <= b for a, b in zip(cuts, cuts[1:]))
        cost = [tri_cost * (c - a) * (c - a + 1) / 2 + (c - a) * (nb - c) for a, c in zip(cuts, cuts[1:])]
        assert max(cost) - min(cost) <= 2 * tri_cost * nb, (nb, world, cost)  # within about one row
    assert triangle_row_split(2827, 2, 1.0)[1] == pytest.approx(2827 * (1 - 2**-0.5), abs=2)  # equal area


def test_plan_shards_whole_blocks_when_many_else_rows():
    many = [(i * 100, (i + 1) * 100) for i in range(8)]
    plan = plan_shards(many, 2)
    assert sorted(b for r in plan for b, _, _ in r) == list(range(8))
    assert all(r0 == 0 and r1 == 100 for r in plan for _, r0, r1 in r) and [len(r) for r in plan] == [4, 4]
    few = [(0, 300), (300, 400)]  # two blocks, two processes: LPT would be 9:1, so both are cut by rows
    plan = plan_shards(few, 2)
    for b, (a, e) in enumerate(few):
        rows = sorted((r0, r1) for r in plan for bb, r0, r1 in r if bb == b)
        assert rows[0][0] == 0 and rows[-1][1] == e - a and len(rows) == 2


def _train(opt, net, steps=range(0, 40, 4)):
    x, y = regression_data()
    for i in steps:
        opt.step(lambda: (net(x[i : i + 4]) - y[i : i + 4]).reshape(-1))


@pytest.mark.parametrize("kw", [{}, {"kernel": "torch", "symmetrize_every": 3}, {"blocks": "tensor"},
                                {"fading_lambda": 0.97, "fading_nu": 0.99}, {"innovation_gate": 1e3},
                                {"defer_rows": 0},  # every update applied at once
                                {"defer_rows": 5, "blocks": "tensor", "fading_lambda": 0.97, "fading_nu": 0.99}])
def test_sharded_algebra_with_one_process_equals_plain_filter(kw):
    net_a, net_b = mlp(), mlp()
    plain, rows = EKF(net_a.parameters(), **KW, **kw), EKF(net_b.parameters(), shard="rows", **KW, **kw)
    assert plain.shard is None and rows.shard is not None
    _train(plain, net_a), _train(rows, net_b)
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(plain.covariance(), rows.covariance(), rtol=0, atol=1e-12)
    assert plain.ekf_state["step"] == rows.ekf_state["step"] == 10


@pytest.mark.parametrize("kw", [{"defer_rows": 32}, {"defer_rows": 0}, {"kernel": "torch", "symmetrize_every": 3},
                                {"fading_lambda": 0.97, "fading_nu": 0.99}, {"blocks": "tensor", "defer_rows": 24}])
def test_the_kept_diagonal_is_the_stored_one_at_every_update(kw):
    """The sharded filter exchanges diag S only after S changed and keeps it in between: at every update the
    diagonal it uses is the one stored in the pieces then (a stale one would pass or reject updates wrongly)."""
    net = mlp()
    opt = EKF(net.parameters(), shard="rows", **KW, **kw)
    shard, calls = opt.shard, []
    inner = shard.xt_and_diag

    def xt_and_diag(local, J, own_diag=None, check=None, diag=None):
        XT, got = inner(local, J, own_diag, check, diag)
        calls.append((diag is not None, got.clone(), shard.own_diagonal(local)))  # world 1: the whole diagonal
        return XT, got

    shard.xt_and_diag = xt_and_diag
    _train(opt, net, steps=range(0, 40, 2))
    assert len(calls) == 20
    for kept, used, stored in calls:
        assert torch.equal(used, stored)
    if kw.get("defer_rows") != 0 and "fading_lambda" not in kw and "symmetrize_every" not in kw:
        assert any(kept for kept, _, _ in calls), "the diagonal is kept between changes of S"


def test_auto_without_process_group_is_the_plain_filter_and_state_dicts_match():
    net_a, net_b = mlp(), mlp()
    auto, rows = EKF(net_a.parameters(), **KW), EKF(net_b.parameters(), shard="rows", **KW)
    assert auto.shard is None
    _train(auto, net_a), _train(rows, net_b)
    sa, sb = auto.state_dict()["state"]["ekf"]["P"], rows.state_dict()["state"]["ekf"]["P"]
    assert [p.shape for p in sa] == [p.shape for p in sb] == [(26, 26)]
    torch.testing.assert_close(sa[0], sb[0], rtol=0, atol=1e-12)
    fresh = EKF(mlp().parameters(), shard="rows", **KW)
    fresh.load_state_dict(auto.state_dict())  # a plain checkpoint into a sharded optimizer: P exactly
    assert torch.equal(fresh.covariance(), auto.covariance())
    with pytest.raises(ValueError, match="shard"):
        EKF(mlp().parameters(), shard="columns")


def test_split_rows_without_group_is_the_function():
    v, r = split_rows(lambda i: (i.double(), torch.ones(len(i), 3)), torch.arange(5))
    assert torch.equal(v, torch.arange(5).double()) and r.shape == (5, 3)


# ----------------------------------------------------------------------------- two gloo processes
def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _reference(steps=range(0, 40, 4), world=2, split=False, opt=None, net=None, **kw):
    """1-process EKF on the union of the ranks' labels (rank order), as the sharded run sees them."""
    net = net or mlp()
    opt = opt or EKF(net.parameters(), **{**KW, **kw})
    x, y = regression_data()
    for i in steps:
        xb, yb = x[i : i + 4], y[i : i + 4]
        if split:
            opt.step(lambda: (net(xb) - yb).reshape(-1))
        else:
            opt.step(lambda: torch.cat([(net(xb[r::world]) - yb[r::world]).reshape(-1) for r in range(world)]))
    return net, opt


def _close(ws, net):
    for a, b in zip(net.parameters(), ws):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-10)


def test_two_gloo_processes_share_one_filter(tmp_path):
    # a 1-process checkpoint after 5 updates, for the W = 2 workers to resume from
    net1, opt1 = _reference(steps=range(0, 20, 4))
    torch.save({"sd": opt1.state_dict(), "w": [p.detach().clone() for p in net1.parameters()]}, tmp_path / "single_sd.pt")
    port = _free_port()
    worker = HERE / "_sharded_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), "2", port, str(tmp_path)]) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=180) == 0
    names = ("streams", "split", "blocks", "resume", "streams_gloo", "split_gloo")
    res = {(name, r): torch.load(tmp_path / f"{name}_r{r}.pt") for name in names for r in range(2)}
    for name in names:
        r0, r1 = res[name, 0], res[name, 1]
        assert r0["shm"] == r1["shm"] == (not name.endswith("_gloo")), f"{name}: shared memory on this machine"
        for a, b in zip(r0["w"], r1["w"]):
            assert torch.equal(a, b), f"{name}: the weights must be bitwise identical on both processes"
        assert torch.equal(r0["P"], r1["P"])
        ref_kw = dict(blocks="tensor", kernel="torch", fading_lambda=0.97, fading_nu=0.99, symmetrize_every=3) if name == "blocks" else {}
        net, opt = _reference(split=name.startswith("split"), **ref_kw)
        _close(r0["w"], net)
        torch.testing.assert_close(opt.covariance(), r0["P"], rtol=0, atol=1e-10)
        full = opt.n * opt.n * 8
        assert max(r0["local_bytes"], r1["local_bytes"]) < 0.62 * full, f"{name}: each process must hold ~half of P"
    # a checkpoint written by 2 processes resumes in 1 (P exactly as saved), and the 1-process one in 2
    ck = torch.load(tmp_path / "resume_sd.pt")
    net, opt = _reference(steps=range(0, 20, 4))
    torch.testing.assert_close(opt.covariance(), ck["sd"]["state"]["ekf"]["P"][0], rtol=0, atol=1e-12)
    net2 = mlp()
    with torch.no_grad():
        for p, w in zip(net2.parameters(), ck["w"]):
            p.copy_(w)
    opt2 = EKF(net2.parameters(), **KW)
    opt2.load_state_dict(ck["sd"])
    assert torch.equal(opt2.ekf_state["P"][0], ck["sd"]["state"]["ekf"]["P"][0])
    _reference(steps=range(20, 40, 4), opt=opt2, net=net2)
    net_full, opt_full = _reference()
    _close([p.detach() for p in net2.parameters()], net_full)
    _close(res["resume", 0]["from_single_w"], net_full)
    torch.testing.assert_close(res["resume", 0]["from_single_P"], opt_full.covariance(), rtol=0, atol=1e-10)
    for r in range(2):
        mm = torch.load(tmp_path / f"mismatch_r{r}.pt")
        assert "different labels" in mm["raised"] and "different inputs" in mm["raised_sum"]
        assert "got different labels for one update" in mm["raised_step"] and mm["step"] == 0
        values, rows = mm["summed"]
        assert values.tolist() == [3.0] and bool((rows == 1.0).all()) and rows.shape == (1, opt.n)


def test_sum_rows_without_a_process_group_is_the_function_of_share_zero_of_one():
    from ekf_plugin.optim.sharded import sum_rows

    calls = []
    out = sum_rows(lambda r, w: calls.append((r, w)) or (torch.ones(1), torch.zeros(1, 4)), key=3.0)
    assert calls == [(0, 1)] and out[0].tolist() == [1.0] and out[1].shape == (1, 4)
