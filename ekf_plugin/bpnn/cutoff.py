"""Cutoff functions f_c(r) of the Behler-Parrinello symmetry functions (n2p2's numbering).

All take distances in the model's length unit (Å inside SchNetPack models) and return values in
[0, 1] that vanish, with their first derivative, at ``r = cutoff`` (except ``hard``/``cos``'s
second derivative). ``x = (r - alpha * rc) / (rc - alpha * rc)`` is the reduced distance of the
"core" types; below the inner radius ``alpha * rc`` they are 1.

==== ========= ==============================================================
n2p2 name      f_c
==== ========= ==============================================================
0    hard      1
1    cos       (cos(pi x) + 1) / 2
2    tanhu     tanh^3(1 - r/rc)                     (the study, Eq. S3)
3    tanh      tanh^3(1 - r/rc) / tanh^3(1)         (PiNN's ``f2``)
4    exp       exp(1 - 1 / (1 - x^2))
5    poly1     (2x - 3) x^2 + 1
6    poly2     ((15 - 6x) x - 10) x^3 + 1
7    poly3     (x (x (20x - 70) + 84) - 35) x^4 + 1
8    poly4     (x (x ((315 - 70x) x - 540) + 420) - 126) x^5 + 1
==== ========= ==============================================================
"""

from __future__ import annotations

import math

import torch
from torch import nn

CUTOFF_TYPES = {0: "hard", 1: "cos", 2: "tanhu", 3: "tanh", 4: "exp", 5: "poly1", 6: "poly2", 7: "poly3", 8: "poly4"}
_NAMES = {v: k for k, v in CUTOFF_TYPES.items()}


def cutoff_name(kind) -> str:
    """Normalise an n2p2 type number or a name (``2`` / ``"tanhu"``) to the name."""
    if isinstance(kind, str) and kind in _NAMES:
        return kind
    try:
        return CUTOFF_TYPES[int(kind)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"unknown cutoff type {kind!r}; expected one of {sorted(_NAMES)} or 0-8") from None


class CutoffFunction(nn.Module):
    """f_c(r) for r in the model's length unit; ``cutoff`` is a tensor buffer (same unit).

    Args:
        cutoff: r_c (> 0), length unit of the model (Å).
        kind: ``"tanhu"`` (default, the study), any name of the table above, or its n2p2 number.
        alpha: inner radius as a fraction of r_c for the core types (n2p2 ``cutoff_type t alpha``).
    """

    def __init__(self, cutoff: float, kind="tanhu", alpha: float = 0.0) -> None:
        super().__init__()
        if not cutoff > 0:
            raise ValueError(f"cutoff must be > 0, got {cutoff}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.kind = cutoff_name(kind)
        self.alpha = float(alpha)
        self.register_buffer("cutoff", torch.tensor(float(cutoff), dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, cutoff={float(self.cutoff):.6g}, alpha={self.alpha}"

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """f_c(r), same shape as ``r``; 0 for r >= r_c."""
        rc = self.cutoff.to(r.dtype)
        inside = r < rc
        kind = self.kind
        if kind == "tanhu" or kind == "tanh":
            t = torch.tanh(1.0 - r / rc)
            f = t * t * t
            if kind == "tanh":
                f = f / math.tanh(1.0) ** 3
        elif kind == "hard":
            f = torch.ones_like(r)
        else:
            rci = rc * self.alpha
            x = ((r - rci) / (rc - rci)).clamp(0.0, 1.0)
            if kind == "cos":
                f = 0.5 * (torch.cos(math.pi * x) + 1.0)
            elif kind == "exp":
                xs = x.clamp(max=1.0 - 1e-7)
                f = torch.exp(1.0 - 1.0 / (1.0 - xs * xs))
            elif kind == "poly1":
                f = (2.0 * x - 3.0) * x * x + 1.0
            elif kind == "poly2":
                f = ((15.0 - 6.0 * x) * x - 10.0) * x * x * x + 1.0
            elif kind == "poly3":
                f = (x * (x * (20.0 * x - 70.0) + 84.0) - 35.0) * x**4 + 1.0
            else:  # poly4
                f = (x * (x * ((315.0 - 70.0 * x) * x - 540.0) + 420.0) - 126.0) * x**5 + 1.0
        return torch.where(inside, f, torch.zeros_like(f))

    def value_and_derivative(self, r: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """(f_c(r), df_c/dr) analytically (no graph), same shape as ``r``; both 0 for r >= r_c.

        Used by the fast angular path's hand-written backward; agrees with autograd of :meth:`forward`.
        """
        rc = self.cutoff.to(r.dtype)
        inside = r < rc
        kind = self.kind
        if kind in ("tanhu", "tanh"):
            t = torch.tanh(1.0 - r / rc)
            t2 = t * t
            f, df = t2 * t, 3.0 * t2 * (t2 - 1.0) / rc
            if kind == "tanh":
                k = 1.0 / math.tanh(1.0) ** 3
                f, df = f * k, df * k
        elif kind == "hard":
            f, df = torch.ones_like(r), torch.zeros_like(r)
        else:
            rci = rc * self.alpha
            iw = 1.0 / (rc - rci)
            below = r < rci
            x = ((r - rci) * iw).clamp(0.0, 1.0)
            if kind == "cos":
                f, df = 0.5 * (torch.cos(math.pi * x) + 1.0), -0.5 * math.pi * torch.sin(math.pi * x)
            elif kind == "exp":
                xs = x.clamp(max=1.0 - 1e-7)
                q = 1.0 - xs * xs
                f = torch.exp(1.0 - 1.0 / q)
                df = -2.0 * xs / (q * q) * f
            elif kind == "poly1":
                f, df = (2.0 * x - 3.0) * x * x + 1.0, x * (6.0 * x - 6.0)
            elif kind == "poly2":
                f, df = ((15.0 - 6.0 * x) * x - 10.0) * x**3 + 1.0, x * x * ((60.0 - 30.0 * x) * x - 30.0)
            elif kind == "poly3":
                f = (x * (x * (20.0 * x - 70.0) + 84.0) - 35.0) * x**4 + 1.0
                df = x**3 * (x * (x * (140.0 * x - 420.0) + 420.0) - 140.0)
            else:  # poly4
                f = (x * (x * ((315.0 - 70.0 * x) * x - 540.0) + 420.0) - 126.0) * x**5 + 1.0
                df = x**4 * (x * (x * ((2520.0 - 630.0 * x) * x - 3780.0) + 2520.0) - 630.0)
            df = torch.where(below, torch.zeros_like(df), df * iw)
        zero = torch.zeros_like(f)
        return torch.where(inside, f, zero), torch.where(inside, df, zero)
