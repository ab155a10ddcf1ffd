"""Save and load BPNN models; helpers for any model the plugin can load.

Our export format is a ``torch.save``d dict ``{"format", "config" (JSON text), "state_dict"}``
that loads with ``torch.load(weights_only=True)``. :func:`load_model` also accepts SchNetPack
``best_model`` files (pickled whole models: load only files you trust) and n2p2/RuNNer potential
directories. Loaded models compute ``energy`` (eV), ``forces`` (eV/Å) and, by default, ``stress``
(eV/Å³, periodic cells only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

import ekf_plugin.compat  # noqa: F401
from ekf_plugin.bpnn import BehlerParrinello, ElementNetworks

from .builders import bpnn_potential, function_records

FORMAT = "ekf_plugin.bpnn/1"


def _parts(model):
    rep = getattr(model, "representation", None)
    nets = [m for m in getattr(model, "output_modules", []) if isinstance(m, ElementNetworks)]
    if not isinstance(rep, BehlerParrinello) or len(nets) != 1:
        raise ValueError("not a BPNN model (needs a BehlerParrinello representation and one ElementNetworks output)")
    return rep, nets[0]


def model_config(model) -> Dict[str, Any]:
    """JSON-able description of a BPNN ``NeuralNetworkPotential`` (lengths in Å, energies in eV)."""
    import schnetpack as spk

    rep, nets = _parts(model)
    forces = [m for m in model.output_modules if isinstance(m, spk.atomistic.Forces)]
    return {
        "elements": rep.elements,
        "symmetry_functions": function_records(rep),
        "cutoff": float(rep.cutoff),
        "cutoff_type": rep.sf.cutoff_fn.kind,
        "cutoff_alpha": rep.sf.cutoff_fn.alpha,
        "angular_convention": rep.sf.angular_convention,
        "scale_range": list(rep.scale_range),
        "n_hidden": nets.n_hidden,
        "activation": nets.activation,
        "output_key": nets.output_key,
        "forces": bool(forces and forces[0].calc_forces),
        "stress": any(isinstance(m, spk.atomistic.Strain) for m in model.input_modules),
    }


def build_from_config(config: Dict[str, Any], dtype: torch.dtype = torch.float32):
    """Inverse of :func:`model_config` (untrained weights)."""
    rep = BehlerParrinello(
        config["elements"], config["symmetry_functions"], config["cutoff"], config["cutoff_type"],
        config.get("cutoff_alpha", 0.0), angular_convention=config.get("angular_convention", "n2p2"),
        scale_range=tuple(config.get("scale_range", (-1.0, 1.0))),
    )
    nets = ElementNetworks(rep.elements, rep.n_features, config["n_hidden"], config.get("activation", "tanh"),
                           output_key=config.get("output_key", "energy"))
    return bpnn_potential(rep, nets, forces=config.get("forces", True), stress=config.get("stress", True), dtype=dtype)


def save_model(model, path: Union[str, Path]) -> Path:
    """Write a BPNN model in our format (state_dict + JSON config; loads with ``weights_only=True``)."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "config": json.dumps(model_config(model)), "state_dict": state}, path)
    return path


def enable_stress(model):
    """Make ``model`` compute stress (inserts ``Strain`` first, sets ``calc_stress``) if it can."""
    import schnetpack as spk

    forces = [m for m in model.output_modules if isinstance(m, spk.atomistic.Forces)]
    if forces and not forces[0].calc_stress:
        spk.md.utils.activate_model_stress(model, forces[0].stress_key)
    return model


def load_model(path: Union[str, Path], device: Optional[Union[str, torch.device]] = None,
               dtype: Optional[torch.dtype] = None, stress: bool = True):
    """Load any model the plugin knows, as a ``NeuralNetworkPotential`` in eval mode.

    Args:
        path: our saved file (:func:`save_model`), an ``spktrain`` ``best_model`` file, or an
            n2p2/RuNNer potential directory (``input.nn``, ``scaling.data``, ``weights.*.data``).
        device: target device (default: CPU).
        dtype: e.g. ``torch.float64`` (default: as saved; n2p2 potentials load in float64).
        stress: enable stress output (eV/Å³) if the model has a forces module.
    """
    path = Path(path)
    if path.is_dir():
        from ekf_plugin.n2p2 import load_n2p2_potential

        model = load_n2p2_potential(path)
    elif not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # pickled whole model (spktrain best_model)
            obj = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            state = obj["state_dict"]
            some = next(iter(v for v in state.values() if v.is_floating_point()))
            model = build_from_config(json.loads(obj["config"]), dtype=some.dtype)
            model.load_state_dict(state)
        elif isinstance(obj, torch.nn.Module):
            model = obj
        else:
            raise ValueError(f"{path} is neither an ekf-plugin model file, a SchNetPack model nor an n2p2 directory")
    if stress:
        enable_stress(model)
    if dtype is not None:
        model = model.to(dtype)
        if hasattr(model, "input_dtype_str"):
            model.input_dtype_str = "float64" if dtype == torch.float64 else "float32"
    return model.to(device if device is not None else "cpu").eval()


def model_cutoff(model) -> float:
    """Neighbour-list cutoff of ``model`` in Å (the representation's ``cutoff``)."""
    rep = getattr(model, "representation", None)
    cutoff = getattr(rep, "cutoff", None)
    if cutoff is None:
        raise ValueError("model has no representation.cutoff")
    return float(cutoff)


def model_elements(model) -> List[int]:
    """Atomic numbers the model was built for (BPNN: its element list, in model order)."""
    from ase.data import atomic_numbers

    rep = getattr(model, "representation", None)
    if isinstance(rep, BehlerParrinello):
        return [atomic_numbers[e] for e in rep.elements]
    raise ValueError("model_elements needs a BPNN model (other representations accept any element)")
