"""Drive an i-PI simulation with a trained model over i-PI's socket protocol.

Start i-PI first (its XML's <ffsocket> names the address), then for example::

    ekf-plugin ipi --model runs/best_model --template init.xyz --unix water

Exit codes: 0 i-PI sent EXIT; 1 bad arguments, template or model file (one line, no traceback);
2 connection lost (or i-PI never came up, or silent for --idle-timeout);
3 protocol error; 4 model error (exception, wrong atom count, non-finite values); 143 SIGTERM.
On 3, 4 and 143 the client drains and closes cleanly, so i-PI re-queues the step for a new client.
"""

from __future__ import annotations

import argparse

NAME = "ipi"
HELP = "run an i-PI socket client (NPT/NVT MD) with a trained model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model: spktrain best_model, exported model or n2p2 directory")
    parser.add_argument("--template", required=True, help="structure file with the species in i-PI's atom order")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="NAME", help="unix socket name (i-PI <address>), path <prefix><NAME>")
    where.add_argument("--host", help="TCP host of i-PI (with --port)")
    parser.add_argument("--port", type=int, help="TCP port of i-PI")
    parser.add_argument("--sockets-prefix", default="/tmp/ipi_", help="unix socket path prefix (i-PI's default)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores - 1, at most 8)")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--cutoff", type=float, default=None, help="neighbor cutoff in Å (default: the model's)")
    parser.add_argument("--reconnect", type=float, default=0.0, metavar="SECONDS",
                        help="after a lost connection keep reconnecting this long while the socket exists")
    parser.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for i-PI's socket at start")
    parser.add_argument("--read-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="a message i-PI started must arrive completely within this time (default 60; 0: no limit)")
    parser.add_argument("--idle-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="give up (exit 2) when i-PI sends nothing for this long (default 0: wait forever)")
    parser.add_argument("--trust-model", action="store_true",
                        help="allow a full unpickle of a best_model that needs classes outside the allow-list: "
                             "this can run code from the file, use it only for files you trust")
    parser.add_argument("--progress", type=float, default=60.0, metavar="SECONDS",
                        help="a progress line on stderr every SECONDS (force calls, calls/s, time left with "
                             "--expected-calls; 0: none; default 60)")
    parser.add_argument("--expected-calls", type=int, default=None, metavar="N",
                        help="force calls the run will take (i-PI's steps + 1 for one bead), for the time left")
    parser.add_argument("--uncertainty-every", type=int, default=0, metavar="N",
                        help="put the EKF energy uncertainty into i-PI's extras every N force calls (0: off; needs "
                             "<model>.cov.pt or --covariance, see docs/uncertainty.md)")
    parser.add_argument("--covariance", default=None, help="covariance file for --uncertainty-every (default <model>.cov.pt)")
    parser.add_argument("--uncertainty-forces", action="store_true",
                        help="also the largest per-atom force uncertainty (3N Jacobian rows per computation: slow)")
    parser.add_argument("--uncertainty-threshold", type=float, default=None, metavar="MEV_PER_ATOM",
                        help="log a warning when the energy uncertainty per atom exceeds this (meV/atom)")


def run(args: argparse.Namespace) -> int:
    if args.host is not None and args.port is None:
        print("ekf-plugin ipi: error: --host needs --port")
        return 1
    if args.uncertainty_every < 0 or (not args.uncertainty_every and (
            args.uncertainty_forces or args.uncertainty_threshold is not None or args.covariance)):
        print("ekf-plugin ipi: error: --covariance, --uncertainty-forces and --uncertainty-threshold need "
              "--uncertainty-every N (N >= 1)")
        return 1
    if args.progress < 0 or (args.expected_calls is not None and args.expected_calls < 1):
        print("ekf-plugin ipi: error: --progress needs SECONDS >= 0 and --expected-calls N >= 1")
        return 1
    from ..md.ipi_client import run_client

    return run_client(
        args.model,
        args.template,
        unix=args.unix,
        host=args.host,
        port=args.port,
        device=args.device,
        threads=args.threads,
        dtype=args.dtype,
        cutoff=args.cutoff,
        sockets_prefix=args.sockets_prefix,
        reconnect=args.reconnect,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout or None,
        idle_timeout=args.idle_timeout or None,
        trust_pickle=args.trust_model,
        uncertainty_every=args.uncertainty_every,
        covariance=args.covariance,
        uncertainty_forces=args.uncertainty_forces,
        uncertainty_threshold=args.uncertainty_threshold,
        progress_every=args.progress or None,
        expected_calls=args.expected_calls,
    )
