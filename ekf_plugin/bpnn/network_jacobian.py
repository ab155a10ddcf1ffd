"""Closed-form label Jacobians of the element networks: energy and force rows without autograd.

For an EKF update the filter needs, per label, the row ∂label/∂θ over all network weights θ. With the
scaled symmetry functions s (N, W) cached and the columns c = ∂s/∂r_{a,α} (k, N, W) given, both labels
are functions of the element networks alone (see :mod:`ekf_plugin.bpnn.label_predictor`):

    E   = Σ_i [ scale · NN_{e(i)}(s_i) + atom_energy_{e(i)} ]                      (eV)
    F_k = −scale · Σ_i ∇_s NN_{e(i)}(s_i) · c_{k,i}                                (eV/Å)

For a feed-forward network (hidden layers z_l = h_{l−1} W_lᵀ + b_l, h_l = σ(z_l), output y = h_L w + b)
this module writes the rows out by hand:

* energy: one backward sweep, δ_L = w ∘ σ'(z_L), δ_{l−1} = (δ_l W_l) ∘ σ'(z_{l−1});
  ∂E/∂W_l = scale Σ_i δ_lᵀ h_{l−1}, ∂E/∂b_l = scale Σ_i δ_l, ∂E/∂w = scale Σ_i h_L, ∂E/∂b = scale N_e;
* force: the forward tangent t_0 = c, t_l = σ'(z_l) ∘ (t_{l−1} W_lᵀ) (so F_k = −scale Σ_i t_L · w) and
  its reverse sweep; with z̄_l = δ_l ∘ (t_{l−1}W_lᵀ) ∘ σ''(z_l)/σ'(z_l) + h̄_l ∘ σ'(z_l), h̄_{l−1} = z̄_l W_l:
  ∂F/∂W_l = −scale Σ_i (δ_lᵀ t_{l−1} + z̄_lᵀ h_{l−1}), ∂F/∂b_l = −scale Σ_i z̄_l, ∂F/∂w = −scale Σ_i t_L.

All labels of a structure are one batched computation (k, N, H); no autograd graph is built. Supported
activations: tanh (σ' = 1 − h², σ'' = −2hσ') and linear; :func:`supports_closed_form` says whether a
model qualifies. Values equal autograd's to round-off (tests, float64).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .networks import ElementNetworks

__all__ = ["NetworkJacobians", "supports_closed_form"]

_ACTIVATIONS = (nn.Tanh, nn.Identity)


def _layers(net: nn.Sequential) -> Optional[Tuple[List[nn.Linear], List[nn.Module]]]:
    """(linears, activations) of a Linear/activation…/Linear stack, or None if it is not one."""
    mods = list(net)
    if len(mods) < 1 or len(mods) % 2 != 1:
        return None
    linears, acts = mods[0::2], mods[1::2]
    if not all(isinstance(m, nn.Linear) for m in linears) or not all(isinstance(a, _ACTIVATIONS) for a in acts):
        return None
    if linears[-1].out_features != 1:
        return None
    return linears, acts


def supports_closed_form(networks: nn.Module) -> bool:
    """True for :class:`ElementNetworks` whose networks are tanh/linear stacks with one output."""
    return isinstance(networks, ElementNetworks) and all(_layers(n) is not None for n in networks.networks)


def _act(a: nn.Module, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, σ'(z), σ''(z)/σ'(z)) for the activation ``a``; same shape as z."""
    if isinstance(a, nn.Tanh):
        h = torch.tanh(z)
        return h, 1.0 - h * h, -2.0 * h
    return z, torch.ones_like(z), torch.zeros_like(z)


class NetworkJacobians:
    """Energy and force-label rows of :class:`ElementNetworks` in the column order of ``params``.

    Args:
        networks: the element networks (see :func:`supports_closed_form`).
        params: the flat parameter order of the rows (e.g. ``EKF.params``); parameters that are not
            network weights get zero columns.
    """

    def __init__(self, networks: ElementNetworks, params: Sequence[torch.Tensor]) -> None:
        if not supports_closed_form(networks):
            raise TypeError("closed-form Jacobians need ElementNetworks of tanh/linear Linear stacks")
        self.networks = networks
        self.params = list(params)
        offsets: Dict[int, int] = {}
        off = 0
        for p in self.params:
            offsets[id(p)] = off
            off += p.numel()
        self.n = off
        # per element: per layer (offset of W or None, offset of b or None)
        self.slots: List[List[Tuple[Optional[int], Optional[int]]]] = []
        for net in networks.networks:
            linears, _ = _layers(net)
            self.slots.append([(offsets.get(id(m.weight)), offsets.get(id(m.bias))) for m in linears])

    def _put(self, rows: torch.Tensor, e: int, grads: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write per-layer (∂W (k, out, in), ∂b (k, out)) of element e into rows (k, n)."""
        for (ow, ob), (gw, gb) in zip(self.slots[e], grads):
            if ow is not None:
                rows[:, ow : ow + gw[0].numel()] += gw.reshape(gw.shape[0], -1)
            if ob is not None:
                rows[:, ob : ob + gb[0].numel()] += gb

    def _forward(self, e: int, x: torch.Tensor):
        """Hidden states of element e's network for inputs x (N_e, W_e): lists h (N_e, H_l), σ', σ''/σ'."""
        linears, acts = _layers(self.networks.networks[e])
        hs, d1, d2 = [x], [], []
        for lin, act in zip(linears[:-1], acts):
            h, s1, s2 = _act(act, torch.nn.functional.linear(hs[-1], lin.weight, lin.bias))  # (N_e, H_l)
            hs.append(h), d1.append(s1), d2.append(s2)
        return linears, hs, d1, d2

    @torch.no_grad()
    def energy(self, s: torch.Tensor, species: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Energy (1,) in eV and its row (1, n) for one structure with scaled features s (N, W)."""
        nets = self.networks
        scale = nets.energy_scale.to(s.dtype)
        energy = nets.atom_energy.to(s.dtype)[species].sum().reshape(1)  # (1,) eV
        row = s.new_zeros(1, self.n)  # (1, n)
        for e in range(len(nets.networks)):
            idx = torch.nonzero(species == e).squeeze(-1)  # (N_e,)
            if not idx.numel():
                continue
            linears, hs, d1, _ = self._forward(e, s.index_select(0, idx)[:, : nets.n_in[e]])
            out = linears[-1]
            energy = energy + scale * (hs[-1] @ out.weight[0] + out.bias[0]).sum()  # (1,)
            grads = [None] * len(linears)
            grads[-1] = (scale * hs[-1].sum(0)[None, None, :], scale * hs[-1].new_full((1, 1), float(idx.numel())))
            delta = out.weight[0][None, :] * d1[-1] if d1 else None  # (N_e, H_L)
            for l in range(len(linears) - 2, -1, -1):
                grads[l] = (scale * (delta.T @ hs[l])[None], scale * delta.sum(0)[None])  # (1, H_l, H_{l−1}), (1, H_l)
                if l:
                    delta = (delta @ linears[l].weight) * d1[l - 1]  # (N_e, H_{l−1})
            self._put(row, e, grads)
        return energy, row

    @torch.no_grad()
    def forces(
        self, s: torch.Tensor, species: torch.Tensor, columns: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Force components (k,) in eV/Å and their rows (k, n) for scaled features s (N, W) and columns
        ``columns`` (k, N, W) = ∂s/∂r_{a_k,α_k} (per Å) of one structure."""
        nets = self.networks
        k = columns.shape[0]
        scale = nets.energy_scale.to(s.dtype)
        force = s.new_zeros(k)  # (k,)
        rows = s.new_zeros(k, self.n)  # (k, n)
        for e in range(len(nets.networks)):
            idx = torch.nonzero(species == e).squeeze(-1)  # (N_e,)
            if not idx.numel():
                continue
            w_in = nets.n_in[e]
            linears, hs, d1, d2 = self._forward(e, s.index_select(0, idx)[:, :w_in])
            out = linears[-1]
            L = len(linears) - 1  # hidden layers
            ts = [columns.index_select(1, idx)[:, :, :w_in]]  # t_0 (k, N_e, W_e)
            dzs = []
            for l in range(L):
                dz = ts[-1] @ linears[l].weight.T  # (k, N_e, H_l) tangent of z_l
                dzs.append(dz)
                ts.append(d1[l] * dz)  # (k, N_e, H_l)
            force = force - scale * (ts[-1] @ out.weight[0]).sum(1)  # (k,)
            grads = [None] * len(linears)
            grads[-1] = (-scale * ts[-1].sum(1)[:, None, :], s.new_zeros(k, 1))  # (k, 1, H_L), (k, 1)
            delta = out.weight[0][None, :] * d1[-1] if L else None  # (N_e, H_L) = t̄_L ∘ σ'(z_L)
            hbar = None  # (k, N_e, H_l) adjoint of h_l through the z of later layers
            for l in range(L - 1, -1, -1):
                zbar = delta * dzs[l] * d2[l]  # (k, N_e, H_l): from σ'(z_l) in t_l
                if hbar is not None:
                    zbar = zbar + hbar * d1[l]
                # (k, H_l, H_{l−1}) = Σ_n δ_nh t_knj + z̄_knh h_nj (matmul, not einsum: 107 against 177 µs here)
                gw = torch.matmul(delta.T, ts[l]) + torch.matmul(zbar.transpose(1, 2), hs[l])
                grads[l] = (-scale * gw, -scale * zbar.sum(1))  # (k, H_l, H_{l−1}), (k, H_l)
                if l:
                    hbar = zbar @ linears[l].weight  # (k, N_e, H_{l−1})
                    delta = (delta @ linears[l].weight) * d1[l - 1]  # (N_e, H_{l−1})
            self._put(rows, e, grads)
        return force, rows
