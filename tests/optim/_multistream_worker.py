"""One process of the 2-process gloo multistream test: ``python _multistream_worker.py RANK WORLD PORT OUT``.

Rank r contributes rows r, r + WORLD, ... of each update's labels; weights are saved to OUT.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ekf_models import mlp, regression_data  # noqa: E402

from ekf_plugin.optim import EKF  # noqa: E402


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = mlp()
    x, y = regression_data()
    opt = EKF(net.parameters(), lr=0.5, q=1e-4)
    for i in range(0, 40, 4):
        xb, yb = x[i : i + 4][rank::world], y[i : i + 4][rank::world]  # this stream's structures
        opt.step(lambda: (net(xb) - yb).reshape(-1))
    torch.save({"w": [p.detach().clone() for p in net.parameters()], "P": opt.covariance()}, out)
    dist.barrier()  # both ranks done before either tears the group down (gloo aborts on a peer that left)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
