"""Element-specific feed-forward networks: atomic energies summed to the total energy.

``ElementNetworks`` is a SchNetPack output module (like ``schnetpack.atomistic.Atomwise``): it reads
``scalar_representation`` (N, n_atom_basis) and ``_atomic_numbers``, runs atom i through the network
of its element (first ``n_features[e]`` inputs), and writes ``energy`` (B,) in eV:

    E = Σ_i [ energy_scale · NN_{e(i)}(G_i) + atom_energy[e(i)] ].

The study: 2 hidden layers × 25, tanh, linear output, Xavier initialisation (PiNN) or Nguyen–Widrow
(RuNNer). ``atom_energy`` (eV per atom of each element) is fitted by least squares on the training
energies before training when run through ``spktrain`` (``datamodule``), unless given.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

import ekf_plugin.compat  # noqa: F401
import schnetpack.properties as props
from schnetpack.transform import Transform

from .presets import element_symbol
from .representation import species_of, species_table

ACTIVATIONS = {"tanh": nn.Tanh, "t": nn.Tanh, "linear": nn.Identity, "l": nn.Identity,
               "sigmoid": nn.Sigmoid, "s": nn.Sigmoid, "softplus": nn.Softplus, "p": nn.Softplus}


def mlp(n_in: int, n_hidden: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """Linear/activation stack n_in → n_hidden... → 1, linear output."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    layers = []
    sizes = [n_in, *n_hidden]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(sizes[-1], 1))
    return nn.Sequential(*layers)


def xavier_init(net: nn.Sequential, generator: Optional[torch.Generator] = None) -> None:
    """Glorot-uniform weights, zero biases (PiNN/TensorFlow default)."""
    for m in net:
        if isinstance(m, nn.Linear):
            bound = math.sqrt(6.0 / (m.in_features + m.out_features))
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.zero_()


def nguyen_widrow_init(net: nn.Sequential, generator: Optional[torch.Generator] = None) -> None:
    """Nguyen–Widrow (1990) for the hidden layers: β = 0.7 H^(1/n_in); each neuron's weight vector
    rescaled to norm β, biases uniform in [−β, β]. Output layer uniform in ±1/√n_in, zero bias."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m in linears[:-1]:
            beta = 0.7 * m.out_features ** (1.0 / m.in_features)
            m.weight.uniform_(-1.0, 1.0, generator=generator)
            m.weight.mul_(beta / m.weight.norm(dim=1, keepdim=True))
            m.bias.uniform_(-beta, beta, generator=generator)
        out = linears[-1]
        bound = 1.0 / math.sqrt(out.in_features)
        out.weight.uniform_(-bound, bound, generator=generator)
        out.bias.zero_()


INITIALISERS = {"xavier": xavier_init, "nguyen_widrow": nguyen_widrow_init}


class ElementNetworks(Transform):
    """One feed-forward network per element; sums atomic energies per structure.

    Args:
        elements: element symbols/atomic numbers, same order as the representation's.
        n_in: inputs per element (list, e.g. ``representation.n_features``) or one int for all.
        n_hidden: hidden layer widths (study: ``[25, 25]``).
        activation: hidden activation (``"tanh"``).
        init: ``"xavier"`` (default) or ``"nguyen_widrow"``.
        atom_energies: {element: eV} offsets added per atom; ``None`` = fit on the training set.
        energy_scale: eV per network output unit.
        output_key: total-energy key (``"energy"``); ``per_atom_output_key`` optionally stores (N,).
        seed: optional seed for the initialisation.
    """

    def __init__(
        self,
        elements: Sequence[Union[str, int]] = ("H", "O"),
        n_in: Union[int, Sequence[int]] = 30,
        n_hidden: Sequence[int] = (25, 25),
        activation: str = "tanh",
        init: str = "xavier",
        atom_energies: Optional[Dict[str, float]] = None,
        energy_scale: float = 1.0,
        output_key: str = "energy",
        per_atom_output_key: Optional[str] = None,
        seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.elements = [element_symbol(e) for e in elements]
        n_in = [int(n_in)] * len(self.elements) if isinstance(n_in, int) else [int(n) for n in n_in]
        if len(n_in) != len(self.elements):
            raise ValueError(f"n_in has {len(n_in)} entries for {len(self.elements)} elements")
        if init not in INITIALISERS:
            raise ValueError(f"unknown init {init!r}; expected one of {sorted(INITIALISERS)}")
        self.n_in = n_in
        self.n_hidden = [int(h) for h in n_hidden]
        self.activation = activation
        self.output_key = output_key
        self.per_atom_output_key = per_atom_output_key
        self.model_outputs = [output_key]
        self.networks = nn.ModuleList(mlp(n, self.n_hidden, activation) for n in n_in)
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        for net in self.networks:
            INITIALISERS[init](net, gen)
        self.register_buffer("species_table", species_table(self.elements), persistent=False)
        shift = torch.zeros(len(self.elements), dtype=torch.float64)
        if atom_energies is not None:
            for e, v in atom_energies.items():
                shift[self.elements.index(element_symbol(e))] = float(v)
        self.register_buffer("atom_energy", shift)
        self.register_buffer("energy_scale", torch.tensor(float(energy_scale), dtype=torch.float64))
        self.register_buffer("atom_energy_fitted", torch.tensor(atom_energies is not None))

    def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        x = inputs["scalar_representation"]  # (N, W)
        species = species_of(inputs[props.Z], self.species_table, self.elements)  # (N,)
        y = x.new_zeros(x.shape[0])  # (N,)
        for e, net in enumerate(self.networks):
            idx = torch.nonzero(species == e).squeeze(-1)  # (N_e,)
            if idx.numel():
                y = y.index_add(0, idx, net(x[idx, : self.n_in[e]]).squeeze(-1))
        y = y * self.energy_scale.to(x.dtype) + self.atom_energy.to(x.dtype)[species]  # (N,) eV
        n_struct = inputs[props.n_atoms].shape[0]
        idx_m = inputs[props.idx_m]
        inputs[self.output_key] = x.new_zeros(n_struct).index_add(0, idx_m, y)  # (B,) eV
        if self.per_atom_output_key is not None:
            inputs[self.per_atom_output_key] = y
        return inputs

    def fit_atom_energies(self, counts: np.ndarray, energies: np.ndarray) -> None:
        """Per-element energies (eV): mean energy per atom plus the minimum-norm least-squares correction,
        from element counts (S, E) and energies (S,) in eV."""
        counts, energies = np.asarray(counts, float), np.asarray(energies, float)
        mean = energies.sum() / counts.sum()  # eV per atom; the min-norm correction below keeps
        resid, *_ = np.linalg.lstsq(counts, energies - counts.sum(1) * mean, rcond=None)  # fixed compositions sane
        sol = mean + resid
        self.atom_energy.copy_(torch.as_tensor(sol, dtype=self.atom_energy.dtype))
        self.atom_energy_fitted.fill_(True)

    def datamodule(self, value) -> None:
        """Called by ``AtomisticTask.setup``: fit ``atom_energy`` on the training energies once."""
        if bool(self.atom_energy_fitted):
            return
        counts, energies = [], []
        for p in value.train_dataset.iter_properties(load_properties=[self.output_key], load_structure=True):
            z = p[props.Z].long()
            table = self.species_table.to(z.device)
            species = species_of(z, table, self.elements)
            counts.append(torch.bincount(species, minlength=len(self.elements)).numpy())
            energies.append(float(p[self.output_key].sum()))
        self.fit_atom_energies(np.array(counts), np.array(energies))
