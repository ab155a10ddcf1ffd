"""Fisher spectrum of a SchNetPack-style model on a set of labels.

Per-label gradients of the L1 loss are g_i = sign(e_i) ∇_w e_i with e_i = ŷ_i − y_i the label error
(:mod:`ekf_plugin.labels`); their rows are built with :func:`ekf_plugin.jacobian.flat_jacobian` and
fed to :class:`~ekf_plugin.fisher.spectrum.GramAccumulator`. Force labels are derivatives of the
model output, so their rows need double backward: the model's force module is made to keep its
graph (``create_graph``) while the spectrum is computed, whatever the train/eval mode.

Units follow the model: energies in eV (per atom if ``energy_per_atom``), forces in eV/Å.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..jacobian import flat_jacobian
from ..labels import IDX_M, N_ATOMS, energy_errors, force_errors
from .labels import ENERGY_COMPONENT, LabelSet
from .spectrum import FisherSpectrum, GramAccumulator

Batch = Dict[str, torch.Tensor]


def trainable_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters w of the Fisher matrix: those with ``requires_grad``, in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def _is_force_module(module: torch.nn.Module) -> bool:
    """SchNetPack ``Forces``/``Response`` modules (and look-alikes) take ``create_graph=self.training``."""
    return hasattr(module, "calc_forces") or type(module).__name__ in ("Forces", "Response")


@contextmanager
def force_graph(model: torch.nn.Module) -> Iterator[None]:
    """Let the model's force modules build a differentiable graph (training flag on them only)."""
    changed = [m for m in model.modules() if _is_force_module(m) and not m.training]
    for m in changed:
        m.training = True
    try:
        yield
    finally:
        for m in changed:
            m.training = False


def default_collate(structures: Sequence[Batch]) -> Batch:
    """SchNetPack's collate function (batch of per-structure input dicts)."""
    from schnetpack.data.loader import _atoms_collate_fn

    return _atoms_collate_fn(list(structures))


def _rows(errors: torch.Tensor, params: Sequence[torch.Tensor], chunk_size: int) -> Iterator[torch.Tensor]:
    """Jacobian rows (m, n) of an error vector (M,), ``chunk_size`` rows per batched backward."""
    for start in range(0, errors.shape[0], chunk_size):
        yield flat_jacobian(errors[start : start + chunk_size], params)  # (m, n)


def _force_index(batch: Batch, positions: Sequence[int], components: Sequence[np.ndarray]) -> torch.Tensor:
    """Indices into the flattened (3·N_atoms_batch,) force-error vector."""
    first_atom = torch.cumsum(batch[N_ATOMS], 0) - batch[N_ATOMS]  # (B,) first atom of each structure
    idx = [3 * int(first_atom[b]) + torch.as_tensor(c, dtype=torch.long) for b, c in zip(positions, components)]
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)  # (k,)


def fisher_spectrum(
    model: torch.nn.Module,
    structures: Union[Sequence[Batch], Mapping[int, Batch]],
    labels: LabelSet,
    *,
    forward: Optional[Callable[[Batch], Batch]] = None,
    params: Optional[Sequence[torch.Tensor]] = None,
    collate: Optional[Callable[[Sequence[Batch]], Batch]] = None,
    energy_key: str = "energy",
    forces_key: str = "forces",
    energy_per_atom: bool = True,
    batch_size: int = 8,
    chunk_size: int = 64,
    method: str = "auto",
    device: Optional[Union[str, torch.device]] = None,
    progress: Optional[Callable[[int], None]] = None,
    fast_labels: Optional[bool] = None,
) -> FisherSpectrum:
    """Eigenvalues of the empirical L1 Fisher F = (1/N) Σ g_i g_iᵀ over ``labels``.

    Args:
        model: a SchNetPack ``AtomisticModel`` (or any module mapping an input dict to outputs).
        structures: per-structure input dicts (as a SchNetPack dataset returns them, transforms
            applied), indexed by ``labels.structure``; targets ``energy_key``/``forces_key`` may be
            missing (J does not depend on them).
        labels: the labels (see :func:`ekf_plugin.fisher.labels.sample_labels`).
        forward: batch → outputs (default ``model``), e.g. a task's ``predict_without_postprocessing``.
        params: the weights w (default: trainable parameters of ``model``).
        collate: list of structures → batch (default: SchNetPack's).
        energy_per_atom: energy labels as energy per atom (eV/atom) instead of eV.
        batch_size: structures per forward pass; chunk_size: rows per batched backward. Together
            they bound the autograd memory; the result does not depend on them.
        method: 'auto' (cheaper of JJᵀ and JᵀJ), 'JJt' or 'JtJ'.
        device: where batches go and the float64 buffers live (default: device of the weights).
        progress: called with the number of labels finished after each chunk.
        fast_labels: rows from cached symmetry functions and local dG/dr columns
            (:class:`~ekf_plugin.bpnn.label_predictor.BPNNLabelPredictor`: same rows, the Jacobian runs
            through the networks only). ``None``: on for BPNN potentials when no ``forward`` is given.

    Returns:
        :class:`FisherSpectrum` with groups 'all' and 'energy'/'forces' as present.
    """
    if len(labels) == 0:
        raise ValueError("no labels: the Fisher spectrum needs at least one label")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    params = list(params) if params is not None else trainable_parameters(model)
    n_weights = sum(p.numel() for p in params)
    device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    from ..bpnn.label_predictor import label_predictor_for

    predictor = label_predictor_for(model, fast_labels, energy_key, auto=forward is None)
    forward = forward or model
    collate = collate or default_collate
    acc = GramAccumulator(n_weights, labels.n_energy, labels.n_forces, method=method, device=device)
    per_structure = labels.by_structure()
    order = sorted(per_structure)
    t0 = time.perf_counter()
    done = 0
    # force_graph also for energy-only batches: SchNetPack's Forces frees the energy graph unless training
    with torch.inference_mode(False), torch.enable_grad(), force_graph(model):
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([structures[s] for s in chosen]).items()}
            comps = [per_structure[s] for s in chosen]
            if predictor is not None:
                done += _add_batch_fast(acc, predictor, batch, comps, params, energy_per_atom, chunk_size, progress, done)
            else:
                done += _add_batch(acc, forward, batch, comps, params,
                                   energy_key, forces_key, energy_per_atom, chunk_size, progress, done)
    eig = acc.eigenvalues()
    n_lab = {"all": len(labels), "energy": labels.n_energy, "forces": labels.n_forces}
    jac_dtype = str(params[0].dtype).replace("torch.", "") if params else "float64"
    meta = {"energy_per_atom": energy_per_atom, "n_structures": len(order), "jacobian_dtype": jac_dtype}
    return FisherSpectrum(eig, {g: n_lab[g] for g in eig}, n_weights, acc.method, time.perf_counter() - t0, meta)


def _add_batch_fast(acc, predictor, batch, comps, params, energy_per_atom, chunk_size, progress, done):
    """:func:`_add_batch` for BPNN potentials through the label predictor (rows through the networks only)."""
    added = 0

    def add(errors: torch.Tensor, group: str) -> None:
        nonlocal added
        for rows in _rows(errors, params, chunk_size):
            acc.add(rows, group)
            added += rows.shape[0]
            if progress:
                progress(done + added)

    e_pos = [b for b, c in enumerate(comps) if (c == ENERGY_COMPONENT).any()]
    if e_pos:
        e = predictor.energies(batch)  # (B,) eV; J does not depend on the targets
        if energy_per_atom:
            e = e / batch[N_ATOMS].to(e.dtype)
        add(e[torch.as_tensor(e_pos, device=e.device)], "energy")
    for b, c in enumerate(comps):
        pick = torch.as_tensor(c[c != ENERGY_COMPONENT], dtype=torch.long)  # (k,) flat component indices of structure b
        if pick.numel():
            add(predictor.force_components(batch, b, pick), "forces")
    return added


def _add_batch(acc, forward, batch, comps, params, energy_key, forces_key, energy_per_atom, chunk_size, progress, done):
    """Forward one batch of structures, add its energy and force rows; returns labels added."""
    targets = {k: batch[k] for k in (energy_key, forces_key, N_ATOMS, IDX_M) if k in batch}
    out = forward(dict(batch))  # the model writes into its input dict: keep our targets apart
    ref = dict(targets)
    added = 0
    e_pos = [b for b, c in enumerate(comps) if (c == ENERGY_COMPONENT).any()]
    if e_pos:
        ref.setdefault(energy_key, out[energy_key].detach() * 0)  # J ignores targets
        err = energy_errors(out, ref, key=energy_key, per_atom=energy_per_atom)  # (B,)
        err = err[torch.as_tensor(e_pos, device=err.device)]  # (k_E,)
        for rows in _rows(err, params, chunk_size):
            acc.add(rows, "energy")
            added += rows.shape[0]
            if progress:
                progress(done + added)
    f_pos = [b for b, c in enumerate(comps) if (c != ENERGY_COMPONENT).any()]
    if f_pos:
        forces = out[forces_key]
        if not forces.requires_grad:
            raise RuntimeError(
                f"force labels need double backward, but the model's {forces_key!r} output has no graph to the "
                "weights: its force module must differentiate with create_graph=True (SchNetPack's Forces does "
                "when training=True, which force_graph() sets)"
            )
        ref.setdefault(forces_key, forces.detach() * 0)
        err = force_errors(out, ref, key=forces_key)  # (3·N_atoms_batch,)
        idx = _force_index(ref, f_pos, [comps[b][comps[b] != ENERGY_COMPONENT] for b in f_pos]).to(err.device)
        for rows in _rows(err[idx], params, chunk_size):  # (k_F,) errors
            acc.add(rows, "forces")
            added += rows.shape[0]
            if progress:
                progress(done + added)
    return added
