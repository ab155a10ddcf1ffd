"""The ``ekf-plugin`` console script.

Sub-commands live in ``ekf_plugin/cli/<name>_cmd.py`` modules, each with ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; they are found automatically, and each imports
its heavy dependencies (torch, schnetpack, ipi) inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import List, Optional

from ..__about__ import __version__


def default_model_name(path: Path) -> str:
    """A model's name in tables and plots: the run folder's name for spktrain's ``best_model``/
    ``best_model_fisher`` (every run has one), the file stem for a file, the folder name for a folder (n2p2)."""
    path = Path(path)
    if path.name.startswith("best_model"):
        return path.resolve().parent.name
    return path.stem if path.is_file() else path.name


def _command_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.endswith("_cmd"):
            yield importlib.import_module(f"{__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ekf-plugin",
        description="EKF training, Behler-Parrinello potentials, Fisher spectra and i-PI MD for SchNetPack.",
    )
    parser.add_argument("--version", action="version", version=f"ekf-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip())
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
