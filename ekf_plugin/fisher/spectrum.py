"""Eigenvalues of the empirical Fisher information of the L1 loss, from per-label Jacobian rows.

With g_i = ∇_w|e_i| = sign(e_i) ∇_w e_i and sign² = 1, the empirical Fisher of N labels is
F = (1/N) Σ_i g_i g_iᵀ = (1/N) JᵀJ, J the (N, n) label Jacobian (rows ∇_w e_i). Its nonzero
eigenvalues equal those of the Gram matrix (1/N) JJᵀ, so the cheaper of the two is used:

* ``"JJt"`` (N ≤ n): keep the rows of J, then ``eigvalsh(J Jᵀ / N)``, an N×N problem; memory N·n.
* ``"JtJ"`` (N > n): accumulate JᵀJ chunk by chunk, then ``eigvalsh(JᵀJ / N)``, an n×n problem;
  memory n² (per label group), independent of N.

Everything is float64. Units: eigenvalues are in (label unit)² per (weight unit)², i.e. eV² for
energy labels (eV²/atom² when energies are per atom) and (eV/Å)² for force labels.

Labels come in two groups, ``energy`` and ``forces``; spectra are returned for each group present
(normalised by the group's own label count) and for ``all`` labels together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

GROUPS = ("energy", "forces")
METHODS = ("auto", "JJt", "JtJ")
STATS = ("log10_median", "log10_mean", "log10_max", "effective_rank", "rank")


def choose_method(n_labels: int, n_weights: int, method: str = "auto") -> str:
    """'JJt' if N ≤ n else 'JtJ' for ``method='auto'``; validates an explicit choice."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "JJt" if n_labels <= n_weights else "JtJ"


def _eigh_desc(mat: torch.Tensor, keep: int) -> np.ndarray:
    """Largest ``keep`` eigenvalues of a symmetric float64 matrix, descending, as numpy."""
    mat = 0.5 * (mat + mat.T)  # (k, k) exact symmetry for eigvalsh
    ev = torch.linalg.eigvalsh(mat)  # (k,) ascending
    return ev.flip(0)[:keep].cpu().numpy()


class GramAccumulator:
    """Collects Jacobian rows of energy and force labels and returns Fisher eigenvalues.

    Args:
        n_weights: n, the number of trainable weights (columns of J).
        n_energy, n_forces: how many rows of each group will be added.
        method: 'auto', 'JJt' or 'JtJ' (see the module docstring).
        device: where the float64 buffers live (default: CPU; pass the model's device).
    """

    def __init__(
        self,
        n_weights: int,
        n_energy: int,
        n_forces: int,
        method: str = "auto",
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        if n_energy + n_forces < 1:
            raise ValueError("need at least one label (n_energy + n_forces >= 1)")
        if n_weights < 1:
            raise ValueError("the model has no trainable weights")
        self.n_weights = int(n_weights)
        self.counts = {"energy": int(n_energy), "forces": int(n_forces)}
        self.method = choose_method(n_energy + n_forces, n_weights, method)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.filled = {g: 0 for g in GROUPS}
        shape = (lambda g: (self.counts[g], n_weights)) if self.method == "JJt" else (lambda g: (n_weights, n_weights))
        self.buf = {
            g: torch.zeros(shape(g), dtype=torch.float64, device=self.device)  # (N_g, n) or (n, n)
            for g in GROUPS
            if self.counts[g] > 0
        }

    @property
    def nbytes(self) -> int:
        """Bytes held by the float64 buffers."""
        return sum(b.numel() * 8 for b in self.buf.values())

    def add(self, rows: torch.Tensor, group: str) -> None:
        """Add Jacobian rows (m, n) of labels of ``group`` ('energy' or 'forces')."""
        if group not in self.buf:
            raise ValueError(f"group must be one of {tuple(self.buf)}, got {group!r}")
        if rows.dim() != 2 or rows.shape[1] != self.n_weights:
            raise ValueError(f"rows must have shape (m, {self.n_weights}), got {tuple(rows.shape)}")
        m = rows.shape[0]
        if self.filled[group] + m > self.counts[group]:
            raise ValueError(f"more {group} rows than announced ({self.counts[group]})")
        r = rows.detach().to(device=self.device, dtype=torch.float64)  # (m, n)
        if self.method == "JJt":
            self.buf[group][self.filled[group] : self.filled[group] + m] = r
        else:
            self.buf[group].addmm_(r.T, r)  # (n, n) += rᵀ r
        self.filled[group] += m

    def eigenvalues(self) -> Dict[str, np.ndarray]:
        """{'all', 'energy'?, 'forces'?: eigenvalues descending}, min(N_g, n) of them per group."""
        for g, b in self.buf.items():
            if self.filled[g] != self.counts[g]:
                raise RuntimeError(f"only {self.filled[g]} of {self.counts[g]} {g} rows were added")
        n = self.n_weights
        n_all = sum(self.counts.values())
        out: Dict[str, np.ndarray] = {}
        if self.method == "JJt":
            J = torch.cat([self.buf[g] for g in GROUPS if g in self.buf], dim=0)  # (N, n)
            G = J @ J.T  # (N, N)
            out["all"] = _eigh_desc(G / n_all, min(n_all, n))
            start = 0
            for g in GROUPS:
                if g in self.buf:
                    k = self.counts[g]
                    out[g] = _eigh_desc(G[start : start + k, start : start + k] / k, min(k, n))  # (k, k) block
                    start += k
        else:
            total = sum(self.buf.values())  # (n, n)
            out["all"] = _eigh_desc(total / n_all, min(n_all, n))
            for g in GROUPS:
                if g in self.buf:
                    out[g] = _eigh_desc(self.buf[g] / self.counts[g], min(self.counts[g], n))
        return out


def rank_tolerance(n_labels: int, n_weights: int, jacobian_dtype: str = "float64") -> float:
    """Relative eigenvalue tolerance: eigenvalues below ``tol · λ_max`` are numerically zero.

    It is NumPy's ``matrix_rank`` rule applied to J (σ_i ≤ σ_max · max(N, n) · ε_J) and squared,
    since λ = σ²/N: with a float32 model, eigenvalues under ~(max(N, n)·1.2e-7)² λ_max are noise.
    """
    eps = float(np.finfo(np.dtype(jacobian_dtype)).eps)
    return (max(n_labels, n_weights) * eps) ** 2


def nonzero(eigenvalues: np.ndarray, rel_tol: float = 0.0) -> np.ndarray:
    """Eigenvalues above ``rel_tol · λ_max`` and above float64 round-off (λ_max · k · ε₆₄)."""
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    if lam.size == 0 or not lam.max() > 0:
        return lam[:0]
    tol = lam.max() * max(rel_tol, lam.size * np.finfo(np.float64).eps)
    return lam[lam > tol]


def summarize(eigenvalues: np.ndarray, rel_tol: float = 0.0) -> Dict[str, float]:
    """Summary scalars of one spectrum (eigenvalues ≥ 0, any order).

    Eigenvalues at or below the tolerance of :func:`nonzero` count as zero. Over the nonzero ones:
    log10 of the median, mean and largest eigenvalue; the numerical ``rank``; ``effective_rank`` =
    exp(−Σ p_i ln p_i) with p_i = λ_i / Σλ (Roy & Vetterli 2007), between 1 and ``rank``.
    """
    pos = np.sort(nonzero(eigenvalues, rel_tol))[::-1]
    if pos.size == 0:
        nan = float("nan")
        return {"log10_median": nan, "log10_mean": nan, "log10_max": nan, "effective_rank": 0.0, "rank": 0.0}
    p = pos / pos.sum()
    return {
        "log10_median": float(np.log10(np.median(pos))),
        "log10_mean": float(np.log10(pos.mean())),
        "log10_max": float(np.log10(pos[0])),
        "effective_rank": float(math.exp(-(p * np.log(p)).sum())),
        "rank": float(pos.size),
    }


@dataclass
class FisherSpectrum:
    """Result of a Fisher computation.

    Attributes:
        eigenvalues: {'all', 'energy', 'forces'} → eigenvalues (descending; units in the module doc).
        n_labels: labels per group.
        n_weights: trainable weights n.
        method: 'JJt' or 'JtJ'.
        seconds: wall time of the computation.
        meta: free-form extras (seed, epoch, model name, energy_per_atom, ...).
    """

    eigenvalues: Dict[str, np.ndarray]
    n_labels: Dict[str, int]
    n_weights: int
    method: str
    seconds: float = 0.0
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def groups(self):
        return tuple(self.eigenvalues)

    def rel_tol(self, group: str = "all") -> float:
        """Relative zero tolerance of a group (:func:`rank_tolerance`, precision of J from ``meta``)."""
        dtype = str(self.meta.get("jacobian_dtype", "float64"))
        return rank_tolerance(self.n_labels.get(group, 1), self.n_weights, dtype)

    def nonzero(self, group: str = "all") -> np.ndarray:
        """The numerically nonzero eigenvalues of a group (descending)."""
        return nonzero(self.eigenvalues[group], self.rel_tol(group))

    def summary(self, group: str = "all") -> Dict[str, float]:
        """Summary scalars of one group (see :func:`summarize`)."""
        if group not in self.eigenvalues:
            raise ValueError(f"no {group!r} labels in this spectrum; groups: {self.groups}")
        return summarize(self.eigenvalues[group], self.rel_tol(group))

    def metrics(self, prefix: str = "fisher") -> Dict[str, float]:
        """Flat scalars: ``{prefix}/{stat}`` for all labels, ``{prefix}/{group}/{stat}`` per group."""
        out: Dict[str, float] = {}
        for g in self.eigenvalues:
            key = prefix if g == "all" else f"{prefix}/{g}"
            for stat, value in self.summary(g).items():
                out[f"{key}/{stat}"] = value
        return out

    def save(self, path: Union[str, Path]) -> Path:
        """Write an ``.npz`` with ``eigenvalues_<group>`` arrays and scalar metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"eigenvalues_{g}": v for g, v in self.eigenvalues.items()}
        arrays.update({f"n_labels_{g}": np.int64(v) for g, v in self.n_labels.items()})
        meta = {f"meta_{k}": np.asarray(v) for k, v in self.meta.items() if v is not None}
        np.savez(path, n_weights=np.int64(self.n_weights), method=np.str_(self.method),
                 seconds=np.float64(self.seconds), **arrays, **meta)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "FisherSpectrum":
        """Read a file written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            eig = {k[len("eigenvalues_"):]: z[k] for k in z.files if k.startswith("eigenvalues_")}
            n_lab = {k[len("n_labels_"):]: int(z[k]) for k in z.files if k.startswith("n_labels_")}
            meta = {k[len("meta_"):]: z[k].item() for k in z.files if k.startswith("meta_")}
            return cls(eig, n_lab, int(z["n_weights"]), str(z["method"]), float(z["seconds"]), meta)
