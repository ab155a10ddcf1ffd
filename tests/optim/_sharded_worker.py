"""One process of the sharded-EKF gloo tests: ``python _sharded_worker.py RANK WORLD PORT OUTDIR``.

Scenarios (each writes ``OUTDIR/<name>_r<RANK>.pt`` with the weights, the full P and the per-rank P bytes):

* ``streams``: shard="rows" with multistream labels: rank r contributes rows r, r + W, ... of each update;
* ``split``: label_split=True: every rank draws the same 4 inputs, computes a contiguous share of their rows
  with ``EKF.split_rows`` (closed-form (ξ, J) from ``flat_jacobian``);
* ``blocks``: blocks="tensor" (4 blocks, cut by rows), torch kernel, q > 0, fading memory;
* ``streams_gloo``, ``split_gloo``: as ``streams``/``split`` with ``comm="torch"`` (gloo instead of shared memory);
* ``mismatch``: ``split_rows`` and ``sum_rows`` with inputs that differ between the ranks (refused), a
  ``sum_rows`` of known parts, and a filter step whose ξ differs between the ranks (refused);
* ``resume``: 5 updates, ``state_dict()`` (written by rank 0 as ``resume_sd.pt``), a fresh sharded optimizer
  loads it and does 5 more; also loads ``OUTDIR/single_sd.pt`` (a 1-process state after 5 updates, if
  present) and continues from it.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ekf_models import mlp, regression_data  # noqa: E402

from ekf_plugin.jacobian import flat_jacobian  # noqa: E402
from ekf_plugin.optim import EKF  # noqa: E402
from ekf_plugin.optim.shared_memory import SharedMemoryGroup  # noqa: E402

KW = dict(lr=0.5, q=1e-4)


def split_closure(opt, net, xb, yb):
    """(ξ, J) of the 4 inputs' 8 outputs, rows shared between the ranks by ``split_rows``."""

    def rows(idx):
        with torch.enable_grad():
            xi = (net(xb) - yb).reshape(-1)[idx]  # (k,)
            return xi.detach(), flat_jacobian(xi, opt.params)  # (k,), (k, n)

    return lambda: opt.split_rows(rows, torch.arange(2 * len(xb)), key=float(xb.sum()))


def run(name: str, rank: int, world: int, out: Path) -> None:
    if name == "mismatch":  # ranks disagree on the input: split_rows must refuse
        net = mlp()
        opt = EKF(net.parameters(), shard="rows", label_split=True, **KW)
        try:
            opt.split_rows(lambda i: (torch.zeros(len(i)), torch.zeros(len(i), opt.n)), torch.arange(4), key=float(rank))
            raised = ""
        except RuntimeError as e:
            raised = str(e)
        # sum_rows: each rank's partial value r + 1 and row of r's, summed; then a key mismatch refused
        summed = opt.sum_rows(lambda r, w: (torch.tensor([r + 1.0]), torch.full((1, opt.n), float(r))), key=2.0)
        try:
            opt.sum_rows(lambda r, w: (torch.zeros(1), torch.zeros(1, opt.n)), key=float(rank))
            raised_sum = ""
        except RuntimeError as e:
            raised_sum = str(e)
        # the filter itself: ξ, J that differ between the ranks (a closure that does not share its rows) refused
        xi, J = torch.full((2,), 0.1 * (rank + 1)), torch.full((2, opt.n), 0.01)
        try:
            opt.step(lambda: (xi, J))
            raised_step = ""
        except RuntimeError as e:
            raised_step = str(e)
        torch.save({"raised": raised, "summed": summed, "raised_sum": raised_sum, "raised_step": raised_step,
                    "step": opt.ekf_state["step"]}, out / f"{name}_r{rank}.pt")
        return
    x, y = regression_data()
    net = mlp()
    kw = dict(KW)
    if name == "blocks":
        kw.update(blocks="tensor", kernel="torch", fading_lambda=0.97, fading_nu=0.99, symmetrize_every=3)
    base = name[: -len("_gloo")] if name.endswith("_gloo") else name
    if base != name:
        kw["comm"] = "torch"  # the exchanges through gloo, not shared memory
    opt = EKF(net.parameters(), shard="rows", label_split=(base == "split"), **kw)
    via_shm = isinstance(opt.process_group, SharedMemoryGroup)
    steps = range(0, 40, 4)
    for k, i in enumerate(steps):
        xb, yb = x[i : i + 4], y[i : i + 4]
        if base == "split":
            opt.step(split_closure(opt, net, xb, yb))
        else:
            opt.step(lambda: (net(xb[rank::world]) - yb[rank::world]).reshape(-1))
        if name == "resume" and k == 4:
            sd = opt.state_dict()  # collective
            if rank == 0:
                torch.save({"sd": sd, "w": [p.detach().clone() for p in net.parameters()]}, out / "resume_sd.pt")
            opt = EKF(net.parameters(), shard="rows", **kw)
            opt.load_state_dict(sd)
    res = {"w": [p.detach().clone() for p in net.parameters()], "P": opt.covariance(), "shm": via_shm,
           "local_bytes": sum(t.numel() * t.element_size() for t in opt.ekf_state["P"])}
    if name == "resume" and (out / "single_sd.pt").exists():  # continue a 1-process checkpoint with W processes
        saved = torch.load(out / "single_sd.pt")
        with torch.no_grad():
            for p, w in zip(net.parameters(), saved["w"]):
                p.copy_(w)
        opt = EKF(net.parameters(), shard="rows", **kw)
        opt.load_state_dict(saved["sd"])
        for i in list(steps)[5:]:
            xb, yb = x[i : i + 4], y[i : i + 4]
            opt.step(lambda: (net(xb[rank::world]) - yb[rank::world]).reshape(-1))
        res["from_single_w"] = [p.detach().clone() for p in net.parameters()]
        res["from_single_P"] = opt.covariance()
    torch.save(res, out / f"{name}_r{rank}.pt")


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name in sys.argv[5:] or ["streams", "split", "blocks", "resume", "mismatch", "streams_gloo", "split_gloo"]:
        run(name, rank, world, out)
    dist.barrier()  # both ranks done before either tears the group down (gloo aborts on a peer that left)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
