"""n2p2 / RuNNer interoperability: potentials (input.nn, scaling.data, weights.XXX.data) and input.data.

Units at this boundary: n2p2 files are in their own length/energy units (the H2O potentials: Bohr,
Hartree; ``length_unit``/``energy_unit`` arguments). Our models work in Å and eV; everything is
converted here, once.

What is reproduced of n2p2's prediction (``nnp-predict``/``nnp-dataset``):

* symmetry functions of types 2 (radial) and 3 (narrow angular), all cutoff types (``cutoff_type t
  [alpha]``), unordered neighbour-pair counting (``angular_convention="n2p2"``);
* scaling ``scale_symmetry_functions`` (+ ``center_symmetry_functions``) with ``scale_min_short``/
  ``scale_max_short`` from ``scaling.data``, or no scaling;
* networks with ``global_nodes_short``/``global_activation_short`` (t, l, s, p), weight order of
  ``weights.XXX.data`` (per layer: all weights from neuron j of the previous layer to neuron k, j
  outer; then the biases);
* the normalisation header (``mean_energy``, ``conv_energy``, ``conv_length``) and ``atom_energy``:
  E = Σ_i [NN_i / conv_energy + mean_energy + atom_energy(e_i)] in the file's energy unit.

Symmetry functions are ordered per element as n2p2 sorts them (type, cutoff, then η, r_s, ζ, λ
and neighbour elements), which is the order of ``scaling.data`` and of the network inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..units import energy_factor, length_factor


# ---- input.nn --------------------------------------------------------------------------------
def parse_input_nn(path: Union[str, Path]) -> Dict:
    """Keywords of an n2p2 ``input.nn`` (comments stripped); ``symfunction_short`` lines as lists."""
    settings: Dict = {"symfunction_short": [], "atom_energy": {}}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, *vals = line.split()
        if key == "symfunction_short":
            settings["symfunction_short"].append(vals)
        elif key == "atom_energy":
            settings["atom_energy"][vals[0]] = float(vals[1])
        else:
            settings[key] = vals
    return settings


def _sort_key(sf: list, index: Dict[str, int]):
    """n2p2's SymFnc operator< (same type & cutoff in our use): radial (η, r_s, e1); angular (η, r_s, ζ, λ, e1, e2)."""
    kind = int(sf[1])
    if kind == 2:
        e1, eta, rs, rc = sf[2], float(sf[3]), float(sf[4]), float(sf[5])
        return (kind, rc, eta, rs, 0.0, 0.0, index[e1], 0)
    if kind in (3, 9):
        a, b = sorted((index[sf[2]], index[sf[3]]))
        eta, lam, zeta, rc = (float(x) for x in sf[4:8])
        rs = float(sf[8]) if len(sf) > 8 else 0.0
        return (kind, rc, eta, rs, zeta, lam, a, b)
    raise ValueError(f"n2p2 symmetry function type {kind} is not supported (types 2 and 3 are)")


def n2p2_symmetry_functions(settings: Dict, elements: List[str]) -> List[dict]:
    """The ``symfunction_short`` lines as our mappings (parameters in the file's length unit), n2p2 order."""
    from ase.data import atomic_numbers

    index = {e: n for n, e in enumerate(sorted(elements, key=lambda s: atomic_numbers[s]))}
    out = []
    for center in elements:
        lines = [sf for sf in settings["symfunction_short"] if sf[0] == center]
        for sf in sorted(lines, key=lambda sf: _sort_key(sf, index)):
            if int(sf[1]) == 2:
                out.append({"center": center, "type": "G2", "neighbors": [sf[2]], "eta": float(sf[3]), "rs": float(sf[4]),
                            "rc": float(sf[5])})
            elif int(sf[1]) == 3:
                eta, lam, zeta, rc = (float(x) for x in sf[4:8])
                rs = float(sf[8]) if len(sf) > 8 else 0.0
                out.append({"center": center, "type": "G3", "neighbors": [sf[2], sf[3]], "eta": eta, "lambda": lam,
                            "zeta": zeta, "rs": rs, "rc": rc})
            else:
                raise ValueError(f"n2p2 symmetry function type {sf[1]} is not supported (types 2 and 3 are)")
    return out


def read_scaling(path: Union[str, Path], n_elements: int) -> Dict[int, np.ndarray]:
    """``scaling.data`` → {element index (0-based, by atomic number): (n_sf, 4) min, max, mean, sigma}."""
    rows: Dict[int, list] = {e: [] for e in range(n_elements)}
    for line in Path(path).read_text().splitlines():
        s = line.split()
        if not s or s[0].startswith("#"):
            continue
        rows[int(s[0]) - 1].append([float(x) for x in s[2:6]])
    return {e: np.array(v) for e, v in rows.items()}


def read_weights(path: Union[str, Path]) -> np.ndarray:
    """``weights.XXX.data`` → 1-D array of connection values in file order."""
    vals = [float(line.split()[0]) for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]
    return np.array(vals)


def assign_weights(net, values: np.ndarray) -> None:
    """Copy n2p2-ordered connections into an ``nn.Sequential`` of Linear layers (in place)."""
    import torch

    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    expected = sum(m.weight.numel() + m.bias.numel() for m in linears)
    if values.size != expected:
        raise ValueError(f"weights file has {values.size} values, network needs {expected}")
    pos = 0
    with torch.no_grad():
        for m in linears:
            n_out, n_in = m.weight.shape
            w = values[pos : pos + n_in * n_out].reshape(n_in, n_out)  # j (previous layer) outer, k inner
            pos += n_in * n_out
            m.weight.copy_(torch.as_tensor(w.T.copy()))
            m.bias.copy_(torch.as_tensor(values[pos : pos + n_out]))
            pos += n_out


def load_n2p2_potential(
    directory: Union[str, Path],
    length_unit: str = "Bohr",
    energy_unit: str = "Hartree",
    weights_pattern: str = "weights.{z:03d}.data",
    stress: bool = True,
):
    """Read an n2p2/RuNNer potential directory into our BPNN, as a float64
    ``schnetpack.model.NeuralNetworkPotential`` in Å / eV (energy, forces and, for cells, stress).

    Args:
        directory: holds ``input.nn``, ``scaling.data`` and ``weights.XXX.data`` (XXX = atomic number).
        length_unit, energy_unit: units of the potential's files (n2p2 water potentials: Bohr, Hartree).
    """
    import torch
    from ase.data import atomic_numbers

    from ..bpnn import BehlerParrinello, ElementNetworks
    from ..bpnn.cutoff import cutoff_name
    from ..models.builders import bpnn_potential

    directory = Path(directory)
    if not (directory / "input.nn").exists():
        raise FileNotFoundError(f"{directory} has no input.nn (not an n2p2 potential directory)")
    s = parse_input_nn(directory / "input.nn")
    elements = sorted(s["elements"], key=lambda e: atomic_numbers[e])
    if len(elements) != int(s.get("number_of_elements", [len(elements)])[0]):
        raise ValueError("input.nn: number_of_elements does not match elements")
    a = length_factor(length_unit)
    ev = energy_factor(energy_unit)
    functions = n2p2_symmetry_functions(s, elements)
    cutoffs = {f.pop("rc") for f in functions}
    if len(cutoffs) != 1:
        raise ValueError(f"all symmetry functions must share one cutoff radius, found {sorted(cutoffs)}")
    cut = s.get("cutoff_type", ["1"])
    rep = BehlerParrinello(
        elements, functions, cutoff=cutoffs.pop() * a, cutoff_type=cutoff_name(int(cut[0])),
        cutoff_alpha=float(cut[1]) if len(cut) > 1 else 0.0, parameter_unit=length_unit,
        angular_convention="n2p2",
        scale_range=(float(s.get("scale_min_short", ["0"])[0]), float(s.get("scale_max_short", ["1"])[0])),
    )
    if "scale_symmetry_functions_sigma" in s or "normalize_nodes" in s:
        raise ValueError("input.nn: scale_symmetry_functions_sigma / normalize_nodes are not supported")
    E, W = len(elements), rep.n_atom_basis
    if "scale_symmetry_functions" in s or "center_symmetry_functions" in s:
        stats = read_scaling(directory / "scaling.data", E)
        g = np.zeros((4, E, W))
        for e in range(E):
            n = rep.n_features[e]
            if stats[e].shape[0] != n:
                raise ValueError(f"scaling.data has {stats[e].shape[0]} rows for {elements[e]}, input.nn {n} functions")
            g[:, e, :n] = stats[e][:, :4].T
        mean = torch.as_tensor(g[2]) if "center_symmetry_functions" in s else None
        if "scale_symmetry_functions" in s:
            rep.set_scaling(torch.as_tensor(g[0]), torch.as_tensor(g[1]), mean)
        else:  # centring only
            rep.scale_weight.fill_(1.0)
            rep.scale_bias.copy_(-torch.as_tensor(g[2]))
            rep.scaling_fitted.fill_(True)
    else:
        rep.scaling_fitted.fill_(True)  # raw functions
    nodes = [int(x) for x in s["global_nodes_short"]]
    acts = s["global_activation_short"]
    if len(set(acts[:-1])) > 1 or acts[-1] != "l":
        raise ValueError(f"global_activation_short {acts}: only one hidden activation and a linear output are supported")
    conv_energy = float(s.get("conv_energy", ["1"])[0])
    mean_energy = float(s.get("mean_energy", ["0"])[0])
    offsets = {e: (mean_energy + s["atom_energy"].get(e, 0.0)) * ev for e in elements}
    nets = ElementNetworks(elements, rep.n_features, nodes, acts[0], atom_energies=offsets, energy_scale=ev / conv_energy)
    for e, net in zip(elements, nets.networks):
        assign_weights(net, read_weights(directory / weights_pattern.format(z=atomic_numbers[e])))
    return bpnn_potential(rep, nets, forces=True, stress=stress, dtype=torch.float64).eval()


# ---- input.data ----------------------------------------------------------------------------
def read_input_data(path: Union[str, Path], length_unit: str = "Bohr", energy_unit: str = "Hartree"):
    """n2p2/RuNNer ``input.data`` → list of ASE ``Atoms`` in Å with energy (eV) and forces (eV/Å)
    attached as a ``SinglePointCalculator``; the comment is in ``atoms.info["comment"]``."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    a = length_factor(length_unit)
    ev = energy_factor(energy_unit)
    frames = []
    lattice, pos, sym, frc, energy, comment = [], [], [], [], None, ""
    for line in Path(path).read_text().splitlines():
        s = line.split()
        if not s:
            continue
        key = s[0]
        if key == "begin":
            lattice, pos, sym, frc, energy, comment = [], [], [], [], None, ""
        elif key == "comment":
            comment = line.split(None, 1)[1] if len(s) > 1 else ""
        elif key == "lattice":
            lattice.append([float(x) for x in s[1:4]])
        elif key == "atom":
            pos.append([float(x) for x in s[1:4]])
            sym.append(s[4])
            frc.append([float(x) for x in s[7:10]])
        elif key == "energy":
            energy = float(s[1])
        elif key == "end":
            periodic = len(lattice) == 3
            atoms = Atoms(sym, positions=np.array(pos) * a, cell=np.array(lattice) * a if periodic else None, pbc=periodic)
            atoms.info["comment"] = comment
            atoms.calc = SinglePointCalculator(atoms, energy=energy * ev, forces=np.array(frc) * ev / a)
            frames.append(atoms)
    return frames
