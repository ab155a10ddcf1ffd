"""The EKF's weight covariance P kept with a model: extract it, save it, load it safely.

The Kalman filter carries P ≈ Cov(w), the covariance of the weights given the labels seen (the study's
Eq. 2 reads it as the inverse Fisher information). :class:`Covariance` holds it together with what is
needed to use it on a model later:

* ``P``: the filter's blocks (full symmetric matrices, one per contiguous column range ``blocks`` of the
  flat weight vector; one block = the dense filter, several = the block-diagonal approximation the
  block-decoupled filter itself uses);
* ``names``/``shapes``: the model parameters in P's column order (``model.named_parameters()`` names);
* ``weights`` (n,) float64: the weights P belongs to (checked against the model it is used with);
* ``noise`` r of the filter's R = r·I (1/η, or λ with fading memory) in the units of its error vector ξ,
  and ``label_weights`` (c_E in eV⁻², c_F in Å²/eV², the force components per update, energy per atom)
  when ξ = √(c/n)(ŷ − y) was scaled as in ``task=ekf_paper``: then the raw label noise R implies is
  r·n/c (eV² for a total energy, (eV/Å)² for a force component).

File format (``<model>.cov.pt`` beside the model file, see :func:`default_path`): a ``torch.save``d dict of
tensors, numbers, strings and lists only, read with ``torch.load(weights_only=True)`` and no allow-list,
so loading it never runs code from the file. P is stored as full blocks in float64 (default) or float32
(half the size: 32 MB instead of 64 MB for the water BPNN's 2827 weights); loading casts to the dtype
asked for (float64 by default). The model file itself does not change and loads without it.

Sources: :func:`covariance_from_optimizer` (an :class:`~ekf_plugin.optim.EKF` in memory) and
:func:`covariance_from_checkpoint` (a Lightning checkpoint written by ``spktrain`` with ``task=ekf_paper``
or ``task=ekf``: ``checkpoint["optimizer_states"][0]["state"]["ekf"]``). Checkpoints also pickle the
training configuration (omegaconf, torchmetrics, SchNetPack task objects); :func:`read_checkpoint` loads
them with ``weights_only=True`` and replaces every class or function the file names by an inert
placeholder, so no code from the file runs and nothing from it is imported.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "FORMAT", "Covariance", "CovarianceError", "CovarianceMismatchError", "covariance_from_optimizer",
    "covariance_from_checkpoint", "read_checkpoint", "save_covariance", "load_covariance", "default_path",
    "checkpoint_model_state",
]

FORMAT = "ekf_plugin.covariance/1"
SUFFIX = ".cov.pt"
PathLike = Union[str, os.PathLike]


class CovarianceError(ValueError):
    """A covariance file or checkpoint cannot be used: missing, not ours, broken, or holds no EKF state."""


class CovarianceMismatchError(CovarianceError):
    """The covariance belongs to other parameters or other weights than the model it is used with."""


def default_path(model_path: PathLike) -> Path:
    """Where the covariance of the model file ``model_path`` lives: ``<model_path>.cov.pt`` beside it
    (for an n2p2 directory: ``<dir>/covariance.cov.pt``)."""
    p = Path(model_path)
    return p / ("covariance" + SUFFIX) if p.is_dir() else p.with_name(p.name + SUFFIX)


@dataclass
class Covariance:
    """The EKF covariance P of a model's weights (see the module docstring).

    Attributes:
        P: blocks, each (n_b, n_b) symmetric, n_b = stop − start of the matching ``blocks`` entry.
        blocks: contiguous column ranges ``(start, stop)`` of the flat weight vector, covering [0, n).
        names: parameter names (``model.named_parameters()``) in P's column order.
        shapes: their shapes.
        weights: (n,) float64, the flat weights P belongs to.
        noise: r of R = r·I in the units of the filter's ξ (1/η, or λ with fading memory).
        label_weights: ``{"c_energy" [eV⁻²], "c_forces" [Å²/eV²], "n_force_components", "energy_per_atom"}``
            when ξ = √(c/n)(ŷ − y) (``task=ekf_paper``), else None (ξ = ŷ − y).
        step: accepted filter updates behind P.
        source: where it came from (text).
    """

    P: List[torch.Tensor]
    blocks: List[Tuple[int, int]]
    names: List[str]
    shapes: List[Tuple[int, ...]]
    weights: torch.Tensor
    noise: float
    label_weights: Optional[Dict[str, Any]] = None
    step: int = 0
    source: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.blocks = [(int(a), int(b)) for a, b in self.blocks]
        self.shapes = [tuple(int(s) for s in sh) for sh in self.shapes]
        n = sum(math.prod(s) for s in self.shapes)
        pos = 0
        for (a, b), Pb in zip(self.blocks, self.P):
            if a != pos or b <= a or tuple(Pb.shape) != (b - a, b - a):
                raise CovarianceError(f"covariance blocks {self.blocks[:4]}… do not tile the weights with the P blocks "
                                      f"{[tuple(p.shape) for p in self.P][:4]}…")
            pos = b
        if len(self.P) != len(self.blocks) or pos != n or len(self.names) != len(self.shapes):
            raise CovarianceError(f"covariance of {pos} columns for {n} weights in {len(self.names)} parameters")
        if self.weights.numel() != n:
            raise CovarianceError(f"covariance holds {self.weights.numel()} weights for {n} columns")
        if not (self.noise > 0 and math.isfinite(self.noise)):
            raise CovarianceError(f"covariance noise r must be a finite number > 0, got {self.noise}")

    # ---------------------------------------------------------------- properties
    @property
    def n(self) -> int:
        """Number of weights (columns of P)."""
        return int(self.weights.numel())

    @property
    def dense(self) -> bool:
        """True for a single block (the full covariance), False for the block-diagonal approximation."""
        return len(self.blocks) == 1

    @property
    def dtype(self) -> torch.dtype:
        return self.P[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the P blocks in memory."""
        return sum(p.numel() * p.element_size() for p in self.P)

    def to(self, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None) -> "Covariance":
        """This covariance with P moved/cast (``weights`` stay float64)."""
        P = [p.to(device=device, dtype=dtype or p.dtype) for p in self.P]
        return Covariance(P, self.blocks, self.names, self.shapes, self.weights.to(device=device), self.noise,
                          self.label_weights, self.step, self.source, dict(self.meta))

    def full(self) -> torch.Tensor:
        """Dense P (n, n) (zeros between blocks); costs n² memory, for analysis and tests."""
        out = self.P[0].new_zeros(self.n, self.n)
        for (a, b), Pb in zip(self.blocks, self.P):
            out[a:b, a:b] = Pb
        return out

    def label_noise(self, kind: str = "energy", n_atoms: int = 1) -> float:
        """Variance the filter's R = r·I implies for one raw label: eV² for ``"energy"`` (the total energy of
        a structure of ``n_atoms`` atoms), (eV/Å)² for ``"force"`` (one Cartesian component).

        With ``label_weights`` (ξ = √(c/n)(ŷ − y)): r/c_E for E (N²·r/c_E when the labels were E/N),
        r·k/c_F for a force component (k = force components per update); without: r in the label's units.
        """
        if kind not in ("energy", "force"):
            raise ValueError(f"kind must be 'energy' or 'force', got {kind!r}")
        lw = self.label_weights
        if not lw:
            return float(self.noise)
        if lw.get("label_mode") == "reduced":
            raise ValueError("this P was trained on reduced rows (task=ekf: group means of |ΔE| and |ΔF|), so R implies "
                             "no noise for single labels: use the epistemic σ (include_noise=False)")
        if kind == "energy":
            var = self.noise / float(lw["c_energy"])
            return var * n_atoms**2 if lw.get("energy_per_atom") else var
        return self.noise * float(lw.get("n_force_components", 1)) / float(lw["c_forces"])

    # ---------------------------------------------------------------- model binding
    def parameters_of(self, model: torch.nn.Module) -> List[torch.Tensor]:
        """The parameters of ``model`` in P's column order (by name).

        Raises:
            CovarianceMismatchError: a name is missing or a shape differs.
        """
        named = dict(model.named_parameters())
        out = []
        for name, shape in zip(self.names, self.shapes):
            p = named.get(name)
            if p is None:
                raise CovarianceMismatchError(f"the covariance is for a parameter {name!r} that the model does not have "
                                              f"(model parameters: {', '.join(list(named)[:4])}, …)")
            if tuple(p.shape) != shape:
                raise CovarianceMismatchError(f"parameter {name!r} has shape {tuple(p.shape)} in the model but {shape} "
                                              "in the covariance")
            out.append(p)
        return out

    def check_weights(self, model: torch.nn.Module, rtol: float = 1e-6) -> float:
        """Largest abs(w_model − w_P) relative to max abs(w_P); raises :class:`CovarianceMismatchError` above ``rtol``
        (P was saved for other weights, e.g. ``last.ckpt``'s P against ``best_model``'s weights)."""
        with torch.no_grad():
            w = torch.cat([p.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for p in self.parameters_of(model)])
        ref = self.weights.to(device="cpu", dtype=torch.float64)
        diff = float((w - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
        if not diff <= rtol:
            raise CovarianceMismatchError(
                f"the covariance was saved for other weights than this model's (max relative |Δw| = {diff:.2e} > {rtol:g}; "
                f"{self.source or 'unknown source'}): take P from the checkpoint these weights come from "
                "(`ekf-plugin covariance CKPT --model MODEL --save-model OUT.pt` writes both from one checkpoint)")
        return diff


# -------------------------------------------------------------------- sources
def _param_names(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> List[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise CovarianceMismatchError(f"{len(missing)} optimizer parameter(s) are not parameters of the given model")
    return [by_id[id(p)] for p in params]


def covariance_from_optimizer(opt: Any, model: torch.nn.Module, label_weights: Optional[Dict[str, Any]] = None,
                              source: str = "EKF optimizer") -> Covariance:
    """The current P of an :class:`~ekf_plugin.optim.EKF` (full symmetric blocks, copied) for ``model``'s weights.

    Args:
        opt: the EKF (or a Lightning wrapper with ``.optimizer``).
        model: the module whose parameters the EKF filters (names come from its ``named_parameters``).
        label_weights: see :class:`Covariance` (None: ξ = ŷ − y unscaled).
    """
    opt = getattr(opt, "optimizer", opt)
    if not hasattr(opt, "ekf_state") or "P" not in opt.ekf_state:
        raise CovarianceError(f"{type(opt).__name__} is not an EKF: it has no covariance P")
    params = opt.params
    sd = opt.state_dict()["state"]["ekf"]  # full symmetric blocks, copies
    w = torch.cat([p.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for p in params])
    return Covariance([p.detach() for p in sd["P"]], list(opt.blocks), _param_names(model, params),
                      [tuple(p.shape) for p in params], w, float(opt._noise()), label_weights,
                      int(sd.get("step", 0)), source)


class _Opaque:
    """Inert stand-in for every class or function a checkpoint's pickle names: building, calling or filling it
    does nothing, so the training configuration a Lightning checkpoint pickles is skipped without running or
    importing any of its code."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Opaque":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Opaque":
        return _Opaque()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a Lightning checkpoint's tensors and plain values without running code from it.

    ``torch.load(weights_only=True, mmap=True)``; every global the pickle names beyond torch's own safe set
    (omegaconf configs, torchmetrics, SchNetPack task objects, the optimizer class) becomes an inert
    placeholder. ``state_dict``, ``optimizer_states`` and plain hyper-parameters (numbers, strings) stay usable.

    Raises:
        FileNotFoundError: no such file. CovarianceError: empty, truncated or not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CovarianceError(f"checkpoint {path} is empty (0 bytes)")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        with torch.serialization.safe_globals([(_Opaque, n) for n in names]):
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise CovarianceError(f"checkpoint {path} is truncated or not a torch checkpoint "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(ck, dict):
        raise CovarianceError(f"{path} is not a Lightning checkpoint (a {type(ck).__name__}, not a dict)")
    return ck


def checkpoint_model_state(ck: Dict[str, Any], prefix: str = "model.") -> Dict[str, torch.Tensor]:
    """The model's state dict inside a Lightning checkpoint of an ``AtomisticTask`` (keys ``model.*``, prefix removed)."""
    sd = ck.get("state_dict")
    if not isinstance(sd, dict):
        raise CovarianceError("the checkpoint has no state_dict")
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def _ekf_state(ck: Dict[str, Any], path: PathLike) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    states = ck.get("optimizer_states")
    if not states:
        raise CovarianceError(f"{path} holds no optimizer state (a best_model or a weights-only checkpoint): the "
                              "covariance lives in the Lightning checkpoints (checkpoints/last.ckpt, epoch=NN.ckpt)")
    osd = states[0]
    ekf = osd.get("state", {}).get("ekf") if isinstance(osd, dict) else None
    if not isinstance(ekf, dict) or "P" not in ekf:
        raise CovarianceError(f"{path} was not trained with the EKF (its optimizer state has no covariance P; "
                              "an Adam model has none)")
    return osd, ekf


def _column_order(model: torch.nn.Module, hp: Dict[str, Any]) -> List[str]:
    """Parameter names in the EKF's flat order for a ``PaperScheduleTask`` with hyper-parameters ``hp``
    (``param_blocks`` None: ``model.named_parameters()`` order; ``layer``/``element``: grouped as the task does)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    blocks = hp.get("param_blocks") if isinstance(hp.get("param_blocks"), str) else None
    if blocks is None:
        return [n for n, _ in named]
    if blocks == "layer":
        key = lambda name: name.rsplit(".", 1)[0]  # noqa: E731
    else:
        pattern = hp.get("element_pattern")
        pat = re.compile(pattern if isinstance(pattern, str) else r"networks\.(\w+)\.")
        key = lambda name: (lambda mt: mt.group(1) if mt else "")(pat.search(name))  # noqa: E731
    groups: Dict[str, List[str]] = {}
    for n, _ in named:
        groups.setdefault(key(n), []).append(n)
    return [n for g in groups.values() for n in g]


def covariance_from_checkpoint(path: PathLike, model: torch.nn.Module, ck: Optional[Dict[str, Any]] = None) -> Covariance:
    """P of a Lightning checkpoint of ``spktrain`` (``task=ekf_paper`` / ``task=ekf``) for ``model``'s architecture.

    ``model`` gives the parameter names and shapes (e.g. the run's ``best_model``); the weights stored with P are
    the checkpoint's own (``state_dict``), which may differ from ``model``'s (see :meth:`Covariance.check_weights`).
    The label weights (c_E, c_F, force components, energy per atom) come from the task's hyper-parameters.

    Raises:
        CovarianceError: not a checkpoint, no EKF state. CovarianceMismatchError: P does not fit ``model``.
    """
    ck = read_checkpoint(path) if ck is None else ck
    osd, ekf = _ekf_state(ck, path)
    hp = ck.get("hyper_parameters") if isinstance(ck.get("hyper_parameters"), dict) else {}
    names = _column_order(model, hp)
    state = checkpoint_model_state(ck)
    shapes = dict((n, tuple(p.shape)) for n, p in model.named_parameters())
    missing = [n for n in names if n not in state]
    if missing:
        raise CovarianceMismatchError(f"the checkpoint has no weights for the model's parameter(s) {missing[:3]}: "
                                      "it was not trained for this model")
    P = [p for p in ekf["P"]]
    sizes = [p.shape[0] for p in P]
    n_model = sum(math.prod(shapes[n]) for n in names)
    n_groups = [len(g.get("params", [])) for g in osd.get("param_groups", [])]
    if sum(sizes) != n_model or (n_groups and sum(n_groups) != len(names)):
        raise CovarianceMismatchError(f"the checkpoint's P covers {sum(sizes)} weights in {sum(n_groups)} tensors, the "
                                      f"model has {n_model} in {len(names)}: the checkpoint is for another model")
    blocks, pos = [], 0
    for s in sizes:
        blocks.append((pos, pos + s))
        pos += s
    w = torch.cat([state[n].detach().reshape(-1).to(torch.float64) for n in names])
    for n in names:
        if tuple(state[n].shape) != shapes[n]:
            raise CovarianceMismatchError(f"parameter {n!r}: {tuple(state[n].shape)} in the checkpoint, {shapes[n]} in the model")
    lam = ekf.get("lam")
    lr = float(osd["param_groups"][0]["lr"])
    noise = float(lam) if lam is not None else 1.0 / lr
    label_weights = None
    if all(isinstance(hp.get(k), (int, float)) for k in ("c_energy", "c_forces")):
        label_weights = {"c_energy": float(hp["c_energy"]), "c_forces": float(hp["c_forces"]),
                         "n_force_components": int(hp.get("n_force_components", 10) or 10),
                         "energy_per_atom": bool(hp.get("energy_per_atom", False))}
        if hp.get("label_mode") == "reduced":
            label_weights = {"label_mode": "reduced"}  # rows are group means of |ΔE|, |ΔF|: no per-label noise
    return Covariance(P, blocks, names, [shapes[n] for n in names], w, noise, label_weights,
                      int(ekf.get("step", 0)), f"{Path(path).name}, step {int(ck.get('global_step', 0))}",
                      {"global_step": int(ck.get("global_step", 0)) if isinstance(ck.get("global_step"), int) else 0})


# -------------------------------------------------------------------- file format
def save_covariance(cov: Covariance, path: PathLike, dtype: torch.dtype = torch.float64) -> Path:
    """Write ``cov`` to ``path`` (atomically; ``torch.load(weights_only=True)`` reads it back).

    Args:
        dtype: float64 (default) or float32 for P (half the size; relative round-off 6e-8 in the variances).
    """
    from ekf_plugin.checkpoints import atomic_save

    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    obj = {
        "format": FORMAT,
        "dtype": str(dtype).replace("torch.", ""),
        "blocks": [[a, b] for a, b in cov.blocks],
        "P": [p.detach().to(device="cpu", dtype=dtype).contiguous() for p in cov.P],
        "names": list(cov.names),
        "shapes": [list(s) for s in cov.shapes],
        "weights": cov.weights.detach().to(device="cpu", dtype=torch.float64),
        "noise": float(cov.noise),
        "label_weights": dict(cov.label_weights) if cov.label_weights else None,
        "step": int(cov.step),
        "source": str(cov.source),
        "units": "P in (weight units)²; noise r in the units of the filter's ξ; c_energy eV⁻², c_forces Å²/eV²",
    }
    return atomic_save(obj, Path(path))


def load_covariance(path: PathLike, device: Optional[Union[str, torch.device]] = None,
                    dtype: torch.dtype = torch.float64) -> Covariance:
    """Read a covariance file written by :func:`save_covariance` (``weights_only=True``, no allow-list: a pickle
    of any class or function is refused).

    Args:
        device: where P goes (default CPU). dtype: P's dtype after loading (default float64).

    Raises:
        FileNotFoundError: no such file. CovarianceError: empty, truncated, pickled code, or not our format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no covariance file at {path}")
    if path.stat().st_size == 0:
        raise CovarianceError(f"covariance file {path} is empty (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CovarianceError(f"{path} is not an ekf-plugin covariance file: it pickles code or objects that are not "
                              f"plain data ({_first_line(exc)}); refused without loading it") from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise CovarianceError(f"covariance file {path} is truncated or not a torch file "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CovarianceError(f"{path} is not an ekf-plugin covariance file (format {FORMAT})")
    try:
        P = obj["P"]
        if not isinstance(P, list) or not all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in P):
            raise TypeError("P must be a list of floating-point tensors")
        weights = obj["weights"]
        if not isinstance(weights, torch.Tensor):
            raise TypeError("weights must be a tensor")
        lw = obj.get("label_weights")
        cov = Covariance([p.to(device=device, dtype=dtype) for p in P], [tuple(b) for b in obj["blocks"]],
                         [str(n) for n in obj["names"]], [tuple(s) for s in obj["shapes"]],
                         weights.to(torch.float64), float(obj["noise"]), dict(lw) if isinstance(lw, dict) else None,
                         int(obj.get("step", 0)), str(obj.get("source", "")), {"stored_dtype": obj.get("dtype")})
    except CovarianceError as exc:
        raise CovarianceError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CovarianceError(f"{path}: broken covariance file ({type(exc).__name__}: {_first_line(exc)})") from None
    return cov


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
