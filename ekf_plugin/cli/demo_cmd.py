"""Run the built-in end-to-end example: make a small flexible-water data set with ASE, then train the
Behler-Parrinello network with the Extended Kalman Filter through SchNetPack's own ``spktrain``, with
the Fisher-information callback attached. Takes under a minute on 2 idle CPU cores (24 s measured)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

NAME = "demo"
HELP = "train a small BPNN with EKF on a built-in water example through spktrain"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="where data and runs go (default: runs/demo)")
    parser.add_argument("--frames", type=int, default=60, help="number of generated frames (default: 60)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    parser.add_argument("--optimizer", choices=("ekf", "adam"), default="ekf", help="EKF (default) or the study's Adam baseline")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides passed to spktrain, e.g. trainer.max_steps=50")


def spktrain_command(workdir: Path, source: Path, epochs: int, optimizer: str, overrides: list) -> list:
    """The ``spktrain`` command line the demo runs (printed, so users can rerun or edit it)."""
    spktrain = str(Path(sys.executable).parent / "spktrain")
    return [
        spktrain,
        f"experiment=demo_water_{optimizer}",
        f"data.source={source}",
        f"run.path={workdir / 'runs'}",
        f"run.id={optimizer}",
        f"trainer.max_epochs={epochs}",
        *overrides,
    ]


def run(args: argparse.Namespace) -> int:
    from ..demo import write_demo_extxyz

    workdir = args.workdir.resolve()
    source = write_demo_extxyz(workdir / "data" / "water_demo.extxyz", n_frames=args.frames)
    print(f"[demo] data: {source} ({args.frames} frames of 8 flexible TIP3P waters; Å, eV)")
    cmd = spktrain_command(workdir, source, args.epochs, args.optimizer, args.overrides)
    print("[demo] running:", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rc = subprocess.call(cmd, cwd=workdir, env=env)
    run_dir = workdir / "runs" / args.optimizer
    if rc != 0:
        print(f"[demo] spktrain failed with exit code {rc}; see the log above and {run_dir}", file=sys.stderr)
        return rc
    print(f"[demo] done. Results in {run_dir}:")
    for name in ("best_model", "config.yaml", "fisher", "csv"):
        if (run_dir / name).exists():
            print(f"  {run_dir / name}")
    return 0
