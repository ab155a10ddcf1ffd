"""A trained model as an i-PI potential energy surface, in atomic units.

:class:`AtomicUnitsModel` maps i-PI's ``(cell_h, positions)`` (Bohr; ``cell_h`` has the lattice
vectors as **columns**) to ``(energy Ha, forces Ha/Bohr (nat, 3), virial Ha (3, 3), extras)``
with ``W = −∂E/∂ε`` symmetrized, through :class:`ekf_plugin.evaluation.ModelEvaluator`
(Å and eV inside; converted once here with :mod:`ase.units`). Species come from a template
structure file (any ASE-readable file, in i-PI's atom order), since the protocol sends none.

The same file is an i-PI python-driver PES (``__DRIVER_CLASS__``)::

    i-pi-py_driver -u -a water -m custom -P $(python -c 'import ekf_plugin.md.pes as p; print(p.__file__)') \\
        -o template=init.xyz,model=/path/to/best_model,threads=1

or in-process, with no socket::

    <ffdirect name='nnp'> <pes>custom</pes> <pes_path>/abs/path/ekf_plugin/md/pes.py</pes_path>
      <parameters>{template: init.xyz, model: /path/to/best_model}</parameters> </ffdirect>
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from ase import units

try:  # only the PES class needs i-PI; the client loop does not
    from ipi.pes.dummy import Dummy_driver
except ImportError:  # pragma: no cover - i-PI is a dependency, but keep the adaptor usable without it

    class Dummy_driver:  # type: ignore[no-redef]
        def __init__(self, verbose: bool = False, *args: Any, **kwargs: Any) -> None:
            self.verbose = verbose
            self.check_parameters()

        def check_parameters(self) -> None:
            pass


__DRIVER_NAME__ = "ekf_plugin"
__DRIVER_CLASS__ = "EkfPluginDriver"

BOHR = units.Bohr  # Å per Bohr
HARTREE = units.Hartree  # eV per Hartree


class ModelError(RuntimeError):
    """The model cannot produce a valid answer (wrong atom count, non-finite values)."""


def read_template(template: str):
    """First frame of an ASE-readable structure file (``ase.Atoms``, Å), with a clear error if unreadable."""
    from ase.io import read

    if not os.path.exists(template):
        raise ValueError(f"template structure {template!r} does not exist")
    try:
        atoms = read(template, index=0)
    except Exception as exc:  # ASE raises many types for a bad file
        raise ValueError(f"cannot read template structure {template!r}: {type(exc).__name__}: {exc}") from None
    if len(atoms) == 0:
        raise ValueError(f"template structure {template!r} has no atoms")
    return atoms


def read_species(template: str) -> np.ndarray:
    """Atomic numbers (nat,) from an ASE-readable structure file (first frame)."""
    return np.asarray(read_template(template).get_atomic_numbers(), dtype=np.int64)


def check_template(atoms, template: str, model_elements: Optional[Sequence[int]]) -> None:
    """Refuse a template whose species the model does not know, or whose geometry is impossible.

    Elements: every species must be one of ``model_elements`` (atomic numbers; ``None`` skips). Geometry
    (:func:`ekf_plugin.validation.check_geometry`): no atoms on top of each other, distances not shrunk by a
    unit mix-up; with a cell also most H of an H/C/N/O system within 1.3 Å of a heavier atom. Raises
    ``ValueError`` naming the file.
    """
    from ase.data import chemical_symbols

    from ekf_plugin.validation import check_geometry

    z = atoms.get_atomic_numbers()
    if model_elements is not None:
        unknown = sorted(set(z.tolist()) - set(int(e) for e in model_elements))
        if unknown:
            raise ValueError(
                f"template {template!r} has element(s) {[chemical_symbols[u] for u in unknown]} that the model does "
                f"not know (model: {[chemical_symbols[e] for e in model_elements]})"
            )
    periodic = bool(atoms.pbc.any()) and atoms.cell.rank == 3
    check_geometry(z, atoms.positions, atoms.cell.array if periodic else None, atoms.pbc if periodic else (False,) * 3,
                   where=f"template {template!r}", max_lonely_h=None if not periodic else 0.25)


class AtomicUnitsModel:
    """Model evaluation in i-PI's units and conventions.

    Args:
        template: structure file giving the species in i-PI's atom order.
        model: path for :func:`ekf_plugin.models.load_model`, or an ``AtomisticModel``.
        device: torch device (``"cpu"``, ``"cuda"``; default CPU).
        threads: torch threads (default :func:`ekf_plugin.evaluation.default_threads`).
        dtype: ``"float64"`` (default) or ``"float32"``.
        cutoff: neighbor-list cutoff in Å (default: the model's).
        neighbor_list: see :class:`ekf_plugin.evaluation.ModelEvaluator`.
        trust_pickle: allow a full unpickle of a ``best_model`` outside the allow-list (trusted files only).

    At start the template is checked against the model's elements and for an impossible geometry
    (:func:`check_template`); the first structure i-PI sends is checked with the template's species
    (:func:`ekf_plugin.validation.check_geometry`: shortest distances, H near a heavier atom), which
    catches species in the wrong order or a length-unit mix-up before any MD step.
    """

    def __init__(
        self,
        template: str,
        model: Any,
        device: Optional[str] = None,
        threads: Optional[int] = None,
        dtype: str = "float64",
        cutoff: Optional[float] = None,
        neighbor_list: str = "auto",
        trust_pickle: bool = False,
    ) -> None:
        import torch

        from ekf_plugin.evaluation import ModelEvaluator, set_threads

        set_threads(threads)
        if dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
        atoms = read_template(template)
        self.template = str(template)
        self.numbers = np.asarray(atoms.get_atomic_numbers(), dtype=np.int64)
        self.evaluator = ModelEvaluator(
            model,
            device=device,
            dtype=getattr(torch, dtype),
            cutoff=cutoff,
            neighbor_list=neighbor_list,
            trust_pickle=trust_pickle,
        )
        check_template(atoms, self.template, _model_elements(self.evaluator.model))
        self.first_frame_checked = False
        self.monitor = None  # ekf_plugin.uncertainty.monitor.UncertaintyMonitor: σ into the extras (docs/uncertainty.md)
        self.slot_evaluators = [self.evaluator]  # one per batch slot (see compute_batch)
        self.slot_positions: List[Optional[np.ndarray]] = []  # (nat, 3) Bohr: last structure of each slot

    @property
    def natoms(self) -> int:
        return int(self.numbers.shape[0])

    def slot_evaluator(self, slot: int):
        """The evaluator of batch slot ``slot`` (0: :attr:`evaluator`).

        For BPNN potentials (the fast MD step) every slot gets its own
        :class:`ekf_plugin.bpnn.md_step.BPNNStep`, i.e. its own Verlet list, sharing the model's weights:
        a path-integral bead moves little from one step to the next, so each keeps its list. Other models
        keep no per-structure state and every slot uses :attr:`evaluator`.
        """
        while len(self.slot_evaluators) <= slot:
            base = self.evaluator
            if base.fast is None:
                self.slot_evaluators.append(base)
                continue
            from ekf_plugin.bpnn.md_step import BPNNStep

            ev = copy.copy(base)
            ev.fast = BPNNStep(base.model, dtype=base.fast.dtype, skin=base.fast.verlet.skin,
                               neighbor_list=base.fast.verlet.method, compile=base.fast.compile)
            self.slot_evaluators.append(ev)
        return self.slot_evaluators[slot]

    def neighbor_list_summary(self) -> str:
        """``"<builds> Verlet list builds in <calls> evaluations (per slot: …)"`` for the BPNN MD step, else ``""``."""
        steps = [ev.fast for ev in self.slot_evaluators if ev.fast is not None]
        if not steps:
            return ""
        builds, calls = [s.verlet.builds for s in steps], [s.calls for s in steps]
        per = f" (per batch slot: {builds})" if len(steps) > 1 else ""
        return f"{sum(builds)} Verlet list builds in {sum(calls)} evaluations{per}"

    def compute_batch(self, cells: np.ndarray, positions: np.ndarray) -> List[Tuple[float, np.ndarray, np.ndarray, str]]:
        """Evaluate i-PI's batch of B structures, each with the evaluator of its slot (:meth:`assign_slots`).

        For BPNN potentials the B structures are evaluated in one call
        (:func:`ekf_plugin.bpnn.md_step.evaluate_batch`: each slot's Verlet list, the element networks once
        for all structures); other models evaluate them one after the other.

        Args:
            cells: (B, 3, 3) Bohr, lattice vectors as columns.
            positions: (B, nat, 3) Bohr.

        Returns:
            B tuples as :meth:`__call__` returns them.
        """
        slots = self.assign_slots(positions)
        if self.evaluator.fast is None or len(positions) == 1:
            return [self(cells[k], positions[k], slot=slots[k]) for k in range(len(positions))]
        from ekf_plugin.bpnn.md_step import evaluate_batch

        inputs = [self._input(cells[k], positions[k]) for k in range(len(positions))]  # (cell rows Å, positions Å)
        steps = [self.slot_evaluator(c).fast for c in slots]
        results = evaluate_batch(steps, self.numbers, np.stack([x[1] for x in inputs]),
                                 np.stack([x[0] for x in inputs]), pbc=np.ones(3, dtype=bool))
        out = []
        for (cell, pos), res in zip(inputs, results):
            virial = res.virial.detach().cpu().numpy()  # (3, 3) eV
            out.append(self._output(float(res.energy), res.forces.detach().cpu().numpy(), virial, cell, pos))
        return out

    def assign_slots(self, positions: np.ndarray) -> List[int]:
        """Slot of each structure in a batch: the one whose last structure is nearest (least mean squared
        displacement, an optimal one-to-one assignment), so each bead keeps its own Verlet list even when
        i-PI splits a step's beads over several requests in a varying order; structures with no near
        slot take unused ones.

        Args:
            positions: (B, nat, 3) Bohr.

        Returns:
            B distinct slot indices (new slots are numbered after the existing ones).
        """
        from scipy.optimize import linear_sum_assignment

        b = len(positions)
        last = self.slot_positions
        n = max(len(last), b)
        cost = np.empty((b, n))
        for j in range(n):
            ref = last[j] if j < len(last) else None
            if ref is None or ref.shape != positions.shape[1:]:
                cost[:, j] = 1e6 + j  # Bohr²: no history, prefer the lowest free index (moderate: sums stay exact)
            else:
                cost[:, j] = ((positions - ref) ** 2).sum(axis=(1, 2)) / ref.shape[0]
        rows, cols = linear_sum_assignment(cost)
        slots = [0] * b
        for r, c in zip(rows, cols):
            slots[r] = int(c)
        while len(last) < n:
            last.append(None)
        for k, c in enumerate(slots):
            last[c] = np.array(positions[k], dtype=np.float64)
        return slots

    def __call__(self, cell_h: np.ndarray, pos: np.ndarray, slot: int = 0) -> Tuple[float, np.ndarray, np.ndarray, str]:
        """Evaluate one i-PI structure.

        Args:
            cell_h: (3, 3) Bohr, lattice vectors as columns (i-PI's ``h``).
            pos: (nat, 3) or (3·nat,) Bohr, possibly unwrapped.
            slot: batch slot (see :meth:`slot_evaluator`; 0 for unbatched requests).

        Returns:
            ``(energy Ha, forces (nat, 3) Ha/Bohr, virial (3, 3) Ha, extras JSON str)``.

        Raises:
            ModelError: atom count differs from the template, or a result is not finite.
        """
        cell, pos_a = self._input(cell_h, pos)
        res = self.slot_evaluator(slot)(self.numbers, pos_a, cell, pbc=True)
        return self._output(res.energy, res.forces, res.virial, cell, pos_a)

    def _input(self, cell_h: np.ndarray, pos: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(cell rows (3, 3) Å, positions (nat, 3) Å) of one i-PI structure, checked (see :meth:`__call__`)."""
        pos = np.asarray(pos, dtype=np.float64).reshape(-1, 3)
        if pos.shape[0] != self.natoms:
            raise ModelError(
                f"i-PI sent {pos.shape[0]} atoms but the template has {self.natoms}: "
                "use the same structure file for i-PI and the client"
            )
        cell = np.asarray(cell_h, dtype=np.float64).reshape(3, 3).T * BOHR  # rows, Å
        if not (np.isfinite(cell).all() and np.isfinite(pos).all()):
            raise ModelError("i-PI sent non-finite positions or cell (has the simulation blown up?)")
        if not self.first_frame_checked:
            from ekf_plugin.validation import DataValidationError, check_geometry

            try:
                check_geometry(self.numbers, pos * BOHR, cell, (True, True, True),
                               where=f"i-PI's first structure with the species of {self.template!r}")
            except DataValidationError as exc:
                raise ModelError(str(exc)) from None
            self.first_frame_checked = True
        return cell, pos * BOHR

    def _output(self, energy_ev: float, forces_ev: np.ndarray, virial_ev: np.ndarray, cell: np.ndarray,
                pos: np.ndarray) -> Tuple[float, np.ndarray, np.ndarray, str]:
        """i-PI's (energy Ha, forces Ha/Bohr, virial Ha, extras) from eV/Å results of the structure (cell, pos Å)."""
        energy = energy_ev / HARTREE
        forces = forces_ev * (BOHR / HARTREE)  # (nat, 3) Ha/Bohr
        virial = virial_ev / HARTREE  # (3, 3) Ha
        if not (math.isfinite(energy) and np.isfinite(forces).all() and np.isfinite(virial).all()):
            raise ModelError("the model returned non-finite energy, forces or virial; refusing to send them to i-PI")
        extras = self.monitor(self.numbers, pos, cell) if self.monitor is not None else {}
        return energy, forces, virial, json.dumps(extras)


def _model_elements(model) -> Optional[Sequence[int]]:
    """The model's atomic numbers if it has a fixed element list (BPNN, n2p2), else ``None``."""
    from ekf_plugin.models import model_elements

    try:
        return model_elements(model)
    except ValueError:
        return None


class EkfPluginDriver(Dummy_driver):
    """i-PI python-driver PES for ekf-plugin models (``-m custom -P pes.py``, ``<ffdirect>``).

    Arguments (``-o key=value,...`` or ``<parameters>{key: value}``): ``template`` (structure
    file, required), ``model`` (model path, required), ``device``, ``threads``, ``dtype``,
    ``cutoff`` (Å), ``neighbor_list``, ``trust_model`` (``true``: allow a full unpickle of a trusted
    ``best_model``). Extra keywords (``verbosity`` from ``<ffdirect>``) are
    accepted and ignored.
    """

    def __init__(
        self,
        template: Optional[str] = None,
        model: Optional[str] = None,
        device: Optional[str] = None,
        threads: Optional[int] = None,
        dtype: str = "float64",
        cutoff: Optional[float] = None,
        neighbor_list: str = "auto",
        trust_model: Any = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if template is None or model is None:
            raise ValueError("EkfPluginDriver needs template=<structure file> and model=<model path>")
        self._settings = dict(
            template=str(template),
            model=str(model),
            device=device,
            threads=None if threads is None else int(threads),
            dtype=dtype,
            cutoff=None if cutoff is None else float(cutoff),
            neighbor_list=neighbor_list,
            trust_pickle=str(trust_model).lower() in ("1", "true", "yes"),
        )
        kwargs.pop("verbosity", None)
        super().__init__(*args, **kwargs)

    def check_parameters(self) -> None:
        self.model = AtomicUnitsModel(**self._settings)

    def compute_structure(self, cell, pos):
        return self.model(cell, pos)

    def compute(self, cell, pos):
        """One structure, or i-PI's batch (lists of cells and positions, ``<ffdirect>`` with ``<batch_size>``):
        each structure of a batch in its own slot (:meth:`AtomicUnitsModel.compute_batch`)."""
        if isinstance(cell, list):
            if not isinstance(pos, list) or len(cell) != len(pos):
                raise ValueError("Both position and cell should be given as lists to run in batched mode")
            cells = np.stack([np.asarray(c, dtype=np.float64).reshape(3, 3) for c in cell])  # (B, 3, 3)
            return self.model.compute_batch(cells, np.stack([np.asarray(p, dtype=np.float64).reshape(-1, 3) for p in pos]))
        return self.compute_structure(cell, pos)
