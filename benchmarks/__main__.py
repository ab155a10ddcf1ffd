"""Run every benchmark and print one table; also write it as JSON.

    python -m benchmarks [--quick] [--only bpnn,ekf] [--json benchmarks/results.json] [--device cuda]

With ``--only`` the named entries of an existing JSON file are replaced and the others kept.

Each ``benchmarks/bench_<name>.py`` exposes ``run(quick: bool = False, device: str | None = None) -> dict`` of
headline figures (name -> number, with the unit in the name).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import sys
import time
from pathlib import Path

ORDER = ("bpnn", "md", "ekf", "fisher", "ipi")


def _available():
    here = Path(__file__).parent
    found = [p.stem[len("bench_"):] for p in sorted(here.glob("bench_*.py"))]
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def _machine(device: str | None) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": device or "cpu",
    }
    if device and device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (for smoke tests)")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(_available()))
    parser.add_argument("--device", default=None, help="torch device for benchmarks that take one (default: cpu)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results.json"), help="where to write the table")
    args = parser.parse_args(argv)
    names = [n for n in _available() if not args.only or n in args.only.split(",")]
    table, errors = {}, {}
    for name in names:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        kwargs = {"quick": args.quick}
        if "device" in inspect.signature(mod.run).parameters:
            kwargs["device"] = args.device
        t0 = time.perf_counter()
        try:
            figures = mod.run(**kwargs)
        except Exception as exc:  # one broken benchmark must not hide the others
            errors[name] = repr(exc)
            print(f"[bench] {name}: FAILED {exc!r}", file=sys.stderr)
            continue
        table[name] = figures
        print(f"[bench] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    width = max((len(k) for f in table.values() for k in f), default=10)
    print(f"\n{'benchmark':<8} {'figure':<{width}} value")
    for name, figures in table.items():
        for key, value in figures.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            print(f"{name:<8} {key:<{width}} {shown}")
    result = {"machine": _machine(args.device), "results": table, "errors": errors}
    if args.only and args.json.exists():  # a subset updates its own entries and keeps the others
        try:
            old = json.loads(args.json.read_text())
        except ValueError:
            old = {}
        merged = dict(old.get("results", {}), **table)
        result = {"machine": _machine(args.device), "results": merged,
                  "errors": {k: v for k, v in dict(old.get("errors", {}), **errors).items() if k not in table}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
