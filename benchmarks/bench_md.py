"""i-PI round trip of the BPNN MD step: ``ekf-plugin ipi`` with the n2p2 RPBE-D3 potential, 192-atom water, NPT.

For float64 and float32: the client's own cycle time per force call after the first (which compiles the
step's kernels) — model step + socket + i-PI's work until the next request — against the model step of a
``ModelEvaluator`` in this process on the same structure (median over MD-like moves), and the share of
socket + i-PI (target ≤ 10 %). See :func:`benchmarks.bench_ipi.client_round_trip`.

    python -m benchmarks --only md [--quick]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def run(quick: bool = False) -> dict:
    from benchmarks.bench_ipi import N2P2, client_round_trip, start_structure

    if not N2P2.exists():
        return {"skipped": f"needs {N2P2}"}
    out = {"load_average_start": os.getloadavg()[0], "npt_steps": 60 if quick else 200}
    with tempfile.TemporaryDirectory(prefix="bench_md_") as tmp:
        numbers, positions, cell, source = start_structure(Path(tmp) / "init.xyz")
        out["structure"] = f"{len(numbers)} atoms, {source}"
        for dtype in ("float64", "float32"):
            out.update(client_round_trip(Path(tmp), N2P2, out["npt_steps"], numbers, positions, cell, dtype))
    out["load_average_end"] = os.getloadavg()[0]
    return out
