"""Write a RuNNer-dialect copy of an n2p2 potential (for the loader's RuNNer tests).

The copy predicts the same energies and forces as the n2p2 original, in the same units (Bohr,
Hartree), but is written the way RuNNer writes potentials:

* ``input.nn`` with ``!`` comments (also after values), RuNNer-only keywords (``runner_mode``,
  ``nn_type_short``, ``use_short_nn``), elements listed as ``O H`` (not by atomic number);
* ``scaling.data`` with five columns (element, index, min, max, mean; no σ) and a trailing line of
  two numbers (per-atom energy range);
* ``weights.XXX.data`` with one number per line;
* **no energy normalisation**: n2p2's E = Σ_i [NN_i / conv_energy + mean_energy] is folded into the
  output layer (weights / conv_energy, bias / conv_energy + mean_energy − atom_energy), so the output
  biases are tens of Hartree. ``conv_length`` needs no folding: n2p2 keeps ``input.nn``'s
  symmetry-function parameters in physical units (it converts them internally together with the
  positions), and the functions are dimensionless, so η, r_s and r_c are written unchanged;
* optionally another scaling type, folded exactly into the first layer: ``"scalecenter"`` (the
  original: (G − mean)/(max − min) with the default range 0..1), ``"center"`` (G − mean; first-layer
  weights divided by max − min) or ``"none"`` (G; first-layer bias absorbs the mean).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ekf_plugin.n2p2.reader import _network_layout, _normalisation, parse_input_nn, read_scaling, read_weights

FREE_ATOM_HA = {"H": -0.45890771, "O": -74.94518524}  # n2p2-h2o-rpbe-d3 SOURCE.md (FHI-aims, Ha)


def _layers(values: np.ndarray, sizes):
    out, pos = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        w = values[pos : pos + n_in * n_out].reshape(n_in, n_out).copy()
        pos += n_in * n_out
        b = values[pos : pos + n_out].copy()
        pos += n_out
        out.append([w, b])
    assert pos == values.size
    return out


def write_runner_copy(
    src: Path,
    dst: Path,
    scaling: str = "scalecenter",
    atom_energies: Optional[Dict[str, float]] = None,
    range_keywords: str = "absent",
) -> Path:
    """Write the RuNNer-dialect copy of the n2p2 potential in ``src`` into ``dst`` (Bohr, Hartree).

    Args:
        scaling: ``"scalecenter"``, ``"center"`` or ``"none"`` (module docstring).
        atom_energies: {element: Ha} written as ``atom_energy`` lines with ``remove_atom_energies``
            (subtracted from the folded output bias), or ``None`` (the networks give total energies).
        range_keywords: ``"absent"`` (scale_min_short/scale_max_short left out: defaults 0/1) or
            ``"runner"`` (RuNNer's ``scale_min_short_atomic 0.0`` / ``scale_max_short_atomic 1.0``).
    """
    dst.mkdir(parents=True, exist_ok=True)
    s = parse_input_nn(src / "input.nn")
    elements = ["H", "O"]
    assert sorted(s["elements"]) == elements
    mean_energy, conv_energy, _ = _normalisation(s)
    assert float(s["scale_min_short"][0]) == 0.0 and float(s["scale_max_short"][0]) == 1.0
    nodes, _ = _network_layout(s)
    stats = read_scaling(src / "scaling.data", 2)
    n_sf = {e: stats[i].shape[0] for i, e in enumerate(elements)}
    for i, e in enumerate(elements):
        g_min, g_max, g_mean = stats[i][:, 0], stats[i][:, 1], stats[i][:, 2]
        span = g_max - g_min
        layers = _layers(read_weights(src / f"weights.{ {'H': 1, 'O': 8}[e]:03d}.data"), [n_sf[e], *nodes, 1])
        w_out, b_out = layers[-1]
        offset = mean_energy - (atom_energies[e] if atom_energies else 0.0)
        layers[-1] = [w_out / conv_energy, b_out / conv_energy + offset]
        w1, b1 = layers[0]
        if scaling == "center":
            layers[0] = [w1 / span[:, None], b1]
        elif scaling == "none":
            layers[0] = [w1 / span[:, None], b1 - ((g_mean / span)[:, None] * w1).sum(0)]
        elif scaling != "scalecenter":
            raise ValueError(scaling)
        values = np.concatenate([np.concatenate([w.ravel(), b]) for w, b in layers])
        z = {"H": 1, "O": 8}[e]
        (dst / f"weights.{z:03d}.data").write_text("".join(f"{v:24.16E}\n" for v in values))
    rows = []
    for i, e in enumerate(elements):
        for k, (mn, mx, mu, _) in enumerate(stats[i], 1):
            rows.append(f"{i + 1:4d} {k:4d} {mn:24.16E} {mx:24.16E} {mu:24.16E}\n")
    rows.append(f"{-25.6:24.16E} {-25.4:24.16E}\n")  # RuNNer: per-atom energy range of the training set
    (dst / "scaling.data").write_text("".join(rows))
    lines = [
        "! RuNNer-dialect copy written by tests/n2p2/_runner.py (energies Hartree, lengths Bohr)",
        "runner_mode 3                 ! prediction mode",
        "nn_type_short 1               ! atomic networks",
        "use_short_nn",
        "number_of_elements 2          ! two elements",
        "elements O H                  ! deliberately not ordered by atomic number",
        "cutoff_type 2                 ! tanh^3(1 - r/rc)",
    ]
    if scaling == "scalecenter":
        lines += ["scale_symmetry_functions      ! min/max", "center_symmetry_functions     ! mean instead of min"]
    elif scaling == "center":
        lines += ["center_symmetry_functions     ! G - mean only"]
    if range_keywords == "runner":
        lines += ["scale_min_short_atomic 0.0    ! RuNNer's name", "scale_max_short_atomic 1.0"]
    if atom_energies:
        lines.append("remove_atom_energies          ! use the atom_energy lines")
        lines += [f"atom_energy {e} {v:.10f}  ! free atom" for e, v in atom_energies.items()]
    lines += [
        "global_hidden_layers_short 2",
        "global_nodes_short " + " ".join(str(n) for n in nodes) + " ! nodes",
        "global_activation_short t t l ! tanh, tanh, linear",
    ]
    for sf in s["symfunction_short"]:
        lines.append("symfunction_short " + " ".join(sf) + "  ! central_atom type neighbour(s) parameters")
    (dst / "input.nn").write_text("\n".join(lines) + "\n")
    return dst
