"""Save and load BPNN models; helpers for any model the plugin can load.

Our export format is a ``torch.save``d dict ``{"format", "config" (JSON text), "state_dict"}``
that loads with ``torch.load(weights_only=True)``. :func:`load_model` also accepts SchNetPack
``best_model`` files (pickled whole models) and n2p2/RuNNer potential directories. Nothing here runs
code from a file: our format loads with ``weights_only=True`` only; ``best_model`` pickles load with
``weights_only=True`` and a scoped allow-list of SchNetPack/ekf-plugin classes
(:func:`model_safe_globals`), or, for classes outside it, only with ``trust_pickle=True``.
Loaded models compute ``energy`` (eV), ``forces`` (eV/Å) and, by default, ``stress`` (eV/Å³, periodic
cells only).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

import ekf_plugin.compat  # noqa: F401
from ekf_plugin.bpnn import BehlerParrinello, ElementNetworks

from .builders import bpnn_potential, function_records

FORMAT = "ekf_plugin.bpnn/1"


class ModelLoadError(ValueError):
    """A model file cannot be loaded: missing, empty, truncated, not a model, or not trusted."""


class UntrustedModelError(ModelLoadError):
    """A pickled model needs classes or functions outside the allow-list (see :func:`read_model_file`)."""


# Callables a pickled SchNetPack model references besides its module classes (weight-init functions and
# activations stored as attributes). Calling any of them during unpickling only computes on tensors.
_ALLOWED_FUNCTIONS = {
    "torch.nn.init": ("uniform_", "normal_", "constant_", "ones_", "zeros_", "eye_", "xavier_uniform_",
                      "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "trunc_normal_"),
    "torch.nn.functional": ("relu", "silu", "gelu", "elu", "celu", "selu", "softplus", "sigmoid", "tanh",
                            "leaky_relu", "mish", "hardtanh", "softsign", "tanhshrink", "logsigmoid"),
    "torch": ("tanh", "sigmoid", "relu", "exp", "sin", "cos"),
    "schnetpack.nn.activations": ("shifted_softplus", "softplus_inverse"),
}
# Module classes of these packages may be rebuilt (their __init__/__setstate__ only set up tensors).
_ALLOWED_MODULE_PREFIXES = ("torch.nn.modules.", "schnetpack.model.", "schnetpack.atomistic.", "schnetpack.nn.",
                            "schnetpack.representation.", "schnetpack.transform.")
_DENIED = ("schnetpack.transform.neighborlist.CachedNeighborList",)  # writes a cache directory


def _subclasses(cls: type) -> set:
    out, todo = set(), [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.add(sub)
                todo.append(sub)
    return out


def model_safe_globals() -> List[Any]:
    """The allow-list for pickled SchNetPack models (``best_model``): ``nn.Module`` classes of torch.nn and of
    SchNetPack's model/atomistic/nn/representation/transform packages, every class defined in ekf-plugin's
    BPNN package (modules, symmetry-function records, cached constants) and ``ContiguousForces``, and the
    init/activation functions above. Used only inside ``torch.serialization.safe_globals`` around one
    ``torch.load(weights_only=True)``; nothing global."""
    import importlib
    import pkgutil
    import sys

    import schnetpack  # noqa: F401  - registers SchNetPack's module classes

    import ekf_plugin.bpnn
    from ekf_plugin.compat import ContiguousForces

    allowed: List[Any] = [ContiguousForces]
    for info in pkgutil.iter_modules(ekf_plugin.bpnn.__path__, "ekf_plugin.bpnn."):
        importlib.import_module(info.name)
    for name, module in list(sys.modules.items()):
        if name == "ekf_plugin.bpnn" or name.startswith("ekf_plugin.bpnn."):
            allowed.extend(v for v in vars(module).values() if isinstance(v, type) and v.__module__ == name)
    for cls in _subclasses(torch.nn.Module):
        name = f"{cls.__module__}.{cls.__qualname__}"
        if cls.__module__.startswith(_ALLOWED_MODULE_PREFIXES) and "<locals>" not in name and name not in _DENIED:
            allowed.append(cls)
    for module, names in _ALLOWED_FUNCTIONS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        allowed.extend(getattr(mod, n) for n in names if hasattr(mod, n))
    return list(dict.fromkeys(allowed))


def _is_refused_global(exc: BaseException) -> bool:
    return isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc)


def _refused_name(exc: BaseException) -> str:
    import re

    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    return m.group(1) if m else "a global"


def read_model_file(path: Union[str, Path], trust_pickle: bool = False) -> Any:
    """``torch.load`` a model file safely.

    1. ``weights_only=True`` (our format and plain state dicts);
    2. ``weights_only=True`` inside ``torch.serialization.safe_globals(model_safe_globals())``
       (SchNetPack ``best_model`` files of known classes; the allow-list is scoped to this call);
    3. only with ``trust_pickle=True``: ``weights_only=False`` (a pickle can run any code: your own files only).

    Raises:
        FileNotFoundError: no such file.
        UntrustedModelError: a pickle that needs more than the allow-list, without ``trust_pickle``.
        ModelLoadError: empty, truncated or not a torch file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file {path} is empty (0 bytes)")

    def load(**kw):
        try:
            return torch.load(path, map_location="cpu", **kw)
        except pickle.UnpicklingError as exc:
            if _is_refused_global(exc):
                raise
            raise ModelLoadError(f"model file {path} is not a readable torch file ({_first_line(exc)})") from None
        except (EOFError, RuntimeError, OSError, ValueError, AttributeError, ImportError, KeyError) as exc:
            raise ModelLoadError(f"model file {path} is truncated or not a torch file "
                                 f"({type(exc).__name__}: {_first_line(exc)})") from None

    try:
        return load(weights_only=True)
    except pickle.UnpicklingError:
        pass
    try:
        with torch.serialization.safe_globals(model_safe_globals()):
            return load(weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UntrustedModelError(
                f"{path} is a pickled model that needs {_refused_name(exc)}, which is not on ekf-plugin's "
                "allow-list of SchNetPack/ekf-plugin classes; loading it could run code from the file. If you "
                "trust it, pass trust_pickle=True (CLI: --trust-model)"
            ) from None
    return load(weights_only=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


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
               dtype: Optional[torch.dtype] = None, stress: bool = True, trust_pickle: bool = False):
    """Load any model the plugin knows, as a ``NeuralNetworkPotential`` in eval mode.

    Args:
        path: our saved file (:func:`save_model`, read with ``weights_only=True`` only), an ``spktrain``
            ``best_model`` file (read through the allow-list of :func:`model_safe_globals`), or an
            n2p2/RuNNer potential directory (``input.nn``, ``scaling.data``, ``weights.*.data``).
        device: target device (default: CPU).
        dtype: e.g. ``torch.float64`` (default: as saved; n2p2 potentials load in float64).
        stress: enable stress output (eV/Å³) if the model has a forces module.
        trust_pickle: allow a full unpickle (``weights_only=False``) of a ``best_model`` that needs classes
            outside the allow-list. A pickle can run any code: only for files you trust.

    Raises:
        FileNotFoundError: nothing at ``path``.
        UntrustedModelError: a pickle outside the allow-list without ``trust_pickle``.
        ModelLoadError: empty, truncated, unreadable or not a model.
    """
    path = Path(path)
    if path.is_dir():
        from ekf_plugin.n2p2 import load_n2p2_potential

        model = load_n2p2_potential(path)
    else:
        obj = read_model_file(path, trust_pickle=trust_pickle)
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            model = _from_export(path, obj)
        elif isinstance(obj, torch.nn.Module):
            model = obj
        else:
            raise ModelLoadError(f"{path} is neither an ekf-plugin model file ({FORMAT}), a SchNetPack model "
                                 "nor an n2p2 directory")
    if stress:
        enable_stress(model)
    if dtype is not None:
        model = model.to(dtype)
        if hasattr(model, "input_dtype_str"):
            model.input_dtype_str = "float64" if dtype == torch.float64 else "float32"
    return model.to(device if device is not None else "cpu").eval()


def _from_export(path: Path, obj: Dict[str, Any]):
    """Rebuild a model of our export format (checked: JSON config, tensors only)."""
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: the state_dict of this {FORMAT} file is missing or holds non-tensors")
    try:
        config = json.loads(obj["config"])
        floats = [v for v in state.values() if v.is_floating_point()]
        model = build_from_config(config, dtype=floats[0].dtype if floats else torch.float32)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: broken {FORMAT} file ({type(exc).__name__}: {_first_line(exc)})") from None
    return model


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
