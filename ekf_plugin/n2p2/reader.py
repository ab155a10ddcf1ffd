"""Load n2p2 / RuNNer potentials (``input.nn``, ``scaling.data``, ``weights.XXX.data``); read ``input.data``.

Units at this boundary: the files are in their own length/energy units (the n2p2 water potentials:
Bohr, Hartree; ``length_unit``/``energy_unit`` arguments). Our models work in Å and eV; everything
is converted here, once, with :mod:`ase.units`.

What is reproduced of n2p2's prediction (``nnp-predict``/``nnp-dataset``) and RuNNer's:

* ``input.nn`` comments after ``#`` and ``!`` (anywhere on a line, as n2p2's own reader); keyword
  aliases (:data:`ALIASES`: n2p2's ``symfunction``, RuNNer's ``scale_min_short_atomic`` /
  ``scale_max_short_atomic``, ``nnp_generation``...); keywords in any case;
* symmetry functions of types 2 (radial) and 3 (narrow angular, optional r_s), all cutoff types
  ``cutoff_type t [alpha]`` (0-8, n2p2 and RuNNer numbering), unordered neighbour-pair counting
  (``angular_convention="n2p2"``, RuNNer's too). Types 9 (wide angular), 12 and 13 (polynomial) are
  refused with a message;
* scaling exactly as n2p2 chooses it: ``scale_symmetry_functions`` (min/max), with
  ``center_symmetry_functions`` (mean instead of min), ``center_symmetry_functions`` alone
  (G − mean), ``scale_symmetry_functions_sigma`` ((G − mean)/σ), or none; ``scale_min_short`` /
  ``scale_max_short`` default to 0 / 1 when absent (n2p2's defaults). ``scaling.data`` may have six
  columns (n2p2: element, index, min, max, mean, σ) or five (RuNNer, no σ), and RuNNer's trailing
  line of two numbers (the per-atom energy range of the training set) is recognised and skipped;
* networks ``global_nodes_short``/``global_activation_short`` (t, l, s, p), ``normalize_nodes``
  (folded into the weights: every layer's weights and bias divided by the previous layer's width),
  weight order of ``weights.XXX.data`` (per layer: all weights from neuron j of the previous layer
  to neuron k, j outer; then the biases) — n2p2 and RuNNer write the same order;
* energies: the ``nnp-norm`` header (``mean_energy``, ``conv_energy``, ``conv_length``: all or none)
  and ``atom_energy`` lines give E = Σ_i [NN_i / conv_energy + mean_energy + atom_energy(e_i)] in the
  file's energy unit. n2p2 always adds ``atom_energy``; RuNNer only with ``remove_atom_energies``
  (``dialect``). A training ``input.nn`` with ``normalize_data_set`` but without the header is refused;
* element order: the networks, ``scaling.data`` and the symmetry functions are indexed by atomic
  number whatever the order of the ``elements`` line (as n2p2 and RuNNer sort them).

Symmetry functions are ordered per element as n2p2 sorts them (type, cutoff, then η, r_s, ζ, λ and
neighbour elements), which is the order of ``scaling.data`` and of the network inputs. RuNNer sorts
ζ and λ before r_s (``sortsymfunctions.f90``); the two orders differ only for angular functions with
r_s ≠ 0, and ``dialect="runner"`` uses RuNNer's.

Precision: the model is built in float64 *before* the file's numbers are copied into it. Copying
them into float32 parameters first and casting afterwards (the behaviour before this fix) rounds
every weight to 7 digits; with a large output bias (RuNNer potentials without energy normalisation:
tens of Hartree) that is a constant error of ~1e-7 Ha per atom.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..units import energy_factor, length_factor

#: alternative keyword → keyword the loader uses (n2p2's ``Settings.cpp`` aliases and RuNNer's names).
ALIASES = {
    "symfunction": "symfunction_short",
    "scale_min_short_atomic": "scale_min_short",
    "scale_max_short_atomic": "scale_max_short",
    "nnp_generation": "nnp_type",
    "nnp_type_gen": "nnp_type",
    "nnp_gen": "nnp_type",
}
#: keywords that may appear on several lines (values collected as a list of token lists).
REPEATED = ("symfunction_short", "atom_energy", "element_nodes_short", "element_activation_short",
            "element_hidden_layers_short")
#: keywords only RuNNer writes; any of them makes ``dialect="auto"`` read the file as RuNNer's.
RUNNER_MARKERS = ("runner_mode", "nn_type_short", "use_short_nn", "remove_atom_energies",
                  "scale_min_short_atomic", "scale_max_short_atomic")
#: keywords describing something the plugin cannot represent → why.
UNSUPPORTED = {
    "global_symfunction_short": "RuNNer's global_symfunction_short lines are not expanded; write one "
                                "symfunction_short line per centre and neighbour element(s)",
    "element_symfunction_short": "RuNNer's element_symfunction_short lines are not expanded; write one "
                                 "symfunction_short line per centre and neighbour element(s)",
    "use_electrostatics": "electrostatic (charge) networks are not supported, only the short-range energy",
    "global_nodes_electrostatic": "electrostatic (charge) networks (4G-HDNNP) are not supported",
    "global_hidden_layers_electrostatic": "electrostatic (charge) networks (4G-HDNNP) are not supported",
    "use_short_nn_pair": "RuNNer pair networks are not supported (atomic networks only)",
}
UNITS_MARKER = "# ekf-plugin units:"
SUPPORTED_ACTIVATIONS = {"t": "tanh", "l": "linear", "s": "sigmoid", "p": "softplus"}


# ---- input.nn --------------------------------------------------------------------------------
def parse_input_nn(path: Union[str, Path]) -> Dict[str, Any]:
    """Keywords of an n2p2/RuNNer ``input.nn``.

    Comments start at ``#`` or ``!`` anywhere on a line; keywords are lower-cased and
    :data:`ALIASES` mapped. Keywords of :data:`REPEATED` map to a list of token lists (the
    ``atom_energy`` lines to ``{element: value}``), all others to their token list (``[]`` for
    flags). ``"_runner_markers"`` lists the RuNNer-only keywords found.

    Raises:
        ValueError: a non-repeatable keyword given twice (n2p2 refuses that too).
    """
    settings: Dict[str, Any] = {k: [] for k in REPEATED}
    settings["atom_energy"] = {}
    settings["_runner_markers"] = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        if raw.startswith(UNITS_MARKER):  # written by export_n2p2: "# ekf-plugin units: length=L energy=E"
            settings["_units"] = dict(item.split("=", 1) for item in raw[len(UNITS_MARKER):].split() if "=" in item)
        line = raw.split("#", 1)[0].split("!", 1)[0].strip()
        if not line:
            continue
        key, *vals = line.split()
        key = key.lower()
        if key in RUNNER_MARKERS:
            settings["_runner_markers"].append(key)
        key = ALIASES.get(key, key)
        if key == "atom_energy":
            if len(vals) < 2:
                raise ValueError(f"{path}:{number}: atom_energy needs an element and a value: {raw.strip()!r}")
            settings["atom_energy"][vals[0]] = float(vals[1])
        elif key in REPEATED:
            settings[key].append(vals)
        elif key in settings:
            raise ValueError(f"{path}:{number}: keyword {key!r} is given twice")
        else:
            settings[key] = vals
    return settings


def _sort_key(sf: list, index: Dict[str, int], dialect: str = "n2p2"):
    """n2p2's ``SymFnc::operator<`` within one element: radial (rc, η, r_s, e1), angular (rc, η, r_s, ζ, λ,
    e1, e2); RuNNer's ``sortsymfunctions``: angular (rc, η, ζ, λ, r_s, e1, e2)."""
    kind = int(sf[1])
    if kind == 2:
        e1, eta, rs, rc = sf[2], float(sf[3]), float(sf[4]), float(sf[5])
        return (kind, rc, eta, rs, 0.0, 0.0, index[e1], 0)
    a, b = sorted((index[sf[2]], index[sf[3]]))
    eta, lam, zeta, rc = (float(x) for x in sf[4:8])
    rs = float(sf[8]) if len(sf) > 8 else 0.0
    if dialect == "runner":
        return (kind, rc, eta, zeta, lam, rs, a, b)
    return (kind, rc, eta, rs, zeta, lam, a, b)


def _check_symfunction(sf: list, elements: List[str]) -> None:
    if len(sf) < 2:
        raise ValueError(f"input.nn: symfunction_short line too short: {' '.join(sf)!r}")
    try:
        kind = int(sf[1])
    except ValueError:
        raise ValueError(f"input.nn: symfunction_short {' '.join(sf)!r}: type {sf[1]!r} is not a number") from None
    if kind not in (2, 3):
        what = {9: "wide angular", 12: "polynomial angular", 13: "polynomial angular",
                20: "compact radial", 21: "compact angular", 22: "compact angular"}.get(kind, "unknown")
        raise ValueError(
            f"input.nn: symfunction_short type {kind} ({what}) is not supported; ekf-plugin reads types 2 (radial) "
            f"and 3 (narrow angular) only (line: symfunction_short {' '.join(sf)})"
        )
    need = 6 if kind == 2 else 8
    if len(sf) < need:
        raise ValueError(f"input.nn: symfunction_short type {kind} needs {need} fields: {' '.join(sf)!r}")
    names = sf[:1] + sf[2:3] if kind == 2 else sf[:1] + sf[2:4]
    for e in names:
        if e not in elements:
            raise ValueError(f"input.nn: symfunction_short {' '.join(sf)!r} uses element {e!r}, not in elements {elements}")


def n2p2_symmetry_functions(settings: Dict, elements: List[str], dialect: str = "n2p2") -> List[dict]:
    """The ``symfunction_short`` lines as our mappings (parameters in the file's length unit, key ``rc``
    for the cutoff), per element in the order of ``elements``, each element's in n2p2's (or RuNNer's) order."""
    from ase.data import atomic_numbers

    index = {e: n for n, e in enumerate(sorted(elements, key=lambda s: atomic_numbers[s]))}
    for sf in settings["symfunction_short"]:
        _check_symfunction(sf, elements)
    out = []
    for center in elements:
        lines = [sf for sf in settings["symfunction_short"] if sf[0] == center]
        for sf in sorted(lines, key=lambda sf: _sort_key(sf, index, dialect)):
            if int(sf[1]) == 2:
                out.append({"center": center, "type": "G2", "neighbors": [sf[2]], "eta": float(sf[3]), "rs": float(sf[4]),
                            "rc": float(sf[5])})
            else:
                eta, lam, zeta, rc = (float(x) for x in sf[4:8])
                rs = float(sf[8]) if len(sf) > 8 else 0.0
                out.append({"center": center, "type": "G3", "neighbors": [sf[2], sf[3]], "eta": eta, "lambda": lam,
                            "zeta": zeta, "rs": rs, "rc": rc})
    return out


# ---- scaling.data / weights ------------------------------------------------------------------
def read_scaling(path: Union[str, Path], n_elements: int) -> Dict[int, np.ndarray]:
    """``scaling.data`` → {element index (0-based, by atomic number): (n_sf, 4) min, max, mean, sigma}.

    Six columns (n2p2) or five (RuNNer: σ is NaN then). A final line of exactly two numbers (RuNNer's
    per-atom energy range) is skipped; any other malformed line is an error naming the line.
    """
    rows: Dict[int, list] = {e: [] for e in range(n_elements)}
    lines = Path(path).read_text().splitlines()
    data = [(n, line.split()) for n, line in enumerate(lines, 1) if line.split() and not line.lstrip().startswith("#")]
    for k, (number, s) in enumerate(data):
        if len(s) == 2 and k == len(data) - 1:
            try:
                [float(x) for x in s]
                continue  # RuNNer: min/max of the training energies per atom
            except ValueError:
                pass
        if len(s) not in (5, 6):
            raise ValueError(f"{path}:{number}: expected 5 (RuNNer) or 6 (n2p2) columns "
                             f"'element index min max mean [sigma]', got {len(s)}: {lines[number - 1].strip()!r}")
        try:
            e = int(s[0]) - 1
            values = [float(x) for x in s[2:6]] + ([float("nan")] if len(s) == 5 else [])
        except ValueError:
            raise ValueError(f"{path}:{number}: not a scaling row: {lines[number - 1].strip()!r}") from None
        if not 0 <= e < n_elements:
            raise ValueError(f"{path}:{number}: element index {e + 1} outside 1..{n_elements}")
        rows[e].append(values)
    return {e: np.array(v, dtype=np.float64).reshape(-1, 4) for e, v in rows.items()}


def read_weights(path: Union[str, Path]) -> np.ndarray:
    """``weights.XXX.data`` → 1-D float64 array of connection values in file order (first column;
    RuNNer writes one value per line, n2p2 adds index columns)."""
    vals = [float(line.split()[0]) for line in Path(path).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    return np.array(vals, dtype=np.float64)


def assign_weights(net, values: np.ndarray, normalize_nodes: bool = False) -> None:
    """Copy n2p2-ordered connections into an ``nn.Sequential`` of Linear layers (in place).

    Values are copied in the parameters' own dtype; build the network in float64 first to keep all
    16 digits of the file. ``normalize_nodes`` (n2p2/RuNNer keyword) divides each layer's weights and
    bias by the width of the previous layer, which is what that keyword does to the pre-activation.
    """
    import torch

    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    expected = sum(m.weight.numel() + m.bias.numel() for m in linears)
    values = np.asarray(values, dtype=np.float64)
    if values.size != expected:
        raise ValueError(f"weights file has {values.size} values, network needs {expected}")
    pos = 0
    with torch.no_grad():
        for m in linears:
            n_out, n_in = m.weight.shape
            w = values[pos : pos + n_in * n_out].reshape(n_in, n_out)  # j (previous layer) outer, k inner
            pos += n_in * n_out
            b = values[pos : pos + n_out]
            pos += n_out
            if normalize_nodes:
                w, b = w / n_in, b / n_in
            m.weight.copy_(torch.as_tensor(w.T.copy(), dtype=m.weight.dtype))
            m.bias.copy_(torch.as_tensor(b, dtype=m.bias.dtype))


# ---- the potential ---------------------------------------------------------------------------
def _scalar(s: Dict, key: str, default: Optional[str] = None) -> Optional[str]:
    vals = s.get(key)
    if vals is None:
        return default
    if not vals:
        raise ValueError(f"input.nn: keyword {key!r} needs a value")
    return vals[0]


def _refuse_unsupported(s: Dict) -> None:
    for key, why in UNSUPPORTED.items():
        if key in s:
            raise ValueError(f"input.nn: keyword {key!r}: {why}")
    nnp_type = _scalar(s, "nnp_type", "2")
    if nnp_type not in ("2", "2G", "2g"):
        raise ValueError(f"input.nn: nnp_type {nnp_type}: only 2G-HDNNPs (short-range networks) are supported")
    nn_type = _scalar(s, "nn_type_short", "1")
    if nn_type != "1":
        raise ValueError(f"input.nn: nn_type_short {nn_type}: only atomic networks (1) are supported")


def _network_layout(s: Dict) -> Tuple[List[int], str]:
    nodes = [int(x) for x in s.get("global_nodes_short", [])]
    acts = list(s.get("global_activation_short", []))
    if not nodes or not acts:
        raise ValueError("input.nn: global_nodes_short and global_activation_short are required")
    if "global_hidden_layers_short" in s and int(_scalar(s, "global_hidden_layers_short")) != len(nodes):
        raise ValueError(f"input.nn: global_hidden_layers_short {_scalar(s, 'global_hidden_layers_short')} "
                         f"but global_nodes_short lists {len(nodes)} layers")
    if len(acts) != len(nodes) + 1:
        raise ValueError(f"input.nn: global_activation_short {acts} needs {len(nodes) + 1} entries (hidden layers + output)")
    for key, ref in (("element_hidden_layers_short", [str(len(nodes))]), ("element_nodes_short", [str(n) for n in nodes]),
                     ("element_activation_short", acts)):
        for vals in s[key]:
            if [str(int(v)) if v.isdigit() else v for v in vals[1:]] != ref:
                raise ValueError(f"input.nn: keyword {key!r} ({' '.join(vals)}): per-element network layouts "
                                 f"that differ from the global one are not supported")
    unknown = sorted({a for a in acts if a not in SUPPORTED_ACTIVATIONS})
    if unknown:
        raise ValueError(f"input.nn: global_activation_short {' '.join(acts)}: activation(s) {unknown} not supported "
                         f"(supported: {sorted(SUPPORTED_ACTIVATIONS)})")
    if len(set(acts[:-1])) > 1 or acts[-1] != "l":
        raise ValueError(f"input.nn: global_activation_short {' '.join(acts)}: only one hidden activation and a "
                         f"linear output are supported")
    return nodes, SUPPORTED_ACTIVATIONS[acts[0]]


def _normalisation(s: Dict) -> Tuple[float, float, float]:
    """(mean_energy, conv_energy, conv_length) in the file's units; (0, 1, 1) without the header."""
    keys = ("mean_energy", "conv_energy", "conv_length")
    present = [k for k in keys if k in s]
    if present and len(present) != 3:
        raise ValueError(f"input.nn: incorrect normalisation header {present}: use all or none of {list(keys)} (as n2p2)")
    if not present:
        if "normalize_data_set" in s:
            raise ValueError("input.nn: normalize_data_set is set but the mean_energy/conv_energy/conv_length header "
                             "is missing: use the input.nn that nnp-train wrote next to the weights (it has the header)")
        return 0.0, 1.0, 1.0
    return tuple(float(_scalar(s, k)) for k in keys)


def _scaling_type(s: Dict) -> str:
    """n2p2's ``Mode::setupSymmetryFunctionScaling`` decision."""
    scale, center = "scale_symmetry_functions" in s, "center_symmetry_functions" in s
    if scale and not center:
        return "scale"
    if center and not scale:
        return "center"
    if scale and center:
        return "scalecenter"
    if "scale_symmetry_functions_sigma" in s:
        return "scalesigma"
    return "none"


def load_n2p2_potential(
    directory: Union[str, Path],
    length_unit: Optional[str] = None,
    energy_unit: Optional[str] = None,
    weights_pattern: str = "weights.{z:03d}.data",
    stress: bool = True,
    dialect: str = "auto",
):
    """Read an n2p2/RuNNer potential directory into our BPNN, as a float64
    ``schnetpack.model.NeuralNetworkPotential`` in Å / eV (energy, forces and, for cells, stress).

    Args:
        directory: holds ``input.nn``, ``scaling.data`` and ``weights.XXX.data`` (XXX = atomic number).
        length_unit, energy_unit: units of the potential's files. Default: the ``# ekf-plugin units:``
            line that :func:`ekf_plugin.n2p2.writer.export_n2p2` writes into ``input.nn``, else Bohr and
            Hartree (the n2p2 water potentials, RuNNer's usual units).
        weights_pattern: file name of each element's weights, ``z`` = atomic number.
        stress: add SchNetPack's strain input for the stress (eV/Å³) of periodic cells.
        dialect: ``"n2p2"``, ``"runner"`` or ``"auto"`` (RuNNer when a RuNNer-only keyword such as
            ``runner_mode`` or ``remove_atom_energies`` is present). RuNNer adds ``atom_energy`` only
            with ``remove_atom_energies`` and sorts angular functions (η, ζ, λ, r_s); n2p2 always adds
            ``atom_energy`` and sorts (η, r_s, ζ, λ).

    The returned model carries ``model.n2p2_source`` (a dict: units, dialect, normalisation, atom
    energies, scaling statistics and symmetry-function parameters as read) so that
    :func:`~ekf_plugin.n2p2.writer.export_n2p2` can write the same numbers back.

    Raises:
        FileNotFoundError: no ``input.nn``/``scaling.data``/weights file.
        ValueError: a keyword or value the plugin does not support (the message names it).
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
    if dialect == "auto":
        dialect = "runner" if s["_runner_markers"] else "n2p2"
    if dialect not in ("n2p2", "runner"):
        raise ValueError(f"dialect must be 'auto', 'n2p2' or 'runner', got {dialect!r}")
    _refuse_unsupported(s)
    marked = s.get("_units", {})
    length_unit = length_unit or marked.get("length", "Bohr")
    energy_unit = energy_unit or marked.get("energy", "Hartree")
    if "elements" not in s:
        raise ValueError("input.nn: keyword 'elements' is missing")
    for e in s["elements"]:
        if e not in atomic_numbers:
            raise ValueError(f"input.nn: elements: {e!r} is not a chemical element")
    elements = sorted(s["elements"], key=lambda e: atomic_numbers[e])
    if len(elements) != int(_scalar(s, "number_of_elements", str(len(elements)))):
        raise ValueError("input.nn: number_of_elements does not match elements")
    a = length_factor(length_unit)
    ev = energy_factor(energy_unit)
    functions = n2p2_symmetry_functions(s, elements, dialect)
    source_functions = [dict(f) for f in functions]
    cutoffs = {f.pop("rc") for f in functions}
    if len(cutoffs) != 1:
        raise ValueError(f"input.nn: all symmetry functions must share one cutoff radius, found {sorted(cutoffs)}")
    cut = s.get("cutoff_type", ["1"])
    kind = cutoff_name(int(cut[0]))
    alpha = float(cut[1]) if len(cut) > 1 else 0.0
    scaling = _scaling_type(s)
    s_min = float(_scalar(s, "scale_min_short", "0.0"))
    s_max = float(_scalar(s, "scale_max_short", "1.0"))
    rep = BehlerParrinello(
        elements, functions, cutoff=cutoffs.pop() * a, cutoff_type=kind, cutoff_alpha=alpha,
        parameter_unit=length_unit, angular_convention="n2p2",
        scale_range=(s_min, s_max) if s_max > s_min else (0.0, 1.0),
    )
    if scaling.startswith("scale") and not s_max > s_min:
        raise ValueError(f"input.nn: scale_max_short ({s_max}) must be larger than scale_min_short ({s_min})")
    E, W = len(elements), rep.n_atom_basis
    stats = None
    weight = torch.zeros(E, W, dtype=torch.float64)
    bias = torch.zeros(E, W, dtype=torch.float64)
    if scaling != "none":
        if not (directory / "scaling.data").exists():
            raise FileNotFoundError(f"{directory} has no scaling.data (input.nn asks for {scaling} scaling)")
        stats = read_scaling(directory / "scaling.data", E)
        g = np.zeros((4, E, W))
        for e in range(E):
            n = rep.n_features[e]
            if stats[e].shape[0] != n:
                raise ValueError(f"scaling.data has {stats[e].shape[0]} rows for {elements[e]}, input.nn {n} functions")
            g[:, e, :n] = stats[e].T
        g_min, g_max, g_mean, g_sigma = (torch.as_tensor(x) for x in g)
        if scaling in ("scale", "scalecenter"):
            rep.set_scaling(g_min, g_max, g_mean if scaling == "scalecenter" else None)
        else:
            if scaling == "center":
                weight.fill_(1.0)
                bias.copy_(-g_mean)
            else:  # scalesigma
                if any(np.isnan(stats[e][:, 3]).any() for e in range(E)):
                    raise ValueError("input.nn: scale_symmetry_functions_sigma needs sigma (6th column of scaling.data)")
                weight.copy_(torch.where(g_sigma != 0, (s_max - s_min) / torch.where(g_sigma != 0, g_sigma, 1.0), 0.0))
                bias.copy_(s_min - weight * g_mean)
            rep.scale_weight.copy_(weight)
            rep.scale_bias.copy_(bias)
    else:
        rep.scale_weight.fill_(1.0)
        rep.scale_bias.zero_()
    rep.scaling_fitted.fill_(True)
    nodes, activation = _network_layout(s)
    mean_energy, conv_energy, conv_length = _normalisation(s)
    use_atom_energy = dialect == "n2p2" or "remove_atom_energies" in s
    for e in s["atom_energy"]:
        if e not in elements:
            raise ValueError(f"input.nn: atom_energy for {e!r}, which is not in elements {elements}")
    atom_energy = {e: (s["atom_energy"].get(e, 0.0) if use_atom_energy else 0.0) for e in elements}
    offsets = {e: (mean_energy + atom_energy[e]) * ev for e in elements}
    nets = ElementNetworks(elements, rep.n_features, nodes, activation, atom_energies=offsets, energy_scale=ev / conv_energy)
    # float64 from the start: the file's 16 digits go straight into float64 parameters
    model = bpnn_potential(rep, nets, forces=True, stress=stress, dtype=torch.float64)
    normalize_nodes = "normalize_nodes" in s
    for e, net in zip(elements, nets.networks):
        path = directory / weights_pattern.format(z=atomic_numbers[e])
        if not path.exists():
            raise FileNotFoundError(f"{directory} has no {path.name} (weights of {e})")
        assign_weights(net, read_weights(path), normalize_nodes=normalize_nodes)
    model.n2p2_source = {
        "directory": str(directory), "length_unit": length_unit, "energy_unit": energy_unit, "dialect": dialect,
        "mean_energy": mean_energy, "conv_energy": conv_energy, "conv_length": conv_length,
        "normalised": "mean_energy" in s, "atom_energy": {e: atom_energy[e] for e in elements if e in s["atom_energy"]
                                                            and use_atom_energy},
        "scaling": scaling, "scale_range": (s_min, s_max), "statistics": stats, "functions": source_functions,
        "normalize_nodes": normalize_nodes,
    }
    return model.eval()


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
