"""Plot density (and volume, temperature) vs time from i-PI's properties file as a PNG.

    python plot_density.py [npt.out] [--out density.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ekf_plugin.md.runner import read_properties  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("properties", nargs="?", type=Path, default=Path("npt.out"))
    p.add_argument("--out", type=Path, default=Path("density.png"))
    args = p.parse_args()
    props = read_properties(args.properties)
    t = props["time"]  # ps
    fig, axes = plt.subplots(2, 1, sharex=True, figsize=(6, 5))
    axes[0].plot(t, props["density"], lw=1)
    axes[0].set_ylabel("density / (g/cm³)")
    axes[1].plot(t, props["temperature"], lw=1, color="C1")
    axes[1].set_ylabel("T / K")
    axes[1].set_xlabel("time / ps")
    half = len(t) // 2
    mean = props["density"][half:].mean()
    axes[0].set_title(f"NPT water, mean density over the second half: {mean:.3f} g/cm³")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({len(t)} points, {t[-1]:.3f} ps; mean density of 2nd half {mean:.3f} g/cm³)")


if __name__ == "__main__":
    main()
