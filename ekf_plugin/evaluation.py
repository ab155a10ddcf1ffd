"""Evaluate a SchNetPack model on one structure, independently of any MD engine.

:class:`ModelEvaluator` takes atomic numbers, positions and a cell (Å, numpy arrays or torch
tensors), builds the SchNetPack input batch with a periodic neighbor list that honours the
minimum image for *unwrapped* positions (i-PI sends molecules whole, so atoms may lie far outside
the cell), runs the model and returns

* ``energy``  (eV),
* ``forces``  (eV/Å, shape (N, 3)),
* ``stress``  (eV/Å³, shape (3, 3), ``dE/dε / V`` as SchNetPack and ASE define it),
* ``virial``  (eV, shape (3, 3), ``W = −∂E/∂ε = −V·stress``, symmetrized).

The model is any :class:`schnetpack.model.AtomisticModel` with ``energy``/``forces``/``stress``
outputs (see :func:`ekf_plugin.models.load_model`); stress is switched on with
:func:`schnetpack.md.utils.activate_model_stress` when the model was trained without it.
Evaluation is in float64 by default and runs on the model's ``device`` (CPU or CUDA).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

ENERGY_KEY = "energy"
FORCES_KEY = "forces"
STRESS_KEY = "stress"


def default_threads() -> int:
    """Torch intra-op threads for an MD client: one core is left to the MD engine's poll loop.

    On a 2-core machine two threads were 25× slower than one while i-PI polled (notes §4).
    """
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def idle_cores(cap: int = 8) -> int:
    """Torch intra-op threads for batch analysis beside other work: the usable cores that the 1-minute load
    average leaves idle, at least 1, at most ``cap``.

    Threads beyond the idle cores spin against the other processes: ``ekf-plugin fisher`` (1000 labels' worth
    of work, 100 labels) took 36 s with torch's default 2 threads and 1.8 s with 1 on the project's 2-core VM
    while two trainings and an MD run kept both cores busy (session 19). ``OMP_NUM_THREADS``, when set to a
    whole number, is taken as it is (the user's own choice)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:  # no load average on this platform
        busy = 0
    return max(1, min(cap, usable - busy))


def set_threads(threads: Optional[int]) -> None:
    """Set torch's intra-op thread count (``None``: :func:`default_threads`)."""
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@dataclass
class Result:
    """Model output for one structure, as float64 numpy arrays in eV and Å."""

    energy: float  # eV
    forces: np.ndarray  # (N, 3) eV/Å
    stress: Optional[np.ndarray]  # (3, 3) eV/Å³, None without a periodic cell
    virial: Optional[np.ndarray]  # (3, 3) eV, W = −V·stress, symmetrized


def find_cutoff(model: torch.nn.Module) -> float:
    """The model's cutoff radius in Å: ``model.representation.cutoff`` or the first ``cutoff``
    attribute found on a sub-module (tensor or number)."""
    candidates = [getattr(model, "representation", None), *model.modules()]
    for mod in candidates:
        value = getattr(mod, "cutoff", None) if mod is not None else None
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value.item())
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    raise ValueError("cannot find the model's cutoff (no `cutoff` attribute); pass cutoff=<Å> explicitly")


def ensure_stress(model: torch.nn.Module) -> torch.nn.Module:
    """Switch on stress (``Strain`` input module + ``Forces(calc_stress=True)``) if it is off."""
    if STRESS_KEY in getattr(model, "model_outputs", []):
        return model
    from schnetpack.md.utils import activate_model_stress

    return activate_model_stress(model, STRESS_KEY)


# ----------------------------------------------------------------------------- neighbor lists


def wrap_positions(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray):
    """Wrap positions (N, 3) Å into the cell along periodic axes.

    Returns ``(wrapped (N,3), n (N,3) int)`` with ``positions = wrapped + n @ cell``.
    """
    frac = np.linalg.solve(cell.T, positions.T).T  # (N, 3)
    n = np.where(pbc[None, :], np.floor(frac), 0.0)  # (N, 3)
    return positions - n @ cell, n.astype(np.int64)


def _matscipy_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    from matscipy.neighbours import neighbour_list

    i, j, s = neighbour_list("ijS", positions=positions, cell=cell, pbc=pbc, cutoff=cutoff)
    return i, j, s


def _ase_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    from ase.neighborlist import primitive_neighbor_list

    return primitive_neighbor_list("ijS", pbc, cell, positions, cutoff, self_interaction=False)


def _torch_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float, device=None):
    """All image pairs within ``cutoff`` by brute force over lattice shifts (any device)."""
    dev = torch.device(device or "cpu")
    r = torch.as_tensor(positions, dtype=torch.float64, device=dev)  # (N, 3)
    h = torch.as_tensor(cell, dtype=torch.float64, device=dev)  # (3, 3) rows = lattice vectors
    reps = []
    for d in range(3):
        if not pbc[d]:
            reps.append(0)
            continue
        other = np.cross(cell[(d + 1) % 3], cell[(d + 2) % 3])
        height = abs(np.linalg.det(cell)) / np.linalg.norm(other)
        reps.append(int(math.ceil(cutoff / height)))
    ranges = [torch.arange(-k, k + 1, device=dev) for k in reps]
    shifts = torch.cartesian_prod(*ranges).to(torch.float64)  # (S, 3)
    n = r.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=dev)
    found_i, found_j, found_s = [], [], []
    for k, shift in enumerate(shifts):  # one (N, N) block per lattice shift: memory O(N²)
        d = r[None, :, :] - r[:, None, :] + shift @ h  # (N, N, 3): r_j - r_i + S·h
        mask = (d * d).sum(-1) < cutoff * cutoff  # (N, N)
        if not bool(shift.any()):
            mask &= ~eye
        i, j = mask.nonzero(as_tuple=True)
        found_i.append(i)
        found_j.append(j)
        found_s.append(torch.full_like(i, k))
    i, j, s_idx = torch.cat(found_i), torch.cat(found_j), torch.cat(found_s)
    order = torch.argsort(i * n + j, stable=True)
    i, j, s_idx = i[order], j[order], s_idx[order]
    return i.cpu().numpy(), j.cpu().numpy(), shifts[s_idx].round().long().cpu().numpy()


NEIGHBOR_LISTS: Dict[str, Callable] = {"matscipy": _matscipy_pairs, "ase": _ase_pairs, "torch": _torch_pairs}


def neighbor_pairs(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    method: str = "matscipy",
    device: Optional[Union[str, torch.device]] = None,
):
    """Full neighbor list (i→j and j→i) for possibly unwrapped positions.

    Args:
        positions: (N, 3) Å, anywhere in space.
        cell: (3, 3) Å, lattice vectors as rows (ASE convention); ignored without PBC.
        pbc: (3,) bool.
        cutoff: Å.
        method: ``"matscipy"``, ``"ase"`` or ``"torch"`` (brute force, runs on ``device``).

    Returns:
        ``(idx_i (P,), idx_j (P,), offsets (P, 3) Å)`` such that
        ``R[idx_j] − R[idx_i] + offsets`` is the pair vector (any image within ``cutoff``) for the
        *given*, unwrapped positions.
    """
    pbc = np.asarray(pbc, dtype=bool)
    i, j, s = neighbor_shifts(positions, cell, pbc, cutoff, method, device)
    offsets = s @ cell if pbc.any() else np.zeros((len(i), 3))  # (P, 3) Å
    return i, j, offsets


def neighbor_shifts(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    method: str = "matscipy",
    device: Optional[Union[str, torch.device]] = None,
):
    """:func:`neighbor_pairs` with integer lattice shifts instead of offsets.

    Returns ``(idx_i (P,), idx_j (P,), shifts (P, 3) int64)`` with the pair vector
    ``R[idx_j] − R[idx_i] + shifts @ cell`` for the given (unwrapped) positions; shifts are 0
    without PBC. The MD step (:mod:`ekf_plugin.bpnn.md_step`) keeps the shifts and re-applies them to
    a deformed cell.
    """
    if method not in NEIGHBOR_LISTS:
        raise ValueError(f"unknown neighbor list {method!r}; expected one of {sorted(NEIGHBOR_LISTS)}")
    pbc = np.asarray(pbc, dtype=bool)
    if pbc.any():
        wrapped, n = wrap_positions(positions, cell, pbc)
    else:  # a big enough box around the atoms
        lo, hi = positions.min(0), positions.max(0)
        cell = np.diag(np.maximum(hi - lo, 0.0) + 2 * cutoff + 1.0)
        wrapped, n = positions - lo + cutoff, np.zeros_like(positions, dtype=np.int64)
    kw = {"device": device} if method == "torch" else {}
    i, j, s = NEIGHBOR_LISTS[method](wrapped, cell, pbc, cutoff, **kw)
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64).reshape(-1, 3) + n[i] - n[j]  # (P, 3) shifts for the unwrapped positions
    if not pbc.any():
        s = np.zeros_like(s)
    return i, j, s


# ----------------------------------------------------------------------------- evaluator


def _as_numpy(x: ArrayLike, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class ModelEvaluator:
    """Energy, forces, stress and virial of one structure from a SchNetPack model.

    Args:
        model: a SchNetPack ``AtomisticModel`` with an ``energy`` output and ``forces``
            (stress is switched on if missing), or a path understood by
            :func:`ekf_plugin.models.load_model`.
        device: torch device (default: the model's own parameters' device, else CPU).
        dtype: evaluation dtype (float64 by default; the model is cast).
        cutoff: neighbor-list cutoff in Å (default: the model's ``cutoff``).
        neighbor_list: ``"auto"`` (matscipy on CPU, torch on GPU), ``"matscipy"``, ``"ase"``,
            ``"torch"``.
        threads: torch intra-op threads (``None``: leave torch's setting alone).
        transforms: extra SchNetPack per-structure transforms applied to the input dict after the
            neighbor list (e.g. ``CollectAtomTriples`` for models that need triples).
        fast_path: evaluate BPNN potentials with :class:`ekf_plugin.bpnn.md_step.BPNNStep` (Verlet list,
            pair-factorised triples, analytic forces and virial; same numbers to round-off). ``None``
            (default): whenever :func:`ekf_plugin.bpnn.md_step.supports` the model and no ``transforms``
            are given; other models always take the general SchNetPack path.
        compile: run the fast path's per-triple kernels as native C++ loops (:mod:`ekf_plugin.bpnn.md_step`;
            ``"torch"``: ``torch.compile`` instead). ``None`` (default): ``EKF_PLUGIN_COMPILE`` (``0``/``1``) if
            set, else on for CPU when a C++ compiler is found. The build takes about a second on first use
            and is cached on disk.
        skin: Verlet skin of the fast path in Å (the list is rebuilt only when needed).
        trust_pickle: for a path: allow a full unpickle of a ``best_model`` outside the allow-list
            (see :func:`load_any_model`; only files you trust).

    Calls refuse empty structures and non-finite numbers in or out with a ``ValueError`` (input) or
    :class:`NonFiniteOutputError` (output).
    """

    def __init__(
        self,
        model: Union[torch.nn.Module, str, os.PathLike],
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float64,
        cutoff: Optional[float] = None,
        neighbor_list: str = "auto",
        threads: Optional[int] = None,
        transforms: Iterable[Any] = (),
        fast_path: Optional[bool] = None,
        compile: Optional[bool] = None,
        skin: float = 0.5,
        trust_pickle: bool = False,
    ) -> None:
        if threads is not None:
            set_threads(threads)
        if not isinstance(model, torch.nn.Module):
            model = load_any_model(model, device or "cpu", trust_pickle=trust_pickle)
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = ensure_stress(model).to(device=self.device, dtype=dtype).eval()
        self.cutoff = float(cutoff) if cutoff is not None else find_cutoff(self.model)
        if neighbor_list == "auto":
            neighbor_list = "torch" if self.device.type != "cpu" else _default_cpu_list()
        if neighbor_list not in NEIGHBOR_LISTS:
            raise ValueError(f"unknown neighbor list {neighbor_list!r}; expected 'auto' or one of {sorted(NEIGHBOR_LISTS)}")
        self.neighbor_list = neighbor_list
        self.transforms = list(transforms)
        self.fast = None  # BPNNStep for BPNN potentials (see fast_path)
        from ekf_plugin.bpnn import md_step

        if fast_path is None:
            fast_path = md_step.supports(self.model) and not self.transforms
        if fast_path:
            if compile is None:
                compile = md_step.default_compile(self.device)
            self.fast = md_step.BPNNStep(self.model, skin=skin, neighbor_list=self.neighbor_list, compile=compile)

    # -- batch construction -------------------------------------------------------------
    def build_inputs(self, numbers: ArrayLike, positions: ArrayLike, cell: Optional[ArrayLike], pbc=None):
        """SchNetPack input dict (a batch of one structure) on ``self.device``.

        ``positions`` (N, 3) Å, ``cell`` (3, 3) Å with lattice vectors as rows, ``pbc`` (3,) bool
        (default: periodic if a non-singular cell is given).
        """
        import schnetpack.properties as P

        z = _as_numpy(numbers, np.int64).reshape(-1)
        r = _as_numpy(positions).reshape(-1, 3)
        if r.shape[0] != z.shape[0]:
            raise ValueError(f"{z.shape[0]} atomic numbers but {r.shape[0]} positions")
        h = np.zeros((3, 3)) if cell is None else _as_numpy(cell).reshape(3, 3)
        if pbc is None:
            pbc = np.full(3, abs(np.linalg.det(h)) > 1e-12)
        pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
        if pbc.any() and abs(np.linalg.det(h)) < 1e-12:
            raise ValueError("periodic boundary conditions need a non-singular cell")
        i, j, off = neighbor_pairs(r, h, pbc, self.cutoff, self.neighbor_list, self.device)
        dev, dt = self.device, self.dtype
        n = z.shape[0]
        inputs = {
            P.Z: torch.as_tensor(z, device=dev),
            P.R: torch.as_tensor(r, dtype=dt, device=dev),
            P.cell: torch.as_tensor(h, dtype=dt, device=dev)[None],
            P.pbc: torch.tensor(pbc.tolist(), device=dev),
            P.n_atoms: torch.tensor([n], device=dev),
            P.idx_m: torch.zeros(n, dtype=torch.long, device=dev),
            P.idx: torch.tensor([0], device=dev),
            P.idx_i: torch.as_tensor(i, device=dev),
            P.idx_j: torch.as_tensor(j, device=dev),
            P.offsets: torch.as_tensor(off, dtype=dt, device=dev),
        }
        inputs[P.idx_i + "_local"] = inputs[P.idx_i]  # one structure: local == global
        inputs[P.idx_j + "_local"] = inputs[P.idx_j]
        for t in self.transforms:
            inputs = t(inputs)
        return inputs

    # -- evaluation -----------------------------------------------------------------------
    def __call__(self, numbers: ArrayLike, positions: ArrayLike, cell: Optional[ArrayLike] = None, pbc=None) -> Result:
        """Evaluate one structure. Units in: Å. Units out: eV, eV/Å, eV/Å³, eV (see :class:`Result`).

        Raises:
            ValueError: no atoms, or non-finite positions/cell.
            NonFiniteOutputError: the model returned non-finite energy, forces or stress.
        """
        check_structure(numbers, positions, cell)
        if self.fast is not None:
            energy, forces, stress, virial = self._fast_call(numbers, positions, cell, pbc)
        else:
            inputs = self.build_inputs(numbers, positions, cell, pbc)
            periodic = bool(inputs["_pbc"].any())
            out = self.model(inputs)
            energy = float(out[ENERGY_KEY].detach().sum().item())
            forces = out[FORCES_KEY].detach().to(torch.float64).cpu().numpy().reshape(-1, 3)  # (N, 3)
            stress = virial = None
            if periodic and STRESS_KEY in out:
                stress = out[STRESS_KEY].detach().to(torch.float64).cpu().numpy().reshape(3, 3)  # (3, 3)
                volume = abs(float(np.linalg.det(inputs["_cell"][0].detach().cpu().numpy())))
                w = -volume * stress
                virial = 0.5 * (w + w.T)
        check_output(energy, forces, stress)
        return Result(energy, forces, stress, virial)


    def _fast_call(self, numbers: ArrayLike, positions: ArrayLike, cell: Optional[ArrayLike], pbc=None):
        """(energy eV, forces (N, 3) eV/Å, stress (3, 3) eV/Å³ or None, virial (3, 3) eV or None) via the BPNN step."""
        z = _as_numpy(numbers, np.int64).reshape(-1)
        r = _as_numpy(positions).reshape(-1, 3)
        if r.shape[0] != z.shape[0]:
            raise ValueError(f"{z.shape[0]} atomic numbers but {r.shape[0]} positions")
        h = None if cell is None else _as_numpy(cell).reshape(3, 3)
        res = self.fast(z, r, h, pbc)
        stress = None if res.stress is None else res.stress.detach().cpu().numpy()  # (3, 3)
        virial = None if res.virial is None else res.virial.detach().cpu().numpy()  # (3, 3)
        return float(res.energy), res.forces.detach().cpu().numpy(), stress, virial


class NonFiniteOutputError(ValueError):
    """The model returned NaN/inf energy, forces or stress for a structure."""


def check_structure(numbers: ArrayLike, positions: ArrayLike, cell: Optional[ArrayLike] = None) -> None:
    """Refuse what no model can evaluate: no atoms, non-finite positions (Å) or cell (Å)."""
    n = int(np.size(_as_numpy(numbers, np.int64)))
    if n == 0:
        raise ValueError("the structure has no atoms: nothing to evaluate")
    r = _as_numpy(positions)
    if r.size != 3 * n:
        raise ValueError(f"{n} atomic numbers but {r.size / 3:g} positions")
    if not np.isfinite(r).all():
        bad = np.unique(np.argwhere(~np.isfinite(r.reshape(-1, 3)))[:, 0])
        raise ValueError(f"non-finite positions (NaN/inf) for atom(s) {bad[:10].tolist()}")
    if cell is not None and not np.isfinite(_as_numpy(cell)).all():
        raise ValueError("non-finite cell (NaN/inf)")
    r = r.reshape(-1, 3)
    if r.shape[0] > 1:  # exact duplicates only (cheap, O(N log N)); physical checks: ekf_plugin.validation
        order = np.lexsort(r.T[::-1])
        same = np.flatnonzero(np.all(np.abs(np.diff(r[order], axis=0)) < 1e-8, axis=1))
        if same.size:
            i, j = sorted((int(order[same[0]]), int(order[same[0] + 1])))
            raise ValueError(f"atoms {i} and {j} are at the same position")


def check_output(energy: float, forces: np.ndarray, stress: Optional[np.ndarray]) -> None:
    """Raise :class:`NonFiniteOutputError` unless energy (eV), forces (eV/Å) and stress (eV/Å³) are finite."""
    if math.isfinite(energy) and np.isfinite(forces).all() and (stress is None or np.isfinite(stress).all()):
        return
    raise NonFiniteOutputError(
        "the model returned non-finite energy, forces or stress (NaN/inf): are two atoms on top of each "
        "other, or is the structure far outside the training data?"
    )


def load_any_model(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                   trust_pickle: bool = False) -> torch.nn.Module:
    """Load a model file or directory with :func:`ekf_plugin.models.load_model` (``best_model``, our
    export, n2p2 directories). No code from the file runs: pickles outside the allow-list of
    :func:`ekf_plugin.models.model_safe_globals` need ``trust_pickle=True`` (files you trust only).

    Raises:
        ValueError: the path does not exist; :class:`ekf_plugin.models.ModelLoadError` (a ``ValueError``)
            for empty, truncated, unreadable or untrusted files.
    """
    if not os.path.exists(path):
        raise ValueError(f"model path {str(path)!r} does not exist")
    from ekf_plugin.models import load_model

    return load_model(path, device, trust_pickle=trust_pickle)


def _default_cpu_list() -> str:
    try:
        import matscipy.neighbours  # noqa: F401

        return "matscipy"
    except ImportError:
        return "ase"

