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

from . import native_rows
from .feature_derivatives import ColumnTable
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
        self._stacks: List[Tuple[List[nn.Linear], List[bool]]] = []  # per element: linears, whether each act is tanh
        for net in networks.networks:
            linears, acts = _layers(net)
            self.slots.append([(offsets.get(id(m.weight)), offsets.get(id(m.bias))) for m in linears])
            self._stacks.append((linears, [isinstance(a, nn.Tanh) for a in acts]))
        # where the slots tile the row [0, n) (every parameter a network weight, none twice): (element, layer,
        # 0 for ∂W / 1 for ∂b) in row order, so a row is one torch.cat of the pieces (12 fewer ops per element
        # than writing each piece into a zeroed row: ~0.1 ms of a BPNN force update's 1.2 ms of rows)
        pieces = sorted((off, e, l, kind) for e, layer_slots in enumerate(self.slots)
                        for l, pair in enumerate(layer_slots) for kind, off in enumerate(pair) if off is not None)
        sizes = {id(p): p.numel() for p in self.params}
        size_of = {(e, l, kind): sizes[id(m.weight if kind == 0 else m.bias)]
                   for e, (linears, _) in enumerate(self._stacks) for l, m in enumerate(linears) for kind in (0, 1)}
        end = 0
        for off, e, l, kind in pieces:
            end = end + size_of[(e, l, kind)] if off == end else -1
        self._order: Optional[List[Tuple[int, int, int]]] = (
            [(e, l, kind) for _, e, l, kind in pieces] if end == self.n else None)
        # the compiled rows (:mod:`ekf_plugin.bpnn.native_rows`) where they build: the same sums in one loop
        self._layout = native_rows.NetworkLayout(self._stacks, self.slots)
        self.native = True  # False: the torch path (tests compare the two)

    def compiled(self, device: torch.device = torch.device("cpu")) -> bool:
        """Whether rows of features on ``device`` go through the compiled kernel (as far as can be told before a
        call: the kernel still declines networks wider than 256 float32 units or deeper than 8 layers)."""
        return self.native and device.type == "cpu" and self._layout.disjoint and native_rows.rows_module() is not None

    def _module(self, s: torch.Tensor):
        """The compiled row kernel for features s, or None (torch path: off, CUDA, or no compiler)."""
        if not self.native or s.device.type != "cpu":
            return None
        return native_rows.rows_module()

    def _assemble(self, k: int, like: torch.Tensor, grads: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
        """Rows (k, n) from per element e the per-layer (∂W (k, out, in), ∂b (k, out)); elements absent from
        ``grads`` (no atoms of theirs) get zero columns."""
        if self._order is None:
            rows = like.new_zeros(k, self.n)  # (k, n)
            for e, g in grads.items():
                self._put(rows, e, g)
            return rows
        parts = []
        for e, l, kind in self._order:
            g = grads.get(e)
            if g is None:
                m = self._stacks[e][0][l]
                parts.append(like.new_zeros(k, (m.weight if kind == 0 else m.bias).numel()))
            else:
                parts.append(g[l][kind].reshape(k, -1))
        return torch.cat(parts, 1)  # (k, n)

    def _put(self, rows: torch.Tensor, e: int, grads: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write per-layer (∂W (k, out, in), ∂b (k, out)) of element e into rows (k, n)."""
        for (ow, ob), (gw, gb) in zip(self.slots[e], grads):
            if ow is not None:
                rows[:, ow : ow + gw[0].numel()] += gw.reshape(gw.shape[0], -1)
            if ob is not None:
                rows[:, ob : ob + gb[0].numel()] += gb

    def _forward(self, e: int, x: torch.Tensor):
        """Hidden states of element e's network for inputs x (N_e, W_e): lists h (N_e, H_l), σ', σ''/σ'."""
        linears, tanh = self._stacks[e]
        hs, d1, d2 = [x], [], []
        for lin, is_tanh in zip(linears[:-1], tanh):
            z = torch.nn.functional.linear(hs[-1], lin.weight, lin.bias)  # (N_e, H_l)
            if is_tanh:
                h = torch.tanh(z)
                hs.append(h), d1.append(1.0 - h * h), d2.append(-2.0 * h)
            else:
                hs.append(z), d1.append(torch.ones_like(z)), d2.append(torch.zeros_like(z))
        return linears, hs, d1, d2

    @torch.no_grad()
    def energy(self, s: torch.Tensor, species: torch.Tensor, share: Tuple[int, int] = (0, 1)
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Energy (1,) in eV and its row (1, n) for one structure with scaled features s (N, W).

        ``share`` = (r, W): only the element networks e with e % W == r (and the atom energies for r = 0), zero
        columns elsewhere; the W shares sum to the whole energy and row (one process each, see
        :func:`ekf_plugin.optim.sharded.sum_rows`)."""
        nets = self.networks
        r, world = share
        module = self._module(s)
        if module is not None:
            got = native_rows.energy_rows(module, self._layout, s, species, share, float(nets.energy_scale),
                                          nets.atom_energy if r == 0 else None, self.n)
            if got is not None:
                return got  # (1,), (1, n)
        scale = nets.energy_scale.to(s.dtype)
        atom_energy = nets.atom_energy.to(s.dtype)
        # (1,) eV: the atom energies count once, in share 0
        energy = atom_energy[species].sum().reshape(1) if r == 0 else atom_energy.new_zeros(1)
        per_element = {}
        for e, n_in in enumerate(nets.n_in):
            if e % world != r:
                continue
            idx = torch.nonzero(species == e).squeeze(-1)  # (N_e,)
            if not idx.numel():
                continue
            linears, hs, d1, _ = self._forward(e, s.index_select(0, idx)[:, :n_in])
            out = linears[-1]
            energy = energy + scale * (hs[-1] @ out.weight[0] + out.bias[0]).sum()  # (1,)
            grads = [None] * len(linears)
            grads[-1] = (scale * hs[-1].sum(0)[None, None, :], scale * hs[-1].new_full((1, 1), float(idx.numel())))
            delta = out.weight[0][None, :] * d1[-1] if d1 else None  # (N_e, H_L)
            for l in range(len(linears) - 2, -1, -1):
                grads[l] = (scale * (delta.T @ hs[l])[None], scale * delta.sum(0)[None])  # (1, H_l, H_{l−1}), (1, H_l)
                if l:
                    delta = (delta @ linears[l].weight) * d1[l - 1]  # (N_e, H_{l−1})
            per_element[e] = grads
        return energy, self._assemble(1, s, per_element)  # (1,), (1, n)

    @torch.no_grad()
    def force_values(self, s: torch.Tensor, species: torch.Tensor, columns) -> torch.Tensor:
        """The force components (k,) in eV/Å of :meth:`forces` without their rows (compiled: by reverse mode, each
        atom's energy gradient dotted with its columns, :meth:`forces`' values to round-off; else :meth:`forces`'
        values)."""
        module = self._module(s)
        if module is not None:
            got = native_rows.force_values(module, self._layout, s, species, columns, float(self.networks.energy_scale))
            if got is not None:
                return got  # (k,)
        return self.forces(s, species, columns)[0]  # (k,)

    @torch.no_grad()
    def forces(
        self, s: torch.Tensor, species: torch.Tensor, columns: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Force components (k,) in eV/Å and their rows (k, n) for scaled features s (N, W) and columns
        ``columns`` (k, N, W) = ∂s/∂r_{a_k,α_k} (per Å) of one structure: a tensor, or a
        :class:`~ekf_plugin.bpnn.feature_derivatives.ColumnTable` in the networks' element order."""
        nets = self.networks
        k = columns.shape[0]
        module = self._module(s)
        if module is not None:
            got = native_rows.force_rows(module, self._layout, s, species, columns, float(nets.energy_scale), self.n)
            if got is not None:
                return got  # (k,), (k, n)
        if isinstance(columns, ColumnTable):
            columns = columns.to(s.dtype).dense()  # (k, N, W)
        scale = nets.energy_scale.to(s.dtype)
        force = s.new_zeros(k)  # (k,)
        per_element = {}
        for e, w_in in enumerate(nets.n_in):
            idx = torch.nonzero(species == e).squeeze(-1)  # (N_e,)
            if not idx.numel():
                continue
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
            per_element[e] = grads
        return force, self._assemble(k, s, per_element)  # (k,), (k, n)
