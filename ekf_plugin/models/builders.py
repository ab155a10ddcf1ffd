"""Builders of complete SchNetPack models around the BPNN.

``water_bpnn()`` returns the study's model: the 57-function water representation (Å), element
networks 2 × 25 tanh, forces (and stress via ``Strain``) from autograd. Outputs in eV, eV/Å, eV/Å³.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

import ekf_plugin.compat  # noqa: F401
from ekf_plugin.bpnn import BehlerParrinello, ElementNetworks
from ekf_plugin.bpnn.presets import G2, G3


def function_records(representation: BehlerParrinello) -> List[Dict[str, Any]]:
    """The representation's functions as JSON-able mappings (parameters in Å), in feature order."""
    out = []
    for e in representation.elements:
        for f in representation.sf.functions[e]:
            if isinstance(f, G2):
                out.append({"center": f.center, "type": "G2", "neighbors": [f.neighbor], "eta": f.eta, "rs": f.rs})
            else:
                out.append({"center": f.center, "type": "G3", "neighbors": list(f.neighbors), "eta": f.eta,
                            "lambda": f.lam, "zeta": f.zeta, "rs": f.rs})
    return out


def bpnn_potential(
    representation: BehlerParrinello,
    networks: ElementNetworks,
    forces: bool = True,
    stress: bool = True,
    dtype: torch.dtype = torch.float32,
):
    """Wrap a representation and element networks into ``schnetpack.model.NeuralNetworkPotential``.

    Input modules: ``[Strain, PairwiseDistances]`` with stress, else ``[PairwiseDistances]``;
    outputs: the networks (``energy``) and ``ekf_plugin.compat.ContiguousForces``.
    """
    import schnetpack as spk
    from ekf_plugin.compat import ContiguousForces

    inputs = ([spk.atomistic.Strain()] if stress else []) + [spk.atomistic.PairwiseDistances()]
    outputs = [networks]
    if forces or stress:
        outputs.append(ContiguousForces(calc_forces=forces, calc_stress=stress, energy_key=networks.output_key))
    model = spk.model.NeuralNetworkPotential(
        representation=representation,
        input_modules=inputs,
        output_modules=outputs,
        input_dtype_str="float64" if dtype == torch.float64 else "float32",
    )
    return model.to(dtype)


def water_bpnn(
    elements: Sequence = ("H", "O"),
    symmetry_functions="water_paper",
    cutoff: Optional[float] = None,
    cutoff_type="tanhu",
    angular_convention: str = "n2p2",
    n_hidden: Sequence[int] = (25, 25),
    activation: str = "tanh",
    init: str = "xavier",
    atom_energies: Optional[Dict[str, float]] = None,
    energy_scale: float = 1.0,
    forces: bool = True,
    stress: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: Optional[int] = None,
    parameter_unit: str = "Angstrom",
    **representation_kwargs,
):
    """The study's BPNN as a ``schnetpack.model.NeuralNetworkPotential`` (Å, eV).

    Scaling and ``atom_energies`` are fitted from the training data by ``spktrain`` (or call
    ``model.representation.fit_scaling(batches)`` / ``networks.fit_atom_energies``). Parameters of
    ``symmetry_functions`` lists are in ``parameter_unit``; the ``cutoff`` is in Å (default 12 Bohr).
    """
    rep = BehlerParrinello(elements, symmetry_functions, cutoff, cutoff_type, parameter_unit=parameter_unit,
                           angular_convention=angular_convention, **representation_kwargs)
    nets = ElementNetworks(rep.elements, rep.n_features, n_hidden, activation, init, atom_energies, energy_scale, seed=seed)
    return bpnn_potential(rep, nets, forces=forces, stress=stress, dtype=dtype)


def bpnn_model(
    representation: BehlerParrinello,
    n_hidden: Sequence[int] = (25, 25),
    activation: str = "tanh",
    init: str = "xavier",
    atom_energies: Optional[Dict[str, float]] = None,
    energy_scale: float = 1.0,
    energy_key: str = "energy",
    forces: bool = True,
    stress: bool = False,
    seed: Optional[int] = None,
):
    """Complete a ``BehlerParrinello`` representation with its element networks (config ``model=bpnn``).

    The networks' input sizes come from the representation (30 O / 27 H for the water preset), so
    a ``model/representation`` config alone is enough to choose the functions. float32, eV/Å.
    """
    nets = ElementNetworks(representation.elements, representation.n_features, n_hidden, activation, init,
                           atom_energies, energy_scale, output_key=energy_key, seed=seed)
    return bpnn_potential(representation, nets, forces=forces, stress=stress, dtype=torch.float32)
