"""Small deterministic models and data shared by the EKF tests and the multistream worker."""

from __future__ import annotations

import torch


def mlp(seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    """3-4-2 tanh MLP (n = 3·4 + 4 + 4·2 + 2 = 26 weights)."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=dtype))
    return net


def regression_data(n: int = 40, seed: int = 1, dtype=torch.float64):
    """Inputs (n, 3) and targets (n, 2) of a smooth function."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    y = torch.stack([torch.sin(x[:, 0]) + 0.5 * x[:, 1], torch.cos(x[:, 2]) * x[:, 0]], dim=1)
    return x, y
