"""Histogram plots of Fisher spectra on a log-scale eigenvalue axis (the study's Fig. 9), with the
non-interactive Agg backend (safe on headless machines and inside training)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np

from .spectrum import FisherSpectrum, nonzero


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps a backend already chosen by the user
    import matplotlib.pyplot as plt

    return plt


def log_bins(spectra: Sequence[np.ndarray], n_bins: int = 40) -> np.ndarray:
    """Common log10-spaced bin edges (eigenvalue units) covering the given (nonzero) eigenvalues."""
    logs = [np.log10(nonzero(s)) for s in spectra]
    logs = [x for x in logs if x.size]
    if not logs:
        return np.logspace(-1, 1, n_bins + 1)
    lo, hi = min(x.min() for x in logs), max(x.max() for x in logs)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    return np.logspace(lo, hi, n_bins + 1)


def plot_spectra(
    curves: Dict[str, np.ndarray],
    path: Union[str, Path],
    title: str = "",
    xlabel: str = r"eigenvalue $\lambda_I$ of the L1 Fisher information",
    n_bins: int = 40,
) -> Path:
    """Overlay of eigenvalue distributions: one step histogram (density in log10 λ) per named curve.

    Pass numerically nonzero eigenvalues (``FisherSpectrum.nonzero(group)``); zeros are dropped.
    """
    plt = _pyplot()
    bins = log_bins(list(curves.values()), n_bins)
    width = np.diff(np.log10(bins))  # (n_bins,) bin widths in decades
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name, lam in curves.items():
        pos = nonzero(lam)
        counts, _ = np.histogram(pos, bins=bins)
        density = counts / max(pos.size, 1) / width  # fraction per decade
        ax.stairs(density, bins, label=f"{name} ({pos.size} nonzero)", linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of eigenvalues per decade")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_spectrum(spectrum: FisherSpectrum, path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Histogram of one spectrum, one curve per label group ('all', 'energy', 'forces')."""
    curves = {f"{g} ({spectrum.n_labels.get(g, '?')} labels)": spectrum.nonzero(g) for g in spectrum.eigenvalues}
    return plot_spectra(curves, path, title=title or f"Fisher spectrum, {spectrum.n_weights} weights")
