"""The study's label schedule: which labels one update uses, and the weighted error vector ξ.

Shao et al. (2021), Sec. II.A and SI Table S3: each update uses either one energy label or ten force
components drawn at random from one structure, chosen at random in about equal numbers; the error
vector is ξ = √(c/n)(ŷ − y) with n the number of labels of that kind in the update and c_E/c_F = 0.28
in atomic units (Hartree, Bohr).

Units. Working units are eV and Å. The table gives only the ratio, in a.u.: c_E/c_F = 0.28 Bohr⁻²
(c_E multiplies Ha², c_F multiplies (Ha/Bohr)²), which is 0.28/0.529177² = 0.99990 Å⁻² in eV/Å. The
absolute scale is not given, and it matters: the EKF update depends on c and η only through c·η
(scaling ξ and J by √s is the same as R = I/(sη)). Measured on the water BPNN (revPBE0-D3 frames,
60 updates from the same start, val. force RMSE 3.09 eV/Å at start): c_F = 1 Bohr²/Ha² (3.78e-4 Å²/eV²)
with η = 1e-3 does not move (3.10 eV/Å); c_F·η = 0.03 gives 1.10 eV/Å; c_F·η = 1 gives 0.72 eV/Å.
We therefore take c_F = 1000 Å²/eV², so that the study's η = 1e-3 trains (c·η = 1, n2p2's final R = I):

* c_F = 1000 Å²/eV²                             (:data:`C_FORCES_EV_ANG`)
* c_E = 0.28 Bohr⁻² · c_F = 999.90 eV⁻²         (:data:`C_ENERGY_EV`)

Adam's update is invariant to this scale (apart from its ε), so the same values serve the baseline.

The energy label is the total energy of the structure (PiNN's default, ``use_e_per_atom=False``);
``energy_per_atom=True`` uses E/N instead.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from ekf_plugin.labels import IDX_M, N_ATOMS, draw_components, energy_errors, grouped_force_errors
from ekf_plugin.units import BOHR

C_RATIO_AU = 0.28  # c_E/c_F in Bohr⁻² (SI Table S3, PiNN row)
C_FORCES_EV_ANG = 1000.0  # Å²/eV² (absolute scale chosen so that c·η = 1 at the study's η = 1e-3)
C_ENERGY_EV = C_RATIO_AU / BOHR**2 * C_FORCES_EV_ANG  # eV⁻² (0.28 Bohr⁻² = 0.99990 Å⁻² times c_F)

ENERGY, FORCES = 0, 1


def draw_kinds(n_structures: int, energy_fraction: float, generator: torch.Generator) -> List[int]:
    """Per structure: ENERGY with probability ``energy_fraction``, else FORCES (CPU generator)."""
    u = torch.rand(n_structures, generator=generator)  # (B,)
    return [ENERGY if float(v) < energy_fraction else FORCES for v in u]


class ThresholdSelection:
    """n2p2's threshold selection of force labels (``selection_mode 2``): prefer components the model gets wrong.

    For each of the k components of a force update, up to ``trials`` random candidates of the structure are drawn
    (all k·trials distinct); the first whose error abs(F̂ − F) is at least ``threshold`` × the current force RMSE is
    taken, else the last candidate. The current RMSE is a running mean of the squared errors of every evaluated
    candidate (weight ``memory`` per update; the first update starts it), kept in :meth:`state_dict` so that a
    resumed run selects as the uninterrupted one. n2p2's water training uses threshold 1.0 and 3 trials.
    """

    def __init__(self, threshold: float = 1.0, trials: int = 3, memory: float = 0.01) -> None:
        if threshold < 0 or trials < 1 or not 0.0 < memory <= 1.0:
            raise ValueError(f"threshold >= 0, trials >= 1 and memory in (0, 1] needed, got {threshold}, {trials}, {memory}")
        self.threshold, self.trials, self.memory = float(threshold), int(trials), float(memory)
        self.mean_square: Optional[float] = None  # (eV/Å)² running mean of the candidates' squared errors

    def choose(self, n_total: int, k: int, generator: torch.Generator,
               errors_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(k',) flat component indices (k' = min(k, n_total)) for a structure with ``n_total`` = 3N components;
        ``errors_of(candidates (c,))`` → their errors F̂ − F (c,) in eV/Å (values only: no rows needed)."""
        cand = draw_components(n_total, min(n_total, k * self.trials), generator)  # (c,) distinct, CPU
        err = errors_of(cand).detach().abs().double().cpu()  # (c,) eV/Å
        ms = float((err * err).mean())
        self.mean_square = ms if self.mean_square is None else (1.0 - self.memory) * self.mean_square + self.memory * ms
        limit = self.threshold * self.mean_square**0.5
        groups = self.slots(cand.numel(), min(k, n_total))
        errs = err.tolist()  # Python floats: the same numbers, no tensor operation per comparison
        chosen = [next((i for i in g if errs[i] >= limit), g[-1]) for g in groups]
        return cand[torch.tensor(chosen, dtype=torch.long)]  # (k,)

    @staticmethod
    def slots(c: int, k: int) -> List[List[int]]:
        """The positions among :meth:`choose`'s c candidates of each of its k slots (k = min(components asked for,
        c)), trials in order: candidate j, j + k, j + 2k, ... of slot j."""
        return [list(range(j, c, k)) for j in range(k)]

    @classmethod
    def slot_order(cls, c: int, k: int) -> torch.Tensor:
        """(c,) the positions of :meth:`slots` slot by slot: the candidates of slots [a, b) are one contiguous run
        of it."""
        return torch.tensor([i for g in cls.slots(c, k) for i in g], dtype=torch.long)

    def state_dict(self) -> Dict[str, Optional[float]]:
        return {"mean_square": self.mean_square}

    def load_state_dict(self, state: Dict[str, Optional[float]]) -> None:
        ms = state.get("mean_square")
        self.mean_square = None if ms is None else float(ms)


def weighted_errors(
    pred: Dict[str, torch.Tensor],
    batch: Dict[str, torch.Tensor],
    kinds: List[int],
    generator: torch.Generator,
    energy_key: str = "energy",
    forces_key: str = "forces",
    n_force_components: int = 10,
    c_energy: float = C_ENERGY_EV,
    c_forces: float = C_FORCES_EV_ANG,
    energy_per_atom: bool = False,
    selection: Optional[ThresholdSelection] = None,
) -> torch.Tensor:
    """ξ = √(c/n)(ŷ − y) for the labels drawn per structure from full model outputs ``pred``; (m,), graph kept.

    Energy structures contribute one entry √c_E·ΔE [ΔE in eV, or eV/atom]; force structures
    ``n_force_components`` entries √(c_F/k)·ΔF [ΔF in eV/Å], drawn without replacement (or chosen by
    ``selection``, see :class:`ThresholdSelection`).
    """
    idx_m = batch[IDX_M]  # (N_total,)

    def forces_of(b: int, pick: torch.Tensor) -> torch.Tensor:
        return pred[forces_key][idx_m == b].reshape(-1)[pick.to(idx_m.device)]  # (k,)

    return label_errors(lambda: pred[energy_key].reshape(-1), forces_of, batch, kinds, generator, energy_key,
                        forces_key, n_force_components, c_energy, c_forces, energy_per_atom, selection=selection)


def reduced_row_errors(
    pred: Dict[str, torch.Tensor],
    batch: Dict[str, torch.Tensor],
    generator: torch.Generator,
    energy_key: str = "energy",
    forces_key: str = "forces",
    n_force_groups: int = 4,
    force_group_size: int = 6,
    c_energy: float = 1.0,
    c_forces: float = 1.0,
    energy_per_atom: bool = True,
) -> torch.Tensor:
    """ξ for a reduced-row update (any model, large networks): (1 + G,), graph kept.

    Row 0: √c_E · mean_b abs(Ê_b − E_b) over the batch's structures (per atom if ``energy_per_atom``);
    rows 1..G: √c_F · ξ_g of :func:`ekf_plugin.labels.grouped_force_errors`. Each row is one backward
    pass of the Jacobian, so an update of a GNN costs 1 + G backward passes instead of one per force
    component. For a single structure and G = 0 this is the plain energy update (abs(e) with the sign in J).
    """
    rows = []
    if energy_key in pred and c_energy > 0:
        e = energy_errors(pred, batch, energy_key, per_atom=energy_per_atom)  # (B,)
        rows.append(c_energy**0.5 * e.abs().mean().reshape(1))  # (1,)
    if forces_key in pred and c_forces > 0 and n_force_groups > 0:
        f = grouped_force_errors(pred, batch, forces_key, n_force_groups, force_group_size, generator)  # (G,)
        rows.append(c_forces**0.5 * f)
    if not rows:
        raise ValueError(f"reduced_row_errors: the model predicts neither {energy_key!r} nor {forces_key!r}")
    return torch.cat(rows)  # (1 + G,)



def schnetpack_force_module(model: torch.nn.Module, energy_key: str, forces_key: str):
    """The output module that computes ``forces_key`` as −∂E/∂R, if it is SchNetPack's ``Forces`` (or a
    subclass) without stress, the last output module, and the only one with a ``force_key``; else None."""
    mods = list(getattr(model, "output_modules", None) or [])
    if not mods:
        return None
    try:
        from schnetpack.atomistic import Forces  # noqa: PLC0415
        from schnetpack.properties import R  # noqa: PLC0415
    except ImportError:  # pragma: no cover - schnetpack is a dependency
        return None
    last = mods[-1]
    ok = (
        isinstance(last, Forces) and getattr(last, "calc_forces", False) and not getattr(last, "calc_stress", False)
        and last.energy_key == energy_key and last.force_key == forces_key
        and list(last.required_derivatives) == [R] and sum(hasattr(m, "force_key") for m in mods) == 1
    )
    return last if ok else None


def reduced_rows_with_jacobian(
    model: torch.nn.Module,
    predict: Callable[[], Dict[str, torch.Tensor]],
    batch: Dict[str, torch.Tensor],
    generator: torch.Generator,
    params: List[torch.Tensor],
    energy_key: str = "energy",
    forces_key: str = "forces",
    n_force_groups: int = 4,
    force_group_size: int = 6,
    c_energy: float = 1.0,
    c_forces: float = 1.0,
    energy_per_atom: bool = True,
):
    """:func:`reduced_row_errors` and its Jacobian (m, n) with the energy row taken from the force pass.

    A force-trained model computes F = −∂E/∂R by a backward pass inside its forward. Here that pass is
    asked for ∂/∂θ of the weighted energies Σ_b w_b E_b as well, w_b = sign(Ê_b − E_b)/(B·N_b) (the
    derivative of the energy row √c_E · mean_b abs(ΔE_b)/N_b), which costs a few weight-gradient
    products instead of a separate backward pass for the energy row (on PaiNN as much as a force row):
    an update needs 1 backward (inside the forward) + G, not 1 + 1 + G. The forces of structure b are
    −(∂ Σ w E/∂R_b)/w_b, the model's own forces up to round-off. The G force-group rows come from one
    backward each (:func:`~ekf_plugin.jacobian.flat_jacobian`, loop: on PaiNN a batched backward is 4×
    slower). Same ξ, same label draws (generator) and same J as :func:`reduced_row_errors` followed by
    ``flat_jacobian`` (tests/training/test_reduced_rows.py, 1e-9 in float64).

    Args:
        model: the SchNetPack model (its ``output_modules`` are inspected and, during ``predict``, the
            force module is left out).
        predict: ``() -> outputs`` runs the model on a shallow copy of ``batch`` (``dict(batch)``) without
            post-processing; the model marks ``batch[R]`` as requiring grad (its ``required_derivatives``).
        params: the EKF's parameters in the column order of J.

    Returns:
        ``(ξ (1 + G,), J (1 + G, n), outputs)`` with ``outputs[forces_key]`` filled in, or None when the fast
        path does not apply (no energy row, no force rows, stress or custom force modules, ΔE = 0 exactly);
        nothing has been drawn from ``generator`` then.
    """
    fmod = schnetpack_force_module(model, energy_key, forces_key)
    if fmod is None or c_energy <= 0 or c_forces <= 0 or n_force_groups <= 0 or not torch.is_grad_enabled():
        return None
    from schnetpack.properties import R  # noqa: PLC0415

    mods = model.output_modules
    model.output_modules = torch.nn.ModuleList([m for m in mods if m is not fmod])
    try:
        out = predict()  # energies with their graph from R (R requires grad: the model's required_derivatives)
    finally:
        model.output_modules = mods
    pos = batch.get(R)  # the model's inputs are a shallow copy of batch: it set requires_grad on this tensor
    if energy_key not in out or pos is None or not pos.requires_grad:
        return None
    e = energy_errors(out, batch, energy_key, per_atom=energy_per_atom)  # (B,)
    nat = batch[N_ATOMS].to(e.dtype) if energy_per_atom else torch.ones_like(e)  # (B,)
    sign = torch.sign(e.detach())  # (B,)
    if bool((sign == 0).any()):
        return None
    w = sign / (nat * e.numel())  # (B,) ∂(mean abs(ΔE_b)/N_b)/∂E_b
    E = out[energy_key].reshape(-1)  # (B,)
    grads = torch.autograd.grad(E, [pos, *params], grad_outputs=w.to(E.dtype), create_graph=True, allow_unused=True)
    idx_m = batch[IDX_M]
    out[forces_key] = -grads[0] / w.to(grads[0].dtype)[idx_m].unsqueeze(-1)  # (N, 3) = −∂E/∂R
    from ekf_plugin.jacobian import flat_jacobian, flatten_grads  # noqa: PLC0415

    row_e = flatten_grads([g.detach() if g is not None else None for g in grads[1:]], params).unsqueeze(0)  # (1, n)
    xi_e = c_energy**0.5 * e.abs().mean().reshape(1)  # (1,)
    xi_f = c_forces**0.5 * grouped_force_errors(out, batch, forces_key, n_force_groups, force_group_size, generator)
    J_f = flat_jacobian(xi_f, params, vectorize=False)  # (G, n)
    J = torch.cat([c_energy**0.5 * row_e.to(J_f.dtype), J_f])  # (1 + G, n)
    return torch.cat([xi_e.detach().to(xi_f.dtype), xi_f.detach()]), J, out


def label_errors(
    energies: Callable[[], torch.Tensor],
    force_components: Callable[[int, torch.Tensor], torch.Tensor],
    batch: Dict[str, torch.Tensor],
    kinds: List[int],
    generator: torch.Generator,
    energy_key: str = "energy",
    forces_key: str = "forces",
    n_force_components: int = 10,
    c_energy: float = C_ENERGY_EV,
    c_forces: float = C_FORCES_EV_ANG,
    energy_per_atom: bool = False,
    record: Optional[Dict[str, List[torch.Tensor]]] = None,
    selection: Optional[ThresholdSelection] = None,
    force_values: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
):
    """:func:`weighted_errors` with the predictions supplied on demand, shape (m,).

    Args:
        energies: ``() -> (B,)`` predicted total energies in eV (called once, only if an energy label is drawn).
        force_components: ``(b, pick) -> (k,)`` predicted force components in eV/Å of structure b at the flat
            indices ``pick`` (k,) into its (N_b·3) components (atom ``pick // 3``, axis ``pick % 3``).
        record: if given, gets the unweighted predicted and reference labels appended under
            ``"energy"`` / ``"forces"`` as (pred, ref) pairs (eV/atom and eV/Å), for training metrics.

    Closed-form Jacobians: when ``energies`` returns ``(values (B,), rows (B, n))`` and
    ``force_components`` returns ``(values (k,), rows (k, n))`` (rows = ∂prediction/∂θ), the result is
    ``(ξ (m,), J (m, n))`` with J weighted like ξ, ready for ``EKF.step``; otherwise ξ with its graph.
    The rows the callables return must be tensors of their own (not views of state kept elsewhere): they are
    weighted in place (no copy of the (k, n) rows).

    The random draws (one ``randperm`` per force structure, in batch order) are those of
    :func:`weighted_errors`, so both give the same labels for the same generator state.

    ``selection``: choose the force components by their errors (:class:`ThresholdSelection`); the candidates'
    values come from ``force_values(b, candidates) -> (c,)`` eV/Å (no rows; default: ``force_components``).
    """
    parts, rows = [], []
    e_pred: Optional[torch.Tensor] = None
    e_rows: Optional[torch.Tensor] = None
    idx_m = batch[IDX_M]  # (N_total,)
    n_atoms = batch[N_ATOMS]  # (B,)
    one = n_atoms.numel() == 1  # one structure (the study's batch): no per-structure slices
    nats: Optional[List[int]] = None  # N_b as Python ints (energy labels per atom)
    for b, kind in enumerate(kinds):
        if kind == ENERGY:
            if e_pred is None:
                e_pred, e_rows = _with_rows(energies())  # (B,), (B, n) or None
            ref = batch[energy_key].reshape(-1)  # (B,)
            pred_b, ref_b = (e_pred, ref) if one else (e_pred[b : b + 1], ref[b : b + 1])  # (1,)
            ref_b = ref_b.to(pred_b.dtype)
            if energy_per_atom and nats is None:
                nats = n_atoms.tolist()
            per = float(nats[b]) if energy_per_atom else 1.0
            weight = c_energy**0.5 / per
            if record is not None:
                record.setdefault("energy", []).append((pred_b.detach() / per, ref_b / per))
            parts.append((pred_b - ref_b) * weight)  # (1,)
            if e_rows is None:
                rows.append(None)
            else:  # weighted in place where the rows are this label's alone (one structure)
                rows.append(_scaled(e_rows, weight) if one else e_rows[b : b + 1] * weight)  # (1, n)
        else:
            ref_all = (batch[forces_key] if one else batch[forces_key][idx_m == b]).reshape(-1)  # (3N_b,)
            if selection is None:
                pick = draw_components(ref_all.numel(), n_force_components, generator)  # (k,) CPU
            else:
                values = force_values or (lambda bb, c: _with_rows(force_components(bb, c))[0])

                def errors_of(cand: torch.Tensor, b: int = b, ref_all: torch.Tensor = ref_all) -> torch.Tensor:
                    v = values(b, cand)  # (c,) eV/Å
                    return v.detach() - ref_all[cand.to(ref_all.device)].to(v.dtype)

                pick = selection.choose(ref_all.numel(), n_force_components, generator, errors_of)  # (k,) CPU
            k = pick.numel()
            f, f_rows = _with_rows(force_components(b, pick))  # (k,), (k, n) or None
            ref = ref_all[pick.to(ref_all.device)].to(f.dtype)  # (k,)
            if record is not None:
                record.setdefault("forces", []).append((f.detach(), ref))
            weight = (c_forces / k) ** 0.5
            parts.append((f - ref) * weight)  # (k,)
            rows.append(None if f_rows is None else _scaled(f_rows, weight))  # (k, n)
    xi = parts[0] if len(parts) == 1 else torch.cat(parts)  # (m,)
    if rows and all(r is not None for r in rows):
        return xi, rows[0] if len(rows) == 1 else torch.cat(rows)  # (m,), (m, n)
    return xi


def _scaled(rows: torch.Tensor, weight: float) -> torch.Tensor:
    """``rows * weight``, in place (no copy of the (k, n) rows) unless autograd needs the original."""
    return rows * weight if rows.requires_grad else rows.mul_(weight)


def _with_rows(value):
    """(values, rows) from a prediction that is either a tensor or a (tensor, Jacobian rows) pair."""
    return value if isinstance(value, tuple) else (value, None)


def atoms_per_structure(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """N_b as float, shape (B,)."""
    return batch[N_ATOMS].to(torch.get_default_dtype())
