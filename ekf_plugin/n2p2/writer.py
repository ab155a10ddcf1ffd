"""Export a plugin BPNN as an n2p2 potential directory (``input.nn``, ``scaling.data``, ``weights.XXX.data``).

``export_n2p2(model, directory)`` (CLI: ``ekf-plugin export MODEL DIR --format n2p2``) writes any
model with a :class:`~ekf_plugin.bpnn.BehlerParrinello` representation and
:class:`~ekf_plugin.bpnn.ElementNetworks` so that n2p2 (``nnp-predict``, LAMMPS ``pair_style
hdnnp``/``nnp``) and :func:`~ekf_plugin.n2p2.reader.load_n2p2_potential` predict the same energies
and forces. Conventions of the written files (also stated in their comments and ``README.md``):

* **units**: ``length_unit``/``energy_unit`` (default: the units a loaded n2p2 potential came in,
  else Å and eV, which LAMMPS ``units metal`` uses). Symmetry-function parameters are converted
  from the model's Å with :mod:`ase.units` (η · a², r_s / a, r_c / a; a = Å per length unit).
  ``input.nn`` records them in a comment line ``# ekf-plugin units: length=... energy=...`` that
  :func:`~ekf_plugin.n2p2.reader.load_n2p2_potential` reads when no units are passed;
* **symmetry functions**: types 2 and 3 with the model's cutoff type (n2p2 number, e.g. ``2`` =
  tanh³(1 − r/r_c), the study's) and inner radius; per element in n2p2's sorted order (the network
  inputs and ``scaling.data`` rows are permuted accordingly);
* **angular counting**: n2p2 counts each unordered neighbour pair once. A model built with
  ``angular_convention="ordered"`` (PiNN, the study's Eq. S2) has same-element G3 values twice
  n2p2's; the factor 2 is folded into those rows of ``scaling.data`` (min, max, mean halved), so the
  network inputs are identical;
* **scaling**: the model's affine scaling s = w·G + b written as n2p2's
  ``scale_symmetry_functions`` (s = S_min + (S_max − S_min)(G − G_min)/(G_max − G_min)) with the
  model's (S_min, S_max) (study: −1, 1); the 5th column of ``scaling.data`` is then the midpoint of
  [G_min, G_max], not a data statistic. A function the model maps to a constant (G_max = G_min in
  training) is written with unit scale and its constant folded into the first-layer biases (its
  weights zero). A model loaded from n2p2 keeps its own statistics and scaling type;
* **energies**: E = Σ_i [energy_scale · NN_i + atom_energy(e_i)] (eV) becomes ``atom_energy`` lines
  and, when energy_scale is not 1 in the file's energy unit, n2p2's normalisation header
  (``mean_energy 0``, ``conv_energy`` = 1/energy_scale, ``conv_length 1``); weights are written
  unchanged, ``%24.16E`` (all 17 digits of a float64).

``write_input_data`` writes ASE frames as n2p2 ``input.data`` (for ``nnp-predict``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..units import energy_factor, length_factor

_ACTIVATION_LETTER = {"tanh": "t", "t": "t", "linear": "l", "l": "l", "sigmoid": "s", "s": "s", "softplus": "p", "p": "p"}
UNITS_MARKER = "# ekf-plugin units:"


def _parts(model):
    from ..bpnn import BehlerParrinello, ElementNetworks

    rep = getattr(model, "representation", None)
    nets = [m for m in getattr(model, "output_modules", []) if isinstance(m, ElementNetworks)]
    if not isinstance(rep, BehlerParrinello) or len(nets) != 1:
        raise ValueError("export to n2p2 needs a BPNN model (a BehlerParrinello representation and one "
                         "ElementNetworks output); this model is not one")
    return rep, nets[0]


def _num(x: float) -> str:
    """Shortest decimal that reads back as the same float64 (``0.001``, ``12.0``, ``1.2345e-05``)."""
    return repr(float(x))


def _close(a: float, b: float, rtol: float = 1e-12) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-300)


def _function_lines(rep, element: str, a: float) -> List[Tuple[list, tuple, int]]:
    """(tokens, params-in-file-units, same-element-G3 flag) of ``element``'s functions, model order."""
    from ..bpnn.presets import G2

    rc = float(rep.cutoff) / a
    out = []
    for f in rep.sf.functions[element]:
        if isinstance(f, G2):
            params = ("G2", f.neighbor, f.eta * a * a, f.rs / a, rc)
            tokens = [element, "2", f.neighbor, _num(params[2]), _num(params[3]), _num(rc)]
            out.append((tokens, params, 0))
        else:
            e1, e2 = f.neighbors
            params = ("G3", (e1, e2), f.eta * a * a, f.lam, f.zeta, f.rs / a, rc)
            tokens = [element, "3", e1, e2, _num(params[2]), _num(f.lam), _num(f.zeta), _num(rc)]
            if f.rs != 0.0:
                tokens.append(_num(params[5]))
            out.append((tokens, params, int(e1 == e2)))
    return out


def _source_tokens(src: Optional[dict], element: str, lines) -> Optional[List[list]]:
    """The loaded file's own numbers for ``element``'s functions when they equal the model's (else None)."""
    if not src:
        return None
    mine = [f for f in src["functions"] if f["center"] == element]
    if len(mine) != len(lines):
        return None
    out = []
    for f, (tokens, params, _) in zip(mine, lines):
        if f["type"] != params[0]:
            return None
        if f["type"] == "G2":
            ok = f["neighbors"][0] == params[1] and all(_close(x, y) for x, y in
                                                         ((f["eta"], params[2]), (f["rs"], params[3]), (f["rc"], params[4])))
            new = [element, "2", params[1], _num(f["eta"]), _num(f["rs"]), _num(f["rc"])]
        else:
            ok = tuple(sorted(f["neighbors"])) == tuple(sorted(params[1])) and f["lambda"] == params[3] and \
                f["zeta"] == params[4] and all(_close(x, y) for x, y in ((f["eta"], params[2]), (f["rc"], params[6]))) \
                and (_close(f["rs"], params[5]) or f["rs"] == params[5] == 0.0)
            new = [element, "3", *f["neighbors"], _num(f["eta"]), _num(f["lambda"]), _num(f["zeta"]), _num(f["rc"])]
            if f["rs"] != 0.0:
                new.append(_num(f["rs"]))
        if not ok:
            return None
        out.append(new)
    return out


def _n2p2_order(lines, index: Dict[str, int]) -> List[int]:
    """Permutation putting the model's functions into n2p2's sorted order (``SymFnc::operator<``)."""
    def key(n):
        p = lines[n][1]
        if p[0] == "G2":
            return (2, p[4], p[2], p[3], 0.0, 0.0, index[p[1]], 0)
        a, b = sorted((index[p[1][0]], index[p[1][1]]))
        return (3, p[6], p[2], p[5], p[4], p[3], a, b)

    return sorted(range(len(lines)), key=key)


def _linear_layers(net) -> List[Tuple[np.ndarray, np.ndarray]]:
    import torch

    return [(m.weight.detach().cpu().double().numpy().T.copy(), m.bias.detach().cpu().double().numpy().copy())
            for m in net if isinstance(m, torch.nn.Linear)]  # W (n_in, n_out), b (n_out,)


def _weights_text(layers, element: str, z: int) -> str:
    head = [
        "################################################################################",
        f"# Neural network connection values (weights and biases) of element {element} (Z = {z}),",
        "# written by ekf-plugin export_n2p2; n2p2 order: per layer all weights (neuron n_s of layer l_s",
        "# to neuron n_e of layer l_e, n_s outer), then the biases of layer l_e.",
        "################################################################################",
        "# Col  Name       Description",
        "# 1    connection Neural network connection value.",
        "# 2    t          Connection type (a = weight, b = bias).",
        "# 3    index      Index enumerating weights.",
        "# 4    l_s        Starting point layer (end point layer for biases).",
        "# 5    n_s        Starting point neuron in starting layer (end point neuron for biases).",
        "# 6    l_e        End point layer.",
        "# 7    n_e        End point neuron in end layer.",
        "################################################################################",
    ]
    rows, idx = [], 0
    for l, (w, b) in enumerate(layers):
        n_in, n_out = w.shape
        for j in range(n_in):
            for k in range(n_out):
                idx += 1
                rows.append(f"{w[j, k]:24.16E} a {idx:9d} {l:5d} {j + 1:5d} {l + 1:5d} {k + 1:5d}")
        for k in range(n_out):
            idx += 1
            rows.append(f"{b[k]:24.16E} b {idx:9d} {l + 1:5d} {k + 1:5d}")
    return "\n".join(head + rows) + "\n"


def export_n2p2(
    model,
    directory: Union[str, Path],
    length_unit: Optional[str] = None,
    energy_unit: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as an n2p2 potential directory: ``input.nn``, ``scaling.data``,
    ``weights.XXX.data`` (XXX = atomic number) and ``README.md`` (units, conventions, how to use it).

    Args:
        model: a BPNN ``NeuralNetworkPotential`` (trained by the plugin, or loaded from n2p2/RuNNer);
            its energies are eV and lengths Å, any dtype (values are written from float64).
        directory: created if needed.
        length_unit, energy_unit: units of the files (``"Angstrom"``/``"Bohr"``, ``"eV"``/``"Hartree"``).
            Default: the units of the n2p2 directory the model was loaded from, else Å and eV.
        overwrite: replace an existing ``input.nn`` in ``directory``.

    Returns:
        ``directory`` as a Path.

    Raises:
        ValueError: not a BPNN, or an activation n2p2 does not have.
        FileExistsError: ``directory`` already holds an ``input.nn`` and ``overwrite`` is False.
    """
    from ase.data import atomic_numbers

    from ..__about__ import __version__
    from ..bpnn.cutoff import _NAMES as CUTOFF_NUMBERS

    rep, nets = _parts(model)
    src = getattr(model, "n2p2_source", None)
    L = length_unit or (src["length_unit"] if src else "Angstrom")
    U = energy_unit or (src["energy_unit"] if src else "eV")
    a, f = length_factor(L), energy_factor(U)  # Å per L, eV per U
    if src and (length_factor(src["length_unit"]) != a or energy_factor(src["energy_unit"]) != f):
        src = None  # other units: the file's own numbers no longer apply
    directory = Path(directory)
    if (directory / "input.nn").exists() and not overwrite:
        raise FileExistsError(f"{directory} already holds an input.nn (pass overwrite=True / --force)")
    directory.mkdir(parents=True, exist_ok=True)
    act = _ACTIVATION_LETTER.get(nets.activation)
    if act is None:
        raise ValueError(f"activation {nets.activation!r} has no n2p2 equivalent")
    ordered = rep.sf.angular_convention == "ordered"
    elements = sorted(rep.elements, key=lambda e: atomic_numbers[e])
    index = {e: n for n, e in enumerate(elements)}
    s_min, s_max = rep.scale_range
    ew = rep.scale_weight.detach().cpu().double().numpy()  # (E, W)
    eb = rep.scale_bias.detach().cpu().double().numpy()  # (E, W)
    scale = float(nets.energy_scale) / f  # network output -> file energy unit
    atom_e = nets.atom_energy.detach().cpu().double().numpy() / f  # (E,) file energy unit

    # -- energies: header and atom_energy lines ------------------------------------------------
    header: Optional[Tuple[float, float, float]] = None
    if src and src["normalised"] and _close(src["conv_energy"] * scale, 1.0):
        header = (src["mean_energy"], src["conv_energy"], src["conv_length"])
    elif not _close(scale, 1.0, 1e-15):
        header = (0.0, 1.0 / scale, 1.0)
    mean = header[0] if header else 0.0
    atom_lines = []
    for e in elements:
        value = atom_e[rep.elements.index(e)] - mean  # n2p2 atom_energy, file unit
        if src:
            known = src["atom_energy"].get(e, 0.0)
            if abs(value - known) <= 1e-12 * max(1.0, abs(value + mean)):
                value = known  # the file's own number (or no line)
        if value != 0.0:
            atom_lines.append(f"atom_energy {e} {_num(value)}")

    # -- symmetry functions, scaling and weights per element -------------------------------------
    per_element = []
    for e in elements:
        i = rep.elements.index(e)
        n = rep.n_features[i]
        lines = _function_lines(rep, e, a)
        own = _source_tokens(src, e, lines)
        perm = list(range(n)) if own else _n2p2_order(lines, index)
        factor = np.array([2.0 if (ordered and lines[k][2]) else 1.0 for k in range(n)])
        w, b = ew[i, :n] * factor, eb[i, :n]  # s = w * G_n2p2 + b
        stats = src["statistics"][index[e]] if (own and src["statistics"] is not None) else None
        per_element.append((e, i, n, own or [t for t, _, _ in lines], perm, w, b, stats, bool(own)))
    # the file's own statistics and scaling type only if they still give the model's scaling everywhere
    use_src = bool(src) and all(own and _statistics_match(stats, src["scaling"], s_min, s_max, w, b)
                                for _, _, _, _, _, w, b, stats, own in per_element)
    scaling_type = src["scaling"] if use_src else "scale"
    sf_lines, scaling_rows, weights = [], [], {}
    for e, i, n, tokens, perm, w, b, stats, _ in per_element:
        layers = _linear_layers(nets.networks[i])
        if not use_src:
            flat = w == 0.0
            g_min = np.where(flat, 0.0, (s_min - b) / np.where(flat, 1.0, w))
            g_max = g_min + np.where(flat, s_max - s_min, (s_max - s_min) / np.where(flat, 1.0, w))
            if flat.any():  # constant input b_j: into the first-layer biases, weights of that input zero
                w1, b1 = layers[0]
                b1 = b1 + (b[flat][:, None] * w1[flat]).sum(0)
                w1 = w1.copy()
                w1[flat] = 0.0
                layers[0] = (w1, b1)
            stats = np.stack([g_min, g_max, 0.5 * (g_min + g_max), np.full(n, np.nan)], 1)
        w1, b1 = layers[0]
        layers[0] = (w1[perm], b1)
        if stats is None:  # no scaling at all: n2p2 still reads one (unused) row per function
            stats = np.tile([0.0, 1.0, 0.5, np.nan], (n, 1))
        for k, p in enumerate(perm, 1):
            mn, mx, mu, sg = stats[p]
            row = f"{index[e] + 1:10d} {k:10d} {mn:24.16E} {mx:24.16E} {mu:24.16E}"
            scaling_rows.append(row + ("" if math.isnan(sg) else f" {sg:24.16E}"))
        sf_lines += ["symfunction_short " + " ".join(tokens[p]) for p in perm]
        weights[e] = layers

    kind = rep.sf.cutoff_fn.kind
    alpha = rep.sf.cutoff_fn.alpha
    nodes = nets.n_hidden
    text = [
        "################################################################################",
        f"# n2p2 potential written by ekf-plugin {__version__} (export_n2p2).",
        f"# Units: lengths {L}, energies {U} (forces {U}/{L}); symmetry-function eta in {L}^-2, rs and rc in {L}.",
        f"# Cutoff: type {CUTOFF_NUMBERS[kind]} ({kind}), rc = {float(rep.cutoff) / a!r} {L}"
        + (f", inner radius alpha = {alpha}" if alpha else "") + ".",
        "# Angular functions: each unordered neighbour pair once (n2p2). The model's convention was "
        f"'{rep.sf.angular_convention}'" + ("; same-element G3 scaling rows halved to match." if ordered else "."),
        f"# Scaling: {scaling_type}, S_min {s_min!r}, S_max {s_max!r}; energy: E = sum_i [NN_i / conv_energy"
        " + mean_energy + atom_energy(e_i)] (no header: conv_energy 1, mean_energy 0).",
        f"{UNITS_MARKER} length={L} energy={U}",
        "################################################################################",
    ]
    if header:
        text += [f"mean_energy {header[0]:24.16E}", f"conv_energy {header[1]:24.16E}", f"conv_length {header[2]:24.16E}"]
    text += [f"number_of_elements {len(elements)}", "elements " + " ".join(elements)] + atom_lines
    text.append(f"cutoff_type {CUTOFF_NUMBERS[kind]}" + (f" {_num(alpha)}" if alpha else ""))
    if scaling_type in ("scale", "scalecenter"):
        text.append("scale_symmetry_functions")
    if scaling_type in ("center", "scalecenter"):
        text.append("center_symmetry_functions")
    if scaling_type == "scalesigma":
        text.append("scale_symmetry_functions_sigma")
    text += [f"scale_min_short {_num(s_min)}", f"scale_max_short {_num(s_max)}",
             f"global_hidden_layers_short {len(nodes)}", "global_nodes_short " + " ".join(str(x) for x in nodes),
             "global_activation_short " + " ".join([act] * len(nodes) + ["l"])]
    text += sf_lines
    (directory / "input.nn").write_text("\n".join(text) + "\n")

    scaling_head = [
        "################################################################################",
        "# Symmetry function scaling data (ekf-plugin export_n2p2), per element (by atomic number) in",
        "# input.nn's sorted order. Values of the functions are dimensionless (unit-independent).",
        "# Col 1 e_index, 2 sf_index, 3 sf_min, 4 sf_max, 5 sf_mean, 6 sf_sigma (if known)."
        + ("" if use_src else " Here sf_mean is the midpoint of [sf_min, sf_max], not a data statistic."),
        "################################################################################",
    ]
    (directory / "scaling.data").write_text("\n".join(scaling_head + scaling_rows) + "\n")
    for e, layers in weights.items():
        z = atomic_numbers[e]
        (directory / f"weights.{z:03d}.data").write_text(_weights_text(layers, e, z))

    cflength, cfenergy = 1.0 / a, 1.0 / f  # LAMMPS metal (Å, eV) -> file units
    (directory / "README.md").write_text(
        f"# n2p2 potential exported by ekf-plugin {__version__}\n\n"
        f"Units of every file here: **lengths {L}, energies {U}** (forces {U}/{L}); symmetry-function\n"
        f"η in {L}⁻², r_s and r_c in {L}. Elements: {' '.join(elements)}; cutoff {float(rep.cutoff):.10g} Å.\n\n"
        f"* Load back: `ekf_plugin.n2p2.load_n2p2_potential(dir)` (reads the units line of input.nn) or\n"
        f"  `load_n2p2_potential(dir, length_unit=\"{L}\", energy_unit=\"{U}\")`.\n"
        f"* n2p2 (`nnp-predict`, `nnp-dataset`): give `input.data` in {L} and {U}.\n"
        f"* LAMMPS, `units metal` (Å, eV): `pair_style hdnnp {float(rep.cutoff):.10g} dir {directory.name}"
        f" cflength {cflength!r} cfenergy {cfenergy!r}`\n"
        f"  then `pair_coeff * * {' '.join(elements)}` (LAMMPS types in that order); see docs/lammps.md.\n\n"
        "Conventions: n2p2 angular pair counting (each unordered neighbour pair once), n2p2 symmetry-function\n"
        "order, min/max scaling as in input.nn's header comment, weights in n2p2 order.\n"
    )
    return directory


def _statistics_match(stats: np.ndarray, scaling: str, s_min: float, s_max: float, w: np.ndarray, b: np.ndarray) -> bool:
    """Do the loaded statistics still give the model's scaling (w, b)? (then they are written verbatim)"""
    if stats is None:
        return scaling == "none" and bool(np.all(w == 1.0) and np.all(b == 0.0))
    g_min, g_max, g_mean, g_sigma = stats.T
    with np.errstate(divide="ignore", invalid="ignore"):
        if scaling in ("scale", "scalecenter"):
            span = g_max - g_min
            flat = np.abs(span) <= 1e-12 * np.maximum(np.abs(g_max), 1.0)
            ww = np.where(flat, 0.0, (s_max - s_min) / np.where(flat, 1.0, span))
            bb = np.where(flat, 0.5 * (s_min + s_max), s_min - ww * (g_min if scaling == "scale" else g_mean))
        elif scaling == "center":
            ww, bb = np.ones_like(w), -g_mean
        elif scaling == "scalesigma":
            ww = (s_max - s_min) / g_sigma
            bb = s_min - ww * g_mean
        else:
            ww, bb = np.ones_like(w), np.zeros_like(b)
    return bool(np.allclose(ww, w, rtol=1e-12, atol=0) and np.allclose(bb, b, rtol=1e-12, atol=1e-14))


def write_input_data(frames: Sequence, path: Union[str, Path], length_unit: str = "Bohr", energy_unit: str = "Hartree",
                     with_labels: bool = True) -> Path:
    """Write ASE ``Atoms`` (Å; energy eV, forces eV/Å from their calculator if ``with_labels``) as n2p2
    ``input.data`` in ``length_unit``/``energy_unit``. Frames without labels get energy 0 and zero forces."""
    a, f = length_factor(length_unit), energy_factor(energy_unit)
    out = []
    for n, atoms in enumerate(frames):
        energy, forces = 0.0, np.zeros((len(atoms), 3))
        if with_labels and atoms.calc is not None:
            energy, forces = atoms.get_potential_energy() / f, atoms.get_forces() / (f / a)
        out += ["begin", f"comment frame {n} written by ekf-plugin ({length_unit}, {energy_unit})"]
        if atoms.pbc.any():
            if not atoms.pbc.all():
                raise ValueError("n2p2 input.data needs fully periodic or non-periodic structures")
            out += ["lattice " + " ".join(f"{x:24.16E}" for x in v / a) for v in atoms.cell.array]
        for s, r, fr in zip(atoms.get_chemical_symbols(), atoms.positions / a, forces):
            out.append("atom " + " ".join(f"{x:24.16E}" for x in r) + f" {s} 0.0 0.0 " + " ".join(f"{x:24.16E}" for x in fr))
        out += [f"energy {energy:24.16E}", "charge 0.0", "end"]
    path = Path(path)
    path.write_text("\n".join(out) + "\n")
    return path
