"""List every registered component (representations, optimizers, callbacks, MD drivers, config
directories) with the plugin and distribution that provided it."""

from __future__ import annotations

import argparse
import json

NAME = "list"
HELP = "list registered components and the distributions that provide them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from ..plugins import KINDS, components

    comps = components()
    if args.json:
        print(json.dumps([c.__dict__ for c in comps], indent=2))
        return 0
    for kind in KINDS:
        rows = [c for c in comps if c.kind == kind]
        print(f"{kind}:")
        if not rows:
            print("  (none)")
        for c in rows:
            print(f"  {c.name:<14} {c.target:<45} [{c.distribution}]  {c.description}")
    return 0
