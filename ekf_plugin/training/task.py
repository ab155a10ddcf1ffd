"""SchNetPack task with the study's update schedule and manual optimization (EKF or a torch optimizer).

``PaperScheduleTask`` is an ``schnetpack.AtomisticTask`` (select it with ``task=ekf_paper`` or
``task=adam_paper``). Every training step is one weight update:

1. for each structure of the batch draw ENERGY (probability ``energy_fraction``, study: 0.5) or FORCES;
2. ξ = √(c/n)(ŷ − y): one total-energy label, or ``n_force_components`` (study: 10) random force
   components, see :mod:`ekf_plugin.training.schedule` for c_E, c_F and their units (eV, Å);
3. EKF: ``optimizer.step(closure)`` with the closure returning ξ; any other torch optimizer (the Adam
   baseline) minimises L2 = Σ ξ² with gradient-norm clipping (study: 0.01) and the LR scheduler stepped
   once per update (study: ×0.994 every 10⁴ updates, ``StepLR``).

With the study's batch size of 1 this is exactly its schedule; with B > 1 each structure draws its own
kind and all labels join one update (m = Σ labels, like multistream).

Logged: ``{train,val,test}_energy_per_atom_rmse`` (eV/atom) and ``{train,val,test}_forces_rmse_all``
(eV/Å, all components), besides SchNetPack's usual per-output metrics and ``val_loss``; with periodic
validation frames at more than one density also ``val_pressure_bias_bar``, the pressure error that the
energy errors imply (:func:`ekf_plugin.model_errors.energy_volume_trend`: ΔP = −d(ΔE)/dV in bar; a force
RMSE cannot see it, and it sets the density of NPT runs). The label-draw
RNG is stored in Lightning checkpoints, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Dict, List, Optional, Type

import torch
from torchmetrics import MeanSquaredError

import schnetpack as spk
from ekf_plugin.optim import EKF
from ekf_plugin.training.schedule import (
    C_ENERGY_EV,
    C_FORCES_EV_ANG,
    ENERGY,
    ThresholdSelection,
    atoms_per_structure,
    draw_kinds,
    label_errors,
    reduced_row_errors,
    reduced_rows_with_jacobian,
    weighted_errors,
)
from ekf_plugin.bpnn.label_predictor import label_predictor_for
from ekf_plugin.training.callbacks import EMAGuard
from ekf_plugin.training.resumable_loader import install_resumable_order
from ekf_plugin.training.update_chunks import install_update_chunks, step_intervals

_RNG_KEY = "ekf_plugin_label_rng"
_SELECTION_KEY = "ekf_plugin_force_selection"
_UPDATES_PER_STEP_KEY = "ekf_plugin_updates_per_step"
LABEL_MODES = ("study", "reduced")
FORCE_SELECTIONS = ("random", "threshold")


@contextlib.contextmanager
def energy_only(model: torch.nn.Module, active: bool = True):
    """Temporarily drop output modules that compute forces (those with a ``force_key``), so an
    energy-only update builds no force graph (no double backward in its Jacobian)."""
    mods = getattr(model, "output_modules", None)
    if not active or mods is None:
        yield
        return
    model.output_modules = torch.nn.ModuleList([m for m in mods if not hasattr(m, "force_key")])
    try:
        yield
    finally:
        model.output_modules = mods


class PaperScheduleTask(spk.task.AtomisticTask):
    r"""AtomisticTask with the study's batch schedule (see module docstring).

    Args:
        energy_key, forces_key: output/target names (eV, eV/Å).
        energy_fraction: probability of an energy update (study: 0.5). In [0, 1].
        n_force_components: force components per force update (study: 10).
        c_energy, c_forces: weights c_E [eV⁻²] and c_F [Å²/eV²] (default: the SI Table S3 ratio with
            c_F = 1000 Å²/eV², see :mod:`ekf_plugin.training.schedule`).
        energy_per_atom: energy label per atom (E/N) instead of the total energy.
        clip_grad_norm: gradient-norm clipping for non-EKF optimizers (study's Adam: 0.01); None = off.
        param_blocks: EKF only: ``None`` (use ``optimizer_args``), ``"layer"`` (one P block per module)
            or ``"element"`` (one P block per element network: parameters grouped by the first group of
            the regex ``element_pattern`` searched in their names, default ``networks\.(\w+)\.``, i.e.
            ekf_plugin's BPNN ``...networks.<element index>...``; unmatched parameters share one block).
        seed: seed of the label-draw generator.
        skip_forces_on_energy_updates: drop force output modules from the forward of energy-only updates.
        fast_labels: predict the drawn labels from cached symmetry functions
            (:mod:`ekf_plugin.bpnn.label_predictor`; same values, the Jacobian runs through the networks
            only). ``None`` (default): on when the model's representation is ``BehlerParrinello``. The
            training RMSEs are then those of the drawn labels (an unbiased sample); validation and test
            RMSEs always use the full model.
        label_mode: ``"study"`` (the schedule above: one energy label or ``n_force_components`` force
            components per structure, one Jacobian row each) or ``"reduced"`` (any model, large networks:
            every update has one energy row, the mean abs(ΔE) over the batch, and ``n_force_groups`` rows, each
            the mean abs(ΔF) over the 3·``force_group_size`` components of a random group of atoms;
            :func:`~ekf_plugin.training.schedule.reduced_row_errors`, as LKF/RLEKF). ``task=ekf`` uses it.
        n_force_groups, force_group_size: G and S of the reduced mode (deepmd-kit LKF: 4 groups of 6 atoms).
        val_force_components: with the BPNN label predictor, validation reads the cached features too: the
            energy of every validation structure (exact) and ``val_force_components`` force components per
            structure, a fixed random sample (the same components at every validation, drawn from the
            structure's dataset index and ``seed``), so ``val_forces_*`` metrics and ``val_loss`` are
            unbiased estimates from that sample (~3·10³ components on 280 frames: ~1 % relative error of
            an RMSE). About 5 ms per 192-atom frame instead of a full forward and backward; the features
            of a validation frame are computed at its first validation. 0: the full model for every
            validation (a plain BPNN through the MD step's compiled kernels, 45 against 100 ms per 192-atom
            frame on one core; other models through their forward and autograd). Test metrics always use the model's
            own forward.
        force_selection: ``"random"`` (the study: force components drawn at random) or ``"threshold"`` (n2p2's
            ``selection_mode 2``: per component up to ``selection_trials`` random candidates, the first whose error
            is at least ``selection_threshold`` × the running force RMSE; :class:`~ekf_plugin.training.schedule.
            ThresholdSelection`). Study label mode only; the candidates' values cost about one more force label
            pass per force update.
        compile_rows: reduced mode with the EKF: the forward, force pass and Jacobian rows as one
            ``torch.compile``d function (:mod:`ekf_plugin.training.compiled_rows`; ~3× faster on PaiNN, the same
            rows to round-off; the first update compiles for 1-2 minutes). Models it does not apply to, or a
            failed compile, take the eager path with a warning. ``task=ekf`` turns it on.
        resumable_order: one process, a SchNetPack ``AtomsDataModule`` that shuffles with its own ``RandomSampler``:
            train in an order drawn from (``seed``, epoch) whose position checkpoints record, so a run resumed
            inside an epoch trains on the frames an uninterrupted run would
            (:func:`~ekf_plugin.training.resumable_loader.install_resumable_order`; the water datamodule does
            this itself). False: the host's loader as it is.
        updates_per_step: EKF updates per Lightning training step, each on its own ``batch_size`` structures
            (:mod:`ekf_plugin.training.update_chunks`): the same updates as one per step, with Lightning's loop
            (~0.7 ms a step on one core) paid once per k (or the largest k below it that divides an epoch's
            updates and every ``every_n_train_steps``, with a warning). ``trainer.max_steps``, ``every_n_train_steps``
            and the loggers' steps still count updates; the progress bar and an integer ``val_check_interval``
            count steps. 1: one update per step.
    """

    def __init__(
        self,
        model: spk.model.AtomisticModel,
        outputs: List[spk.task.ModelOutput],
        optimizer_cls: Type[torch.optim.Optimizer] = EKF,
        optimizer_args: Optional[Dict[str, Any]] = None,
        scheduler_cls: Optional[Type] = None,
        scheduler_args: Optional[Dict[str, Any]] = None,
        scheduler_monitor: Optional[str] = None,
        warmup_steps: int = 0,
        energy_key: str = "energy",
        forces_key: str = "forces",
        energy_fraction: float = 0.5,
        n_force_components: int = 10,
        c_energy: float = C_ENERGY_EV,
        c_forces: float = C_FORCES_EV_ANG,
        energy_per_atom: bool = False,
        clip_grad_norm: Optional[float] = None,
        param_blocks: Optional[str] = None,
        element_pattern: str = r"networks\.(\w+)\.",
        seed: int = 0,
        skip_forces_on_energy_updates: bool = True,
        fast_labels: Optional[bool] = None,
        label_mode: str = "study",
        n_force_groups: int = 4,
        force_group_size: int = 6,
        val_force_components: int = 10,
        force_selection: str = "random",
        selection_threshold: float = 1.0,
        selection_trials: int = 3,
        compile_rows: bool = False,
        resumable_order: bool = True,
        updates_per_step: int = 1,
    ) -> None:
        optimizer_args = dict(optimizer_args or {"lr": 1e-3})
        if "lr" not in optimizer_args:
            raise ValueError("optimizer_args must contain 'lr' (η of R = I/η for the EKF)")
        if not 0.0 <= energy_fraction <= 1.0:
            raise ValueError(f"energy_fraction must be in [0, 1], got {energy_fraction}")
        if n_force_components < 1:
            raise ValueError(f"n_force_components must be >= 1, got {n_force_components}")
        if c_energy < 0 or c_forces < 0:
            raise ValueError(f"c_energy and c_forces must be >= 0, got {c_energy}, {c_forces}")
        if param_blocks not in (None, "layer", "element"):
            raise ValueError(f"param_blocks must be None, 'layer' or 'element', got {param_blocks!r}")
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if label_mode == "reduced" and (n_force_groups < 0 or force_group_size < 1):
            raise ValueError(f"n_force_groups must be >= 0 and force_group_size >= 1, got {n_force_groups}, {force_group_size}")
        if val_force_components < 0:
            raise ValueError(f"val_force_components must be >= 0, got {val_force_components}")
        if force_selection not in FORCE_SELECTIONS:
            raise ValueError(f"force_selection must be one of {FORCE_SELECTIONS}, got {force_selection!r}")
        if force_selection != "random" and label_mode != "study":
            raise ValueError("force_selection='threshold' selects the study label mode's force components; "
                             f"label_mode={label_mode!r} has force groups instead")
        if warmup_steps:
            raise ValueError("warmup_steps is not supported by PaperScheduleTask (use a scheduler)")
        super().__init__(
            model=model, outputs=outputs, optimizer_cls=optimizer_cls, optimizer_args=optimizer_args,
            scheduler_cls=scheduler_cls, scheduler_args=scheduler_args, scheduler_monitor=scheduler_monitor,
            warmup_steps=0,
        )
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.energy_key, self.forces_key = energy_key, forces_key
        self.energy_fraction, self.n_force_components = float(energy_fraction), int(n_force_components)
        self.c_energy, self.c_forces, self.energy_per_atom = float(c_energy), float(c_forces), energy_per_atom
        self.clip_grad_norm, self.param_blocks, self.element_pattern = clip_grad_norm, param_blocks, element_pattern
        self.skip_forces_on_energy_updates = skip_forces_on_energy_updates
        self.label_mode = label_mode
        self.n_force_groups, self.force_group_size = int(n_force_groups), int(force_group_size)
        self.compile_rows = bool(compile_rows) and label_mode == "reduced"
        self.resumable_order = bool(resumable_order)
        if int(updates_per_step) < 1:
            raise ValueError(f"updates_per_step must be >= 1, got {updates_per_step}")
        self.updates_per_step = int(updates_per_step)
        self._update_chunks = None  # the training loader's UpdateChunks collate, once installed
        self._compiled_rows: Any = None  # CompiledReducedRows, built for the EKF's parameters on first use
        self.label_predictor = label_predictor_for(model, fast_labels if label_mode == "study" else False, energy_key)
        self.label_rng = torch.Generator().manual_seed(int(seed))
        self.val_force_components, self.val_seed = int(val_force_components), int(seed)
        self.selection = (ThresholdSelection(selection_threshold, selection_trials)
                          if force_selection == "threshold" else None)
        self._full_step: Any = None  # BPNNStep for full-model validation (_full_model_step), False: none
        self._val_nonfinite = 0  # validation batches with a non-finite loss in the current validation
        self._val_volume_error: List[torch.Tensor] = []  # per validation batch (B', 2): Å³/atom, eV/atom
        self._rmse_registered = {"e": False, "f": False}  # train RMSE metrics logged this epoch
        self._label_buffer: Dict[str, List] = {"energy": [], "forces": []}  # training labels not yet in the metrics
        self.rmse = torch.nn.ModuleDict(
            {f"{s}_{k}": MeanSquaredError(squared=False) for s in ("train", "val", "test") for k in ("e", "f")}
        )

    # ------------------------------------------------------------------ optimizer
    def _is_ekf(self) -> bool:
        return isinstance(self.optimizer_cls, type) and issubclass(self.optimizer_cls, EKF)

    def _param_groups(self) -> List[Dict[str, Any]]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.param_blocks == "layer":
            key = lambda name: name.rsplit(".", 1)[0]  # noqa: E731
        else:
            pat = re.compile(self.element_pattern)
            key = lambda name: (lambda mt: mt.group(1) if mt else "")(pat.search(name))  # noqa: E731
        groups: Dict[str, List[torch.nn.Parameter]] = {}
        for n, p in named:
            groups.setdefault(key(n), []).append(p)
        return [{"params": ps} for ps in groups.values()]

    def configure_optimizers(self):
        if not self._is_ekf() or self.param_blocks is None:
            return super().configure_optimizers()
        opt = self.optimizer_cls(self._param_groups(), **{**self.optimizer_kwargs, "blocks": "group"})
        if self.scheduler_cls:
            return [opt], [{"scheduler": self.scheduler_cls(optimizer=opt, **self.scheduler_kwargs), "name": "lr_schedule"}]
        return opt

    # ------------------------------------------------------------------ training
    def _errors(self, batch: Dict[str, torch.Tensor], kinds: List[int], store: Dict[str, Any],
                params: Optional[List[torch.Tensor]] = None):
        """ξ (m,) with its graph, or (ξ, J) when ``params`` (the EKF's column order) is given and the BPNN
        label predictor has closed-form rows for them (:mod:`ekf_plugin.bpnn.network_jacobian`)."""
        if self.label_predictor is not None:
            predictor = self.label_predictor
            store["labels"] = {}
            rows = predictor.closed_form(params) if params is not None else None
            if rows is not None:
                energies = lambda: predictor.energies_and_rows(batch, rows)  # noqa: E731
                forces = lambda b, pick: predictor.force_components_and_rows(batch, b, pick, rows)  # noqa: E731
                split, one = store.get("split"), forces  # EKF(label_split=True): each process computes a share
                if split is not None:
                    forces = lambda b, pick: split(lambda p: one(b, p), pick, float(batch[spk.properties.idx][b]))  # noqa: E731
                    if not rows.compiled(batch[spk.properties.R].device):
                        # the energy (one label): each process its element networks' part, summed; the compiled
                        # row (~0.1 ms) costs less than that exchange, so then every process computes all of it
                        energies = lambda: store["sum"](  # noqa: E731
                            lambda r, w: predictor.energies_and_rows(batch, rows, (r, w)),
                            float(batch[spk.properties.idx][0]))
            else:
                energies = lambda: predictor.energies(batch)  # noqa: E731
                forces = lambda b, pick: predictor.force_components(batch, b, pick)  # noqa: E731
            if rows is not None:  # a threshold selection's candidates: compiled values, their columns kept
                values = lambda b, pick: predictor.candidate_force_values(batch, b, pick, rows)  # noqa: E731
                if store.get("split_values") is not None:  # each process the candidates of its slots
                    values = self._split_candidates(values, store["split_values"], batch)
            else:  # autograd rows: the candidates' pass keeps its graph for the chosen components (one pass, not two)
                graph = torch.is_grad_enabled()
                values = lambda b, pick: predictor.energy_and_force_values(batch, b, pick, graph=graph)[1]  # noqa: E731
            return label_errors(
                energies, forces, batch, kinds, self.label_rng, self.energy_key, self.forces_key,
                self.n_force_components, self.c_energy, self.c_forces, self.energy_per_atom, record=store["labels"],
                selection=self.selection, force_values=values,
            )
        if self.label_mode == "reduced":
            fast = None if params is None else self._compiled_reduced_rows(batch, params)
            if fast is None and params is not None:
                fast = reduced_rows_with_jacobian(  # the energy row from the force pass
                    self.model, lambda: self.predict_without_postprocessing(dict(batch)), batch, self.label_rng,
                    params, self.energy_key, self.forces_key, self.n_force_groups, self.force_group_size,
                    self.c_energy, self.c_forces, self.energy_per_atom,
                )
            if fast is not None:
                store["pred"] = fast[2]
                return fast[0], fast[1]
            pred = self.predict_without_postprocessing(dict(batch))
            store["pred"] = pred
            return reduced_row_errors(
                pred, batch, self.label_rng, self.energy_key, self.forces_key, self.n_force_groups,
                self.force_group_size, self.c_energy, self.c_forces, self.energy_per_atom,
            )
        energy_only_update = self.skip_forces_on_energy_updates and all(k == ENERGY for k in kinds)
        with energy_only(self.model, energy_only_update):
            pred = self.predict_without_postprocessing(dict(batch))  # the model writes into its input dict
        store["pred"] = pred
        return weighted_errors(
            pred, batch, kinds, self.label_rng, self.energy_key, self.forces_key,
            self.n_force_components, self.c_energy, self.c_forces, self.energy_per_atom, selection=self.selection,
        )

    def _split_candidates(self, values, split_values, batch: Dict[str, torch.Tensor]):
        """A threshold selection's candidate values (``values(b, cand)`` → (c,)) with every process evaluating the
        candidates of a contiguous run of slots (:meth:`ThresholdSelection.slot_order`), gathered: the chosen
        component of slot j is then among the candidates of the process whose share of the force rows holds slot j
        (``EKF.split_rows`` shares the chosen components in slot order), so its columns are there already. The
        values are the same on every process (the selection's state too)."""
        def split(b: int, cand: torch.Tensor) -> torch.Tensor:
            order = ThresholdSelection.slot_order(cand.numel(), min(self.n_force_components, cand.numel()))  # (c,)
            got = split_values(lambda p: values(b, p), cand[order], float(batch[spk.properties.idx][b]))  # (c,) slot order
            return torch.empty_like(got).index_copy_(0, order.to(got.device), got)  # (c,) in the order of cand
        return split

    def _compiled_reduced_rows(self, batch: Dict[str, torch.Tensor], params: List[torch.Tensor]):
        """(ξ, J, outputs) from :class:`~ekf_plugin.training.compiled_rows.CompiledReducedRows` when
        ``compile_rows`` is on and it applies to this model, else None (nothing drawn)."""
        if not self.compile_rows:
            return None
        if self._compiled_rows is None or [id(p) for p in self._compiled_rows.params] != [id(p) for p in params]:
            from ekf_plugin.training.compiled_rows import CompiledReducedRows  # noqa: PLC0415

            self._compiled_rows = CompiledReducedRows(self.model, params, self.energy_key, self.forces_key)
            if not self._compiled_rows.active:
                warnings.warn(f"task compile_rows: not compiled, {self._compiled_rows.reason}; the eager "
                              "reduced-row update is used", RuntimeWarning, stacklevel=2)
        return self._compiled_rows(batch, self.label_rng, self.n_force_groups, self.force_group_size,
                                   self.c_energy, self.c_forces, self.energy_per_atom)

    def training_step(self, batch, batch_idx):
        """One update, or with ``updates_per_step`` > 1 a list of per-update batches trained one after the other
        (stopping at ``trainer.max_steps``); returns the last update's loss."""
        if not isinstance(batch, list):
            return self._training_update(batch, batch_idx, last=True)
        loss = None
        for i, one in enumerate(batch):
            if i and self._max_steps_reached():
                break  # trainer.max_steps counts updates
            last = i == len(batch) - 1 or self._max_steps_reached(1)
            if last:
                self._count_logged_steps_in_updates()
            loss = self._training_update(one, batch_idx, last=last)
        return loss

    def _count_logged_steps_in_updates(self) -> None:
        """Before a step's last update: Lightning's count of stepped batches (the ``step`` its loggers write, the
        ``log_every_n_steps`` test) set to the updates so far, as one update per step has it, so metrics.csv is
        against updates whatever ``updates_per_step`` is; Lightning adds the step's own one after it."""
        loop = getattr(getattr(self.trainer, "fit_loop", None), "epoch_loop", None)
        if loop is not None and hasattr(loop, "_batches_that_stepped"):
            loop._batches_that_stepped = int(self.trainer.global_step)

    def _steps_k(self) -> int:
        """Updates per training step of this run: ``updates_per_step``, or less where the epoch or a step interval
        needs it (:func:`~ekf_plugin.training.update_chunks.fitting_updates_per_step`), 1 without chunks."""
        return self._update_chunks.updates if self._update_chunks is not None else 1

    def _max_steps_reached(self, ahead: int = 0) -> bool:
        """Whether ``trainer.max_steps`` updates are done (``ahead``: after that many more)."""
        if self._trainer is None:
            return False
        max_steps = getattr(self.trainer, "max_steps", -1)
        return max_steps is not None and max_steps > 0 and self.trainer.global_step + ahead >= max_steps

    def _training_update(self, batch, batch_idx: int, last: bool):
        """One update on ``batch``; ``last``: the step's last (its on-step values are logged)."""
        opt = self.optimizers()
        n_struct = int(batch[spk.properties.n_atoms].shape[0])
        kinds = draw_kinds(n_struct, self.energy_fraction, self.label_rng) if self.label_mode == "study" else []
        store: Dict[str, Any] = {}
        ekf = (opt.optimizer if hasattr(opt, "optimizer") else opt) if self._is_ekf() else None  # unwrapped EKF
        if ekf is not None:
            if ekf.label_split:  # sharded EKF under DDP, one structure per update: its rows shared out
                store["split"], store["sum"], store["split_values"] = ekf.split_rows, ekf.sum_rows, ekf.split_values
            xi = opt.step(closure=lambda: self._errors(batch, kinds, store, ekf.params))
            loss = (xi.detach() ** 2).sum()
        else:
            xi = self._errors(batch, kinds, store)
            loss = (xi**2).sum()  # L2 = Σ ξ²
            opt.zero_grad()
            self.manual_backward(loss)
            if self.clip_grad_norm:
                # our own clipping: SchNetPack's trainer config sets gradient_clip_val=0, which Lightning's
                # clip_gradients refuses to combine with a per-call value
                torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.clip_grad_norm)
            opt.step()
        self._step_scheduler()
        log_now = last and self._log_now(batch_idx)
        if "labels" in store:
            self._update_label_rmse(store["labels"], n_struct, log_now, flush=self._last_step_of_epoch(batch_idx))
        else:
            self._update_rmse(store["pred"], batch, "train")
        if log_now:
            self.log("train_loss", loss.detach().to(torch.float32), on_step=True, on_epoch=False, batch_size=n_struct)
            if ekf is not None:
                self.log("ekf_rejected", float(ekf.rejected_updates), on_step=True, on_epoch=False,
                         batch_size=n_struct)
        return loss

    def _log_now(self, batch_idx: int) -> bool:
        """True on the steps whose on-step values Lightning writes to the logger (every
        ``trainer.log_every_n_steps``) and on the first step of an epoch (registers the epoch metrics).
        ``self.log`` costs ~0.3 ms a call, a tenth of an EKF energy update, so the other steps skip it."""
        if self._trainer is None or batch_idx == 0:
            return True
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _step_scheduler(self) -> None:
        sch = self.lr_schedulers()
        if sch is not None and not isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sch.step()

    def on_validation_epoch_start(self) -> None:
        self._val_volume_error = []

    def _collect_volume_error(self, batch: Dict[str, torch.Tensor], energy: torch.Tensor) -> None:
        """Keep (volume per atom Å³, energy error per atom eV) of the periodic structures of a validation batch;
        ``energy`` (B,) is the predicted total energy (eV)."""
        cell, pbc = batch.get(spk.properties.cell), batch.get(spk.properties.pbc)
        if cell is None or pbc is None:
            return
        with torch.no_grad():
            nat = atoms_per_structure(batch).to(energy.device).double()  # (B,)
            cell = cell.reshape(-1, 3, 3).double()  # (B, 3, 3) Å
            periodic = pbc.reshape(-1, 3).all(1).to(energy.device)  # (B,)
            volume = torch.linalg.det(cell).abs().to(energy.device) / nat  # (B,) Å³/atom
            error = (energy.detach().reshape(-1).double() - batch[self.energy_key].reshape(-1).double()) / nat  # (B,)
            keep = periodic & (volume > 0)
            self._val_volume_error.append(torch.stack([volume[keep], error[keep]], 1).cpu())  # (B', 2)

    def _log_pressure_bias(self) -> None:
        """``val_pressure_bias_bar`` from the validation frames collected by :meth:`_collect_volume_error` (all
        processes' frames under DDP); nothing when they do not span more than one volume."""
        from ekf_plugin.model_errors import energy_volume_trend

        rows = torch.cat(self._val_volume_error) if self._val_volume_error else torch.zeros(0, 2, dtype=torch.float64)
        self._val_volume_error = []
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, rows)
            rows = torch.cat(parts)
        rows = rows[torch.isfinite(rows).all(1)]  # (n, 2)
        try:
            trend = energy_volume_trend(rows[:, 0].numpy(), rows[:, 1].numpy())
        except ValueError:  # fewer than 3 periodic frames, or one density only
            return
        self.log("val_pressure_bias_bar", trend["pressure_bias_bar"], on_step=False, on_epoch=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        bad, self._val_nonfinite = self._val_nonfinite, 0
        if bad:
            step = int(self.trainer.global_step) if self._trainer is not None else 0
            raise FloatingPointError(
                f"validation loss is not finite (NaN or inf) on {bad} validation batch(es) after {step} updates: "
                "the model or the validation data is broken (NaN/absurd labels, or a diverged model). Stopping "
                "with an error; the checkpoints written before this validation are kept."
            )
        self._log_pressure_bias()
        sch = self.lr_schedulers() if self.trainer is not None else None
        if isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau) and self.schedule_monitor:
            metric = self.trainer.callback_metrics.get(self.schedule_monitor)
            if metric is not None:
                sch.step(metric)

    # ------------------------------------------------------------------ metrics
    def _update_rmse(self, pred: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor], subset: str) -> None:
        n = int(batch[spk.properties.n_atoms].shape[0])
        if self.energy_key in pred:
            nat = atoms_per_structure(batch).to(pred[self.energy_key].device)
            e_pred = pred[self.energy_key].detach().reshape(-1) / nat
            e_ref = batch[self.energy_key].reshape(-1) / nat
            m = self.rmse[f"{subset}_e"]
            m(e_pred.double(), e_ref.double())
            self.log(f"{subset}_energy_per_atom_rmse", m, on_step=False, on_epoch=True, batch_size=n)
        if self.forces_key in pred:
            m = self.rmse[f"{subset}_f"]
            m(pred[self.forces_key].detach().reshape(-1).double(), batch[self.forces_key].reshape(-1).double())
            self.log(f"{subset}_forces_rmse_all", m, on_step=False, on_epoch=True, batch_size=n)

    # training labels kept before they go into the metrics: one metric update per this many updates, not one per
    # update (torchmetrics' update costs ~0.05 ms a call, 1 % of a BPNN update; the RMSE is the same)
    LABEL_FLUSH_EVERY = 64

    def _update_label_rmse(self, labels: Dict[str, List], n: int, log: bool = True, flush: bool = False) -> None:
        """Training RMSEs from the labels of this update (fast path): eV/atom and eV/Å. The labels are kept and
        go into the metrics every :attr:`LABEL_FLUSH_EVERY` updates and with ``flush`` (the epoch's last step; also
        :meth:`on_train_epoch_end`), before Lightning computes the epoch values. ``log`` registers the metrics with
        Lightning (epoch values, once is enough)."""
        buf = self._label_buffer
        for kind, short, name in (("energy", "e", "energy_per_atom_rmse"), ("forces", "f", "forces_rmse_all")):
            if labels.get(kind):
                buf[kind].extend(labels[kind])
                if log or not self._rmse_registered[short]:
                    self.log(f"train_{name}", self.rmse[f"train_{short}"], on_step=False, on_epoch=True, batch_size=n)
                    self._rmse_registered[short] = True
        if flush or len(buf["energy"]) + len(buf["forces"]) >= self.LABEL_FLUSH_EVERY:
            self._flush_label_rmse()

    def _flush_label_rmse(self) -> None:
        """Put the kept training labels (pred, ref pairs) into the training RMSE metrics."""
        for kind, short in (("energy", "e"), ("forces", "f")):
            pairs = self._label_buffer[kind]
            if pairs:
                pred = torch.cat([p for p, _ in pairs]).double()
                ref = torch.cat([r for _, r in pairs]).double()
                self.rmse[f"train_{short}"].update(pred, ref)
                pairs.clear()

    def _last_step_of_epoch(self, batch_idx: int) -> bool:
        """Whether this training step ends the epoch (its last batch, or ``max_steps`` reached)."""
        if self._trainer is None:
            return True
        return batch_idx + 1 >= self.trainer.num_training_batches or self._max_steps_reached()

    def on_train_epoch_start(self) -> None:
        self._rmse_registered = {"e": False, "f": False}
        self._label_buffer = {"energy": [], "forces": []}

    def on_train_epoch_end(self) -> None:
        """Flush the kept training labels (an epoch stopped early). Multistream EKF under DDP: check that every
        process holds the same weights (logged, error if not)."""
        self._flush_label_rmse()
        dist = torch.distributed
        if not (self._is_ekf() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        with torch.no_grad():
            w = torch.cat([p.detach().reshape(-1).double() for p in self.parameters()])  # (n,)
            probe = torch.stack([w.sum(), (w * torch.arange(1, w.numel() + 1, dtype=w.dtype, device=w.device)).sum()])
            probes = [torch.zeros_like(probe) for _ in range(dist.get_world_size())]
            dist.all_gather(probes, probe)
        spread = float(torch.stack(probes).std(0).max()) if len(probes) > 1 else 0.0
        self.log("ekf_multistream_spread", spread, on_step=False, on_epoch=True, rank_zero_only=True)
        if spread > 1e-9 * max(1.0, float(probe.abs().max())):
            raise RuntimeError(f"multistream EKF: the weights differ between processes (spread {spread:.3g})")

    def setup(self, stage: Optional[str] = None) -> None:
        """Before SchNetPack fits the transforms: with ``resumable_order``, give the datamodule's training loader an
        order that a checkpoint restores (:func:`~ekf_plugin.training.resumable_loader.install_resumable_order`);
        with the BPNN label predictor, compute the training frames' symmetry functions once, fit the scaling from
        them (if not fitted yet) and keep them cached, so the first epoch does not compute them a second time
        (progress bar on stderr)."""
        # Lightning notes at every step checkpoint of a manually optimised module that it holds the weights after
        # the update (15 lines per run in the log): that is this task's contract (the weights, P and the label RNG
        # of the same update are saved together and resume exactly), so that one note is dropped in this process
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.updates_per_step > 1:
            self._update_chunks = install_update_chunks(dm, self.trainer, self.updates_per_step, self.val_seed,
                                                        resumable=self.resumable_order)
        if stage == "fit" and self.resumable_order and self._update_chunks is None:  # the chunks' loader is resumable
            install_resumable_order(dm, self.trainer, self.val_seed)
        if stage == "fit" and self.label_predictor is not None and dm is not None:
            rep = self.label_predictor.representation
            loader = dm.train_dataloader()
            try:
                total = len(loader)
            except TypeError:
                total = None
            self.label_predictor.prepare(loader, fit_scaling=not bool(rep.scaling_fitted), progress=True, total=total)
        super().setup(stage)

    def configure_callbacks(self):
        """With SchNetPack's EMA callback in the trainer: :class:`~ekf_plugin.training.callbacks.EMAGuard`, so that
        training goes on from the training weights, not the averages, after a validation inside an epoch and in a
        resumed run."""
        trainer = self._trainer
        from schnetpack.train import ExponentialMovingAverage  # noqa: PLC0415

        if trainer is not None and any(isinstance(cb, ExponentialMovingAverage) for cb in trainer.callbacks):
            return [EMAGuard()]
        return []

    def on_train_start(self) -> None:
        if self.label_predictor is not None and not self.label_predictor.scaling_unchanged():
            self.label_predictor.clear()  # the scaling was fitted or restored after the features were cached
        if self._update_chunks is not None:
            self._check_step_intervals()

    def _check_step_intervals(self) -> None:
        """With k updates per step, ``trainer.global_step`` moves by k: a callback acting at multiples of its
        ``every_n_train_steps`` (Lightning's ``ModelCheckpoint``, ``WallClock``) needs k to divide it (k was chosen
        so at setup; a callback added later that does not fit is refused)."""
        k = self._steps_k()
        for n in step_intervals(self.trainer.callbacks):  # set at setup already; callbacks added since then
            if n % k:
                raise ValueError(f"{k} updates per training step do not divide a callback's every_n_train_steps={n}: "
                                 "the update counter would jump past its multiples. Set task.updates_per_step to a "
                                 f"divisor of {n}, or to 1")

    def _eval_step(self, batch, subset: str):
        torch.set_grad_enabled(self.grad_enabled)
        targets = {o.target_property: batch[o.target_property] for o in self.outputs}
        pred = self.predict_without_postprocessing(dict(batch))
        pred, targets = self.apply_constraints(pred, targets)
        return self._log_eval(pred, targets, batch, subset)

    def _full_model_step(self):
        """The MD step's evaluator (:class:`~ekf_plugin.bpnn.md_step.BPNNStep`, compiled kernels) on the live
        weights, for validation with the full model (``val_force_components=0``), or None where it does not
        apply: not a plain BPNN (:func:`~ekf_plugin.bpnn.md_step.supports`), outputs other than energy and
        forces, constraints, or no compiled kernels (no compiler, a GPU: the model's own forward is used)."""
        if self._full_step is None:
            self._full_step = False
            from ekf_plugin.bpnn import md_step  # noqa: PLC0415

            names = {o.name for o in self.outputs}
            if (names <= {self.energy_key, self.forces_key} and not any(o.constraints for o in self.outputs)
                    and md_step.supports(self.model)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # no compiler: keep the model's path
                    step = md_step.BPNNStep(self.model, skin=0.0, compile=True)  # frames unrelated: no list reuse
                if step.compile == "native" and step.nets.output_key == self.energy_key:
                    self._full_step = step
        return self._full_step or None

    def _stepped_eval_step(self, batch, subset: str):
        """Full-model validation through :meth:`_full_model_step`: every energy and every force component of
        every structure, the same loss and metrics as :meth:`_eval_step` (the same model; float64 sums), at the
        cost of an MD step per structure with a new neighbour list (45 ms for 192 atoms on one core, against
        100 ms for the model's forward and autograd backward, float32)."""
        targets = {o.target_property: batch[o.target_property] for o in self.outputs}
        return self._log_eval(self._stepped_predictions(batch), targets, batch, subset)

    def _stepped_predictions(self, batch) -> Dict[str, torch.Tensor]:
        """Energies (B,) in eV and forces (N, 3) in eV/Å of a batch by :meth:`_full_model_step`."""
        step = self._full_model_step()
        n_atoms = batch[spk.properties.n_atoms]  # (B,)
        first = torch.cumsum(n_atoms, 0) - n_atoms  # (B,)
        cells = batch[spk.properties.cell].reshape(-1, 3, 3) if spk.properties.cell in batch else None  # (B, 3, 3) Å
        pbcs = batch[spk.properties.pbc].reshape(-1, 3) if spk.properties.pbc in batch else None  # (B, 3)
        energies, forces = [], []
        with torch.no_grad():
            for b in range(int(n_atoms.shape[0])):
                lo, hi = int(first[b]), int(first[b] + n_atoms[b])
                res = step(batch[spk.properties.Z][lo:hi].cpu().numpy(),
                           batch[spk.properties.R][lo:hi].detach().cpu().numpy(),
                           None if cells is None else cells[b].detach().cpu().numpy(),
                           None if pbcs is None else pbcs[b].cpu().numpy())
                energies.append(res.energy.reshape(1)), forces.append(res.forces)
        dtype, device = batch[spk.properties.R].dtype, batch[spk.properties.R].device
        pred = {self.energy_key: torch.cat(energies).to(device=device, dtype=dtype)}  # (B,) eV
        if self.forces_key in {o.name for o in self.outputs}:
            pred[self.forces_key] = torch.cat(forces).to(device=device, dtype=dtype)  # (N, 3) eV/Å
        return pred

    def _log_eval(self, pred, targets, batch, subset: str):
        """Loss, metrics, RMSEs and the volume trend of one evaluated batch (full-model predictions)."""
        loss = self.loss_fn(pred, targets)
        if subset == "val" and not bool(torch.isfinite(loss)):
            self._val_nonfinite += 1
        self.log(f"{subset}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["_idx"]))
        self.log_metrics(pred, targets, subset)
        self._update_rmse(pred, batch, subset)
        if subset == "val" and self.energy_key in pred:
            self._collect_volume_error(batch, pred[self.energy_key])
        return {f"{subset}_loss": loss}

    def _fast_validation(self) -> bool:
        """True when validation can use the label predictor (BPNN, energy/force outputs only)."""
        if self.label_predictor is None or self.val_force_components <= 0:
            return False
        names = {o.name for o in self.outputs}
        return names <= {self.energy_key, self.forces_key} and not any(o.constraints for o in self.outputs)

    def _sampled_eval_step(self, batch, subset: str):
        """Validation from cached features: every energy, a fixed sample of force components (see
        ``val_force_components``); the same loss and metrics as :meth:`_eval_step` on those labels."""
        predictor = self.label_predictor
        n_atoms = batch[spk.properties.n_atoms]  # (B,)
        first = torch.cumsum(n_atoms, 0) - n_atoms  # (B,) first atom of each structure
        energies, comps, picked = [], [], []
        with torch.no_grad():
            for b in range(int(n_atoms.shape[0])):
                n3 = 3 * int(n_atoms[b])
                gen = torch.Generator().manual_seed(self.val_seed * 1_000_003 + int(batch[spk.properties.idx][b]))
                pick = torch.randperm(n3, generator=gen)[: min(self.val_force_components, n3)]  # (k,) flat atom·3+axis
                e, f = predictor.energy_and_force_values(batch, b, pick, keep_columns=True)  # (1,), (k,)
                energies.append(e), comps.append(f)
                picked.append(first[b] * 3 + pick.to(first.device))
        pred = {self.energy_key: torch.cat(energies)}  # (B,) eV
        targets = {self.energy_key: batch[self.energy_key].reshape(-1)}
        if self.forces_key in {o.name for o in self.outputs}:
            pred[self.forces_key] = torch.cat(comps)  # (K,) eV/Å
            targets[self.forces_key] = batch[self.forces_key].reshape(-1)[torch.cat(picked)]  # (K,)
        loss = self.loss_fn(pred, targets)
        if not bool(torch.isfinite(torch.as_tensor(loss))):
            self._val_nonfinite += 1
        self.log(f"{subset}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["_idx"]))
        self.log_metrics(pred, targets, subset)
        if subset == "val":
            self._collect_volume_error(batch, pred[self.energy_key])
        nat = atoms_per_structure(batch).to(pred[self.energy_key].device)  # (B,)
        m = self.rmse[f"{subset}_e"]
        m((pred[self.energy_key] / nat).double(), (targets[self.energy_key] / nat).double())
        self.log(f"{subset}_energy_per_atom_rmse", m, on_step=False, on_epoch=True, batch_size=len(nat))
        if self.forces_key in pred:
            m = self.rmse[f"{subset}_f"]
            m(pred[self.forces_key].double(), targets[self.forces_key].double())
            self.log(f"{subset}_forces_rmse_all", m, on_step=False, on_epoch=True, batch_size=len(nat))
        return {f"{subset}_loss": loss}

    def validation_step(self, batch, batch_idx):
        if self._fast_validation():
            return self._sampled_eval_step(batch, "val")
        if self._full_model_step() is not None:
            return self._stepped_eval_step(batch, "val")
        return self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch, "test")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[_RNG_KEY] = self.label_rng.get_state()
        checkpoint[_UPDATES_PER_STEP_KEY] = self._steps_k()
        if self.selection is not None:
            checkpoint[_SELECTION_KEY] = self.selection.state_dict()

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self._check_resumed_steps(checkpoint)
        if _RNG_KEY in checkpoint:
            self.label_rng.set_state(checkpoint[_RNG_KEY])
        if self.selection is not None and _SELECTION_KEY in checkpoint:
            self.selection.load_state_dict(checkpoint[_SELECTION_KEY])

    def _check_resumed_steps(self, checkpoint: Dict[str, Any]) -> None:
        """A training run resumed inside an epoch needs the ``updates_per_step`` it was written with: Lightning's
        count of the epoch's steps and the loader's position (structures) agree only then. Loading a model
        (no trainer, or not fitting) is not affected."""
        written = int(checkpoint.get(_UPDATES_PER_STEP_KEY, 1))  # checkpoints before the option: one per step
        if written == self._steps_k() or self._trainer is None:
            return
        if getattr(getattr(self.trainer, "state", None), "fn", None) != "fit":
            return
        try:
            loaders = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
            inside = any(isinstance(s, dict) and int(s.get("start", 0)) > 0 for s in loaders)
        except (KeyError, TypeError):
            inside = False
        if inside:
            raise ValueError(f"this checkpoint was written inside an epoch with task.updates_per_step={written}; "
                             f"resume it with task.updates_per_step={written} (this run has {self._steps_k()})")

