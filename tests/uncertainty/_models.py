"""Small models with a covariance for the uncertainty tests (float64, Å/eV)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ekf_plugin.models import water_bpnn
from ekf_plugin.uncertainty import Covariance
from tests.bpnn._systems import randomise_scaling


def tiny_bpnn(seed: int = 3, hidden: Sequence[int] = (5, 4)):
    """Water BPNN with small tanh networks and a non-trivial scaling."""
    model = water_bpnn(dtype=torch.float64, stress=False, seed=seed, n_hidden=hidden, energy_scale=0.37,
                       atom_energies={"H": -1.3, "O": -7.0})
    randomise_scaling(model, seed)
    return model


def random_covariance(model: torch.nn.Module, blocks: Optional[Sequence[int]] = None, seed: int = 0,
                      label_weights=None, noise: float = 1.0) -> Covariance:
    """A random symmetric positive definite P over ``model``'s parameters (in named_parameters order), split
    into consecutive blocks of the given sizes (default: one dense block)."""
    named = list(model.named_parameters())
    n = sum(p.numel() for _, p in named)
    sizes = list(blocks) if blocks else [n]
    assert sum(sizes) == n
    g = torch.Generator().manual_seed(seed)
    P, bounds, pos = [], [], 0
    for s in sizes:
        A = torch.randn(s, s, generator=g, dtype=torch.float64)
        P.append(A @ A.T / s + 0.1 * torch.eye(s, dtype=torch.float64))
        bounds.append((pos, pos + s))
        pos += s
    w = torch.cat([p.detach().reshape(-1).double() for _, p in named])
    return Covariance(P, bounds, [k for k, _ in named], [tuple(p.shape) for _, p in named], w, noise, label_weights,
                      step=5, source="test")
