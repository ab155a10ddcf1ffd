"""The reduced-row update's forward pass and Jacobian rows as one compiled graph (``torch.compile``).

An EKF update of a GNN in ``task=ekf`` (label_mode ``reduced``) runs the model, its force pass and one
double backward per force-group row (:func:`~ekf_plugin.training.schedule.reduced_rows_with_jacobian`).
On a CPU most of that time is elementwise work on pair tensors (P × 3 × F floats) inside the model's
backward graph, each op reading and writing memory on its own. :class:`CompiledReducedRows` hands the same
computation (forward, force pass with the energy row, the G force rows) to ``torch.compile`` with the
``autograd.grad`` calls traced into the graph (``torch._dynamo.config.trace_autograd_ops``), so Inductor
fuses those kernels; the pair and atom counts are symbolic, so new frames do not recompile (a batch of one structure after
batches of several, or other G and S, compile once more).
On SchNetPack's PaiNN (108 k weights, 192-atom water, float32, 1 thread) forward + 5 rows take 140-210 ms
against 410-510 ms eager (docs/ekf.md); the first call compiles (1-2 minutes; Inductor's disk cache makes a
later process's compile take seconds).

Same ξ, same label draws and the same J as the eager path to round-off (1e-9 in float64,
tests/training/test_compiled_rows.py). Where the model is not a plain SchNetPack
``NeuralNetworkPotential`` with an energy output and SchNetPack's ``Forces``, or where compiling fails
(no C++ compiler, no Triton on a GPU), :meth:`CompiledReducedRows.__call__` returns None without drawing
from the generator and the caller takes the eager path (a warning says why, once).
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ekf_plugin.jacobian import flatten_grads
from ekf_plugin.labels import N_ATOMS, draw_force_groups, energy_errors, group_errors

log = logging.getLogger(__name__)

Rows = Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]


class _EnergyOnly(torch.nn.Module):
    """A SchNetPack ``NeuralNetworkPotential`` without its force module, derivatives or post-processing:
    input modules → representation → the other output modules (the model's own submodules, shared)."""

    def __init__(self, model: torch.nn.Module, force_module: torch.nn.Module) -> None:
        super().__init__()
        self.input_modules = model.input_modules
        self.representation = model.representation
        self.output_modules = torch.nn.ModuleList([m for m in model.output_modules if m is not force_module])

    def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        for m in self.input_modules:
            inputs = m(inputs)
        inputs = self.representation(inputs)
        for m in self.output_modules:
            inputs = m(inputs)
        return inputs


class CompiledReducedRows:
    """ξ (1 + G,), J (1 + G, n) and the predictions of a reduced-row update from one compiled function.

    Args:
        model: a SchNetPack ``NeuralNetworkPotential`` whose output modules are one energy module and
            SchNetPack's ``Forces`` (no stress), as :func:`~ekf_plugin.training.schedule.reduced_rows_with_jacobian`
            requires.
        params: the EKF's parameters, in the column order of J.
        energy_key, forces_key: output and target names (energy in eV, forces in eV/Å; any consistent units).
    """

    def __init__(self, model: torch.nn.Module, params: List[torch.Tensor], energy_key: str = "energy",
                 forces_key: str = "forces") -> None:
        from ekf_plugin.training.schedule import schnetpack_force_module  # noqa: PLC0415

        self.params, self.energy_key, self.forces_key = list(params), energy_key, forces_key
        self.reason: Optional[str] = None  # why the compiled path is off (None: on)
        fmod = schnetpack_force_module(model, energy_key, forces_key)
        try:
            from schnetpack.model import NeuralNetworkPotential  # noqa: PLC0415
        except ImportError:  # pragma: no cover - schnetpack is a dependency
            NeuralNetworkPotential = None
        if fmod is None:
            self.reason = "the model's forces do not come from SchNetPack's Forces module (or it computes stress)"
        elif NeuralNetworkPotential is None or type(model).forward is not NeuralNetworkPotential.forward:
            self.reason = f"{type(model).__name__} has its own forward (not SchNetPack's NeuralNetworkPotential)"
        elif set(getattr(model, "model_outputs", [])) != {energy_key, forces_key}:
            self.reason = f"the model predicts {sorted(model.model_outputs)}, not just {energy_key!r} and {forces_key!r}"
        self._energy_model = None if self.reason else _EnergyOnly(model, fmod)
        self._compiled: Optional[Callable] = None

    @property
    def active(self) -> bool:
        return self.reason is None

    def _rows(self, inputs: Dict[str, torch.Tensor], groups: torch.Tensor, e_ref: torch.Tensor,
              f_ref: torch.Tensor, nat: torch.Tensor):
        """The compiled body. inputs: the batch's tensors; groups (G, S) atom indices; e_ref (B,) reference
        energies; f_ref (N, 3) reference forces; nat (B,) atoms per structure (ones: total energies).

        Returns ξ (1 + G,) and J (1 + G, n) without the √c weights, F (N, 3), E (B,), and whether any
        ΔE is exactly 0 (then the eager path decides: its energy-row trick needs sign(ΔE) ≠ 0)."""
        from schnetpack.properties import R, idx_m  # noqa: PLC0415

        params = self.params
        inp = dict(inputs)
        pos = inp[R].detach().requires_grad_()  # (N, 3)
        inp[R] = pos
        E = self._energy_model(inp)[self.energy_key].reshape(-1)  # (B,)
        e = energy_errors({"e": E.detach()}, {"e": e_ref, N_ATOMS: nat}, "e", per_atom=True)  # (B,) ΔE/nat
        sign = torch.sign(e)  # (B,)
        u = torch.where(sign == 0, torch.ones_like(sign), sign) / (nat * e.numel())  # (B,) ∂ mean|ΔE|/∂E_b
        grads = torch.autograd.grad(E, [pos, *params], grad_outputs=u, create_graph=True, allow_unused=True)
        F = -grads[0] / u[inp[idx_m]].unsqueeze(-1)  # (N, 3) −∂E/∂R, graph kept for the force rows
        row_e = flatten_grads([g.detach() if g is not None else None for g in grads[1:]], params)  # (n,)
        err = F.detach() - f_ref  # (N, 3)
        G, S = groups.shape
        ones = torch.ones(G, S, dtype=F.dtype, device=F.device)  # (G, S)
        count = torch.zeros(G, F.shape[0], dtype=F.dtype, device=F.device).scatter_add_(1, groups, ones)  # (G, N)
        cot = count.unsqueeze(-1) * torch.sign(err).unsqueeze(0) / (3 * S)  # (G, N, 3) ∂ξ_g/∂F
        xi = torch.cat([e.abs().mean().reshape(1), group_errors(err, groups)])  # (1 + G,)
        rows = [row_e]
        for g in range(G):
            rows.append(flatten_grads(torch.autograd.grad(F, params, grad_outputs=cot[g], retain_graph=True,
                                                  allow_unused=True), params))  # (n,)
        return xi, torch.stack(rows), F.detach(), E.detach(), (sign == 0).any()

    def __call__(self, batch: Dict[str, torch.Tensor], generator: torch.Generator, n_force_groups: int = 4,
                 force_group_size: int = 6, c_energy: float = 1.0, c_forces: float = 1.0,
                 energy_per_atom: bool = True) -> Optional[Rows]:
        """``(ξ (1 + G,), J (1 + G, n), outputs)`` as :func:`reduced_rows_with_jacobian` returns them, or None
        (nothing drawn from ``generator``) where the compiled path does not apply."""
        if self.reason or c_energy <= 0 or c_forces <= 0 or n_force_groups <= 0 or not torch.is_grad_enabled():
            return None
        from schnetpack.properties import R, n_atoms  # noqa: PLC0415

        pos = batch[R]
        state = generator.get_state()
        groups = draw_force_groups(pos.shape[0], n_force_groups, force_group_size, generator, pos.device)
        groups = groups.clone()  # (G, S) not a view: its base (N,) would be a symbol equated with N
        torch._dynamo.mark_static(groups)  # G and S are settings: no symbol (that could be equated with B)
        inputs = {k: v.detach() for k, v in batch.items() if torch.is_tensor(v)}
        nat = batch[n_atoms].to(pos.dtype) if energy_per_atom else torch.ones(batch[n_atoms].shape, dtype=pos.dtype,
                                                                               device=pos.device)  # (B,)
        e_ref = batch[self.energy_key].reshape(-1).to(pos.dtype)  # (B,)
        f_ref = batch[self.forces_key].reshape(-1, 3).to(pos.dtype)  # (N, 3)
        try:
            if self._compiled is None:
                log.info("compiling the reduced-row EKF update (torch.compile, once; 1-2 minutes on a CPU)")
                self._compiled = torch.compile(self._rows, dynamic=True)
            with torch._dynamo.config.patch(trace_autograd_ops=True, capture_scalar_outputs=True):
                xi, J, F, E, tie = self._compiled(inputs, groups, e_ref, f_ref, nat)
        except Exception as exc:  # noqa: BLE001 - any compile failure: the eager path computes the same
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            self.reason = f"torch.compile failed: {type(exc).__name__}: {first_line}"
            warnings.warn(f"task=ekf: the compiled reduced-row update is off ({self.reason}); using the eager "
                          "path (same result, ~3x slower on GNNs)", RuntimeWarning, stacklevel=2)
            generator.set_state(state)
            return None
        if bool(tie):  # ΔE exactly 0: let the eager path handle it with the same draws
            generator.set_state(state)
            return None
        scale = torch.tensor([c_energy**0.5] + [c_forces**0.5] * n_force_groups, dtype=J.dtype, device=J.device)
        out = {self.energy_key: E, self.forces_key: F}
        return xi * scale, J * scale.unsqueeze(1), out
