"""Run the speed benchmarks of a source checkout (``benchmarks/``) and print one table; writes JSON too."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

NAME = "bench"
HELP = "run the benchmarks of a source checkout and print one table (python -m benchmarks)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkout", type=Path, default=Path.cwd(), help="repository root holding benchmarks/")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for python -m benchmarks (--quick, --only, --device, --json)")


def run(args: argparse.Namespace) -> int:
    if not (args.checkout / "benchmarks" / "__main__.py").exists():
        print(f"ekf-plugin bench: no benchmarks/ in {args.checkout} (run it from a source checkout)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.rest], cwd=args.checkout)
