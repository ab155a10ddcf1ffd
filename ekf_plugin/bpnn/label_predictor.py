"""Label predictions for a BPNN with cached symmetry functions: the fast path of the study's schedule.

The symmetry functions do not depend on the weights, so for a ``NeuralNetworkPotential`` whose
representation is :class:`~ekf_plugin.bpnn.BehlerParrinello`:

* the scaled features s (N, W) of every training frame are computed once and cached (keyed by the
  dataset index ``_idx``; a frame whose positions changed since is recomputed);
* an energy label is E = output modules(s): its Jacobian w.r.t. the weights passes through the element
  networks only;
* a force label F_aα = −Σ_i ∇_s E · ∂s_i/∂r_aα uses the weights-independent column ∂s/∂r_aα
  (:meth:`BehlerParrinello.feature_columns`, from the pairs and triples containing atom a) and the
  gradient ∇_s E (one backward through the networks with ``create_graph``), so each row of the force
  Jacobian is a backward pass through the networks, not through the symmetry functions.

Values equal the full model's (tested in float64 to 1e-10); the speed-up of an EKF force update on
192-atom water frames is reported by ``benchmarks/bench_ekf.py``. Only energies and forces: stress
labels are not part of the study's schedule.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

import schnetpack.properties as props
from ..data import batch_dicts
from .feature_derivatives import ColumnTable
from .network_jacobian import NetworkJacobians, supports_closed_form
from .representation import BehlerParrinello, FeatureRange, pair_vectors, species_of


def supports(model: torch.nn.Module) -> bool:
    """True for SchNetPack potentials with a :class:`BehlerParrinello` representation and output modules."""
    return isinstance(getattr(model, "representation", None), BehlerParrinello) and hasattr(model, "output_modules")


def label_predictor_for(
    model: torch.nn.Module, fast_labels: Optional[bool], energy_key: str = "energy", auto: bool = True
) -> Optional["BPNNLabelPredictor"]:
    """The predictor a ``fast_labels`` option asks for: ``None`` → one if ``auto`` and the model is a BPNN,
    ``False`` → none, ``True`` → one (ValueError if the model is not a BPNN)."""
    if fast_labels and not supports(model):
        raise ValueError("fast_labels=True needs a model with a BehlerParrinello representation")
    use = (auto and supports(model)) if fast_labels is None else bool(fast_labels)
    return BPNNLabelPredictor(model, energy_key) if use else None


class BPNNLabelPredictor:
    """Energies and selected force components of a BPNN potential from cached features (module docstring).

    Args:
        model: ``schnetpack.model.NeuralNetworkPotential`` with a ``BehlerParrinello`` representation.
        energy_key: the energy output of the output modules (eV).
        max_cache_bytes: features of more frames than fit are recomputed each time (no eviction).
    """

    def __init__(self, model: torch.nn.Module, energy_key: str = "energy", max_cache_bytes: int = 2 * 2**30) -> None:
        if not supports(model):
            raise TypeError("BPNNLabelPredictor needs a SchNetPack potential with a BehlerParrinello representation")
        self.model = model
        self.energy_key = energy_key
        self.max_cache_bytes = int(max_cache_bytes)
        # _idx → (features (N, W), the positions they are of (N, 3), species (N,))
        self._cache: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # _idx → (pick (k,), columns (k, N, W), positions (N, 3)): the fixed validation components' dG/dr columns
        self._columns: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # the last candidates' columns of :meth:`energy_and_force_values` (threshold selection), taken once by
        # :meth:`force_components_and_rows` for the chosen subset: (key, positions (N, 3), pick (c,), columns (c, N, W))
        self._candidates: Optional[Tuple[Optional[int], torch.Tensor, torch.Tensor, torch.Tensor]] = None
        # the last candidates' ∇_s E with its graph (``energy_and_force_values(graph=True)``), taken once by
        # :meth:`force_components` of the same frame, positions and weights: (key, positions (N, 3), weight versions,
        # ∇_s E (N, W))
        self._graph: Optional[Tuple[Optional[int], torch.Tensor, Tuple[int, ...], torch.Tensor]] = None
        self._bytes = 0
        self._rows: Optional[Tuple[Tuple[int, ...], Optional[NetworkJacobians]]] = None
        self._scaling: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # scaling the cache was filled with
        self._batch_ranges = None  # (batch key, (atom ranges, pair ranges)) of the last batch of several structures
        self._fast = None  # the MD step's feature kernels (BPNNStep.features_only), False where not used
        self._same_elements: Optional[bool] = None  # representation and networks list the elements alike

    @property
    def representation(self) -> BehlerParrinello:
        return self.model.representation

    def clear(self) -> None:
        """Forget all cached features (call when the scaling or the data change)."""
        self._cache.clear()
        self._columns.clear()
        self._candidates = None
        self._graph = None
        self._bytes = 0
        self._scaling = None

    def scaling_unchanged(self) -> bool:
        """True if the representation's scaling is the one the cache was filled with by :meth:`prepare`."""
        if self._scaling is None:
            return False
        rep = self.representation
        return torch.equal(self._scaling[0], rep.scale_weight) and torch.equal(self._scaling[1], rep.scale_bias)

    # ------------------------------------------------------------------ features
    @staticmethod
    def _frame_key(batch: Dict[str, torch.Tensor], b: int) -> Optional[int]:
        """The dataset index ``_idx`` of structure b (the caches' key), None if the batch has none."""
        return int(batch[props.idx][b]) if props.idx in batch else None

    def _structure(self, batch: Dict[str, torch.Tensor], b: int, with_rij: bool = True) -> Dict[str, torch.Tensor]:
        """Input dict of structure b alone (positions, numbers, its neighbour list, Å); with ``with_rij`` also its
        pair vectors ``_Rij`` (an energy from cached features does not need them: 0.2–0.4 ms on 192 atoms)."""
        idx_m = batch[props.idx_m]  # (N_total,)
        if batch[props.n_atoms].shape[0] == 1:  # one structure (the study's batch size): no selection needed
            out = {k: batch[k] for k in (props.Z, props.R, props.idx_i, props.idx_j, props.offsets, props.n_atoms,
                                         props.idx_m)}
            if props.cell in batch:
                out[props.cell] = batch[props.cell]
            if with_rij:
                out[props.Rij] = pair_vectors(out)  # (P, 3) Å
            return out
        atom_ranges, pair_ranges = self._ranges(batch)
        if pair_ranges is not None:  # atoms and pairs stored structure by structure (SchNetPack's collate)
            atoms = torch.arange(*atom_ranges[b], device=idx_m.device)  # (N_b,)
            pairs = torch.arange(*pair_ranges[b], device=idx_m.device)  # (P_b,)
        else:
            atoms = torch.nonzero(idx_m == b).squeeze(-1)  # (N_b,)
            pairs = torch.nonzero(idx_m[batch[props.idx_i]] == b).squeeze(-1)  # (P_b,)
        first = int(atoms[0]) if atoms.numel() else 0
        out = {
            props.Z: batch[props.Z][atoms],
            props.R: batch[props.R][atoms],
            props.idx_i: batch[props.idx_i][pairs] - first,
            props.idx_j: batch[props.idx_j][pairs] - first,
            props.offsets: batch[props.offsets][pairs],
            props.n_atoms: batch[props.n_atoms][b : b + 1],
            props.idx_m: torch.zeros_like(atoms),
        }
        if props.cell in batch:
            out[props.cell] = batch[props.cell][b : b + 1]
        if with_rij:
            out[props.Rij] = pair_vectors(out)  # (P_b, 3) Å
        return out

    def _ranges(self, batch: Dict[str, torch.Tensor]):
        """[(start, stop)] of each structure's atoms and pairs in a batch of several, once per batch (the last
        batch is remembered); pair ranges None when atoms or pairs are not grouped by structure (then
        :meth:`_structure` selects them by index)."""
        key = (id(batch), batch[props.idx_i].data_ptr(), batch[props.idx_m].data_ptr())
        if self._batch_ranges is not None and self._batch_ranges[0] == key:
            return self._batch_ranges[1]
        n_atoms = batch[props.n_atoms].tolist()
        starts = [0]
        for n in n_atoms:
            starts.append(starts[-1] + int(n))
        atom_ranges = list(zip(starts[:-1], starts[1:]))
        owner = batch[props.idx_m].index_select(0, batch[props.idx_i])  # (P,) structure of each pair
        pair_ranges = None
        idx_m = batch[props.idx_m]  # (N,)
        grouped = bool((idx_m[1:] >= idx_m[:-1]).all()) and (owner.numel() == 0 or bool((owner[1:] >= owner[:-1]).all()))
        if grouped:
            counts = torch.bincount(owner, minlength=len(n_atoms)).tolist() if owner.numel() else [0] * len(n_atoms)
            ps = [0]
            for c in counts:
                ps.append(ps[-1] + int(c))
            pair_ranges = list(zip(ps[:-1], ps[1:]))
        self._batch_ranges = (key, (atom_ranges, pair_ranges))
        return atom_ranges, pair_ranges

    @staticmethod
    def _positions_of(structure: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The positions (N_b, 3) a cache entry or memo is valid for, detached (no copy: a memo stores a clone).
        Compared whole with ``torch.equal`` (one operation, exact; a sum and sum of squares cost four more and,
        after an EKF update has streamed P through the caches, ~30 µs)."""
        return structure[props.R].detach()

    def _fast_features(self):
        """The MD step's native pair/triple kernels for raw features (about 4× the representation's forward on
        one core), or None: on CPU only, where the kernels build (else the representation computes them)."""
        if self._fast is None:
            self._fast = False
            rep = self.representation
            if rep.scale_weight.device.type == "cpu":
                import warnings  # noqa: PLC0415

                from .md_step import BPNNStep  # noqa: PLC0415

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # no compiler: the representation's path
                    ev = BPNNStep.features_only(rep, dtype=torch.float64, skin=0.0, compile=True)
                self._fast = ev if ev.compile == "native" else False
        return self._fast or None

    def raw_features(self, batch: Dict[str, torch.Tensor], b: int, structure: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N_b, W) unscaled symmetry functions of structure b of ``batch`` in the positions' dtype, as the
        representation computes them; on CPU from float64 native kernels with their own neighbour list."""
        fast = self._fast_features()
        r = structure[props.R]  # (N_b, 3) Å
        if fast is None:
            if props.Rij not in structure:
                structure = {**structure, props.Rij: pair_vectors(structure)}  # (P_b, 3) Å
            return self.representation.raw_features(dict(structure))
        pbc = batch.get(props.pbc)
        if pbc is not None:
            pbc = pbc.reshape(-1, 3)[b].cpu().numpy()  # (3,)
        cell = structure[props.cell].reshape(3, 3).detach().cpu().numpy() if props.cell in structure else None
        g = fast.raw_features(structure[props.Z].cpu().numpy(), r.detach().cpu().numpy(), cell, pbc)  # (N_b, W)
        return g.to(r.dtype)

    @torch.no_grad()
    def features(self, batch: Dict[str, torch.Tensor], b: int, structure: Optional[Dict] = None) -> torch.Tensor:
        """Scaled features s (N_b, W) of structure b of ``batch`` (cached by ``_idx``), no graph."""
        return self._features_and_species(batch, b, structure)[0]

    @torch.no_grad()
    def _features_and_species(self, batch: Dict[str, torch.Tensor], b: int, structure: Optional[Dict] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scaled features s (N_b, W) and the representation's element index of each atom (N_b,) of structure b,
        both cached by ``_idx`` while the positions are the same."""
        structure = self._structure(batch, b, with_rij=False) if structure is None else structure
        key = self._frame_key(batch, b)
        check = self._positions_of(structure)
        hit = self._cache.get(key) if key is not None else None
        if hit is not None and torch.equal(hit[1], check.to(hit[1].device)):
            return hit[0], hit[2]
        rep = self.representation
        species = species_of(structure[props.Z], rep.species_table, rep.elements)  # (N_b,)
        g = self.raw_features(batch, b, structure)  # (N_b, W)
        s = rep.scale(g, species)  # (N_b, W), as forward
        self._put(key, s, check, species, hit)
        return s, species

    def _put(self, key: Optional[int], s: torch.Tensor, check: torch.Tensor, species: torch.Tensor,
             old: Optional[tuple] = None) -> bool:
        """Cache features s (N_b, W) of frame ``key`` with (a copy of) their positions and the species, within
        ``max_cache_bytes`` (features and positions counted); False where they do not fit."""
        size = s.numel() * s.element_size() + check.numel() * check.element_size()
        if old is not None:
            self._bytes -= old[0].numel() * old[0].element_size() + old[1].numel() * old[1].element_size()
            self._cache.pop(key, None)
        if key is None or self._bytes + size > self.max_cache_bytes:
            return False
        self._cache[key] = (s, check.clone(), species)
        self._bytes += size
        return True

    @torch.no_grad()
    def prepare(self, batches: Iterable[Dict[str, torch.Tensor]], fit_scaling: bool = False,
                progress: bool = False, total: Optional[int] = None) -> int:
        """Compute the features of every structure in ``batches`` once: fit the representation's scaling
        from them (``fit_scaling``, the study's min/max Eq. S4, as ``BehlerParrinello.fit_scaling``) and fill
        the cache with the scaled features, so training starts with one pass over the data, not two.

        Raw functions come from :meth:`raw_features` (on CPU the MD step's native kernels in float64,
        ~20 ms per 192-atom frame with its neighbour list, against ~55 ms for the representation's float32
        forward), rounded to the positions' dtype as the model's own forward pass has them, and accumulated
        in float64 for the scaling statistics. ``progress`` shows a tqdm bar on stderr.
        ``batches``: batch dicts, or lists of them (a training loader with several updates per step).
        Returns the number of structures cached.
        """
        rep = self.representation
        raw = []  # (key, species (N_b,), raw features (N_b, W) float64, positions (N_b, 3), dtype)
        it = batches
        if progress:
            from ekf_plugin.progress import progress_bar  # noqa: PLC0415

            it = progress_bar(batches, total=total, desc="ekf-plugin: symmetry functions of the training frames",
                              unit="batch", leave=False)
        device = rep.scale_weight.device
        stats = FeatureRange(rep.elements, rep.n_atom_basis, device)
        for batch in batch_dicts(it):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for b in range(int(batch[props.n_atoms].shape[0])):
                structure = self._structure(batch, b, with_rij=False)
                species = species_of(structure[props.Z], rep.species_table, rep.elements)  # (N_b,)
                g = self.raw_features(batch, b, structure).to(torch.float64)  # (N_b, W) in the positions' dtype
                stats.add(g, species)
                key = self._frame_key(batch, b)
                raw.append((key, species, g, self._positions_of(structure).clone(), structure[props.R].dtype))
        if fit_scaling:
            rep.set_scaling(*stats.result())
        self.clear()
        self._scaling = (rep.scale_weight.clone(), rep.scale_bias.clone())
        w, bias = rep.scale_weight.to(torch.float64), rep.scale_bias.to(torch.float64)  # (E, W) each
        cached = 0
        for key, species, g, check, dtype in raw:
            s = (g * w[species] + bias[species]).to(dtype)  # (N_b, W) scaled, as BehlerParrinello.forward
            cached += self._put(key, s, check, species, self._cache.get(key) if key is not None else None)
        return cached

    # ------------------------------------------------------------------ predictions
    def _energy_modules(self) -> List[torch.nn.Module]:
        return [m for m in self.model.output_modules if not hasattr(m, "force_key")]

    def _energy_from(self, structure: Dict[str, torch.Tensor], s: torch.Tensor) -> torch.Tensor:
        """(1,) energy in eV of one structure from its scaled features s (N_b, W), graph to the weights."""
        inputs = dict(structure)
        inputs["scalar_representation"] = s
        for module in self._energy_modules():
            inputs = module(inputs)
        return inputs[self.energy_key].reshape(-1)  # (1,)

    def energies(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) predicted energies in eV, differentiable w.r.t. the weights."""
        out = []
        for b in range(int(batch[props.n_atoms].shape[0])):
            structure = self._structure(batch, b, with_rij=False)
            out.append(self._energy_from(structure, self.features(batch, b, structure)))
        return torch.cat(out)  # (B,)

    def force_components(self, batch: Dict[str, torch.Tensor], b: int, pick: torch.Tensor) -> torch.Tensor:
        """(k,) predicted force components in eV/Å of structure b at flat indices ``pick`` (atom ``pick // 3``,
        axis ``pick % 3``), differentiable w.r.t. the weights (the graph runs through the networks only)."""
        structure = self._structure(batch, b, with_rij=False)  # the columns form their labels' pairs only
        check = self._positions_of(structure)  # (N_b, 3) once for both memos
        grad_s = self._candidates_graph(batch, b, check)  # a threshold selection's candidates built it
        if grad_s is None:
            s = self.features(batch, b, structure).clone().requires_grad_(True)  # (N_b, W)
            energy = self._energy_from(structure, s).sum()
            grad_s, = torch.autograd.grad(energy, s, create_graph=True)  # (N_b, W) eV per feature unit
        cols = self._chosen_columns(batch, b, structure, pick.to(grad_s.device), grad_s.dtype, check)  # (k, N_b, W)
        if isinstance(cols, ColumnTable):  # gathered from closed-form candidates' columns
            cols = cols.dense()  # (k, N_b, W)
        return -(grad_s.unsqueeze(0) * cols).sum(dim=(1, 2))  # (k,) eV/Å

    def energy_and_force_values(
        self, batch: Dict[str, torch.Tensor], b: int, pick: torch.Tensor, keep_columns: bool = False,
        graph: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Energy (1,) in eV and force components (k,) in eV/Å of structure b at flat indices ``pick``,
        detached (no graph to the weights): one pass through the networks and one backward to the features.
        The validation path of :class:`~ekf_plugin.training.PaperScheduleTask`.

        ``keep_columns``: keep the components' dG/dr columns (k, N_b, W) with the frame's features (same memory
        budget, valid for the same positions), for a frame that is asked for the same ``pick`` again: the fixed
        validation sample, whose columns then cost nothing after the first validation (~230 kB per 192-atom frame
        and 10 components in float32).

        ``graph``: keep ∇_s E with its graph to the weights for the next :meth:`force_components` of this frame
        (the autograd path of a threshold selection: the chosen components' values and gradients then come from
        this one pass through the networks instead of a second one; bitwise the same, tested)."""
        structure = self._structure(batch, b, with_rij=False)  # the columns form their labels' pairs only
        self._graph = None
        with torch.enable_grad():
            s = self.features(batch, b, structure).clone().requires_grad_(True)  # (N_b, W)
            energy = self._energy_from(structure, s)  # (1,)
            grad_s, = torch.autograd.grad(energy.sum(), s, create_graph=graph)  # (N_b, W) eV per feature unit
        key, check = self._frame_key(batch, b), self._positions_of(structure)  # the memos' validity: frame, positions
        if graph:
            self._graph = (key, check.clone(), self._weight_versions(), grad_s)
            grad_s = grad_s.detach()
        pick = pick.to(s.device)
        cols = self._kept_columns(key, check, pick) if keep_columns else None
        if cols is None:
            cols = self.representation.feature_columns(structure, pick // 3, pick % 3).to(s.dtype)  # (k, N_b, W) per Å
            if keep_columns:
                self._keep_columns(key, check.clone(), pick, cols)
            else:  # candidates of a threshold selection: the chosen ones' rows follow (force_components_and_rows)
                self._candidates = (key, check.clone(), pick.clone(), cols)
        return energy.detach(), -torch.einsum("nw,knw->k", grad_s, cols)  # (1,), (k,)

    def candidate_force_values(self, batch: Dict[str, torch.Tensor], b: int, pick: torch.Tensor,
                               rows: NetworkJacobians) -> torch.Tensor:
        """Force components (k,) in eV/Å of structure b at flat indices ``pick``, detached, without rows: a threshold
        selection's candidates where the rows are closed-form (``rows``). Their columns are kept (the compiled
        column table) for the chosen components' :meth:`force_components_and_rows` on this frame, which takes them
        from here; the values come from the compiled rows kernel by reverse mode (:meth:`NetworkJacobians.force_values`:
        those :meth:`force_components_and_rows` gives the chosen components to round-off, which the update's ξ then
        takes), not from a second pass through the networks by autograd as in :meth:`energy_and_force_values`."""
        structure = self._structure(batch, b, with_rij=False)  # the columns form their labels' pairs only
        s, species = self._features_and_species(batch, b, structure)  # (N_b, W), (N_b,)
        net_species = self._network_species(structure, species)  # (N_b,)
        self._graph = None
        pick = pick.to(s.device)
        # in the networks' element order the table, read by the rows without a gather
        cols = self._new_columns(structure, pick, s.dtype, species if net_species is species else None)
        self._candidates = (self._frame_key(batch, b), self._positions_of(structure).clone(), pick.clone(), cols)
        return rows.force_values(s, net_species, cols)  # (k,)

    def _weight_versions(self) -> Tuple[int, ...]:
        return tuple(p._version for p in self._energy_modules()[0].parameters())  # bumped by every in-place update

    def _memo_valid(self, memo: Optional[tuple], batch, b: int, check: torch.Tensor) -> bool:
        """Whether a memo ``(frame key, positions (N_b, 3), ...)`` was made for structure b of ``batch`` with the
        positions ``check`` (:meth:`_positions_of`)."""
        return (memo is not None and memo[0] is not None and memo[0] == self._frame_key(batch, b)
                and torch.equal(memo[1], check.to(memo[1].device)))

    def _candidates_graph(self, batch, b: int, check: torch.Tensor) -> Optional[torch.Tensor]:
        """∇_s E (N_b, W) with its graph from the last ``energy_and_force_values(graph=True)`` (taken once) when it
        was of this frame, with these positions ``check`` and these weights, else None."""
        memo, self._graph = self._graph, None
        ok = self._memo_valid(memo, batch, b, check) and memo[2] == self._weight_versions()
        return memo[3] if ok else None

    def _kept_columns(self, key: Optional[int], check: torch.Tensor, pick: torch.Tensor) -> Optional[torch.Tensor]:
        hit = self._columns.get(key) if key is not None else None
        if hit is None or not torch.equal(hit[0], pick):
            return None
        return hit[1] if torch.equal(hit[2], check.to(hit[2].device)) else None

    def _keep_columns(self, key: Optional[int], check: torch.Tensor, pick: torch.Tensor, cols: torch.Tensor) -> None:
        size = cols.numel() * cols.element_size()
        if key is None or self._bytes + size > self.max_cache_bytes:
            return
        old = self._columns.pop(key, None)
        if old is not None:
            self._bytes -= old[1].numel() * old[1].element_size()
        self._columns[key] = (pick.clone(), cols, check)
        self._bytes += size

    # ------------------------------------------------------------------ closed-form Jacobian rows
    def closed_form(self, params: Sequence[torch.Tensor]) -> Optional[NetworkJacobians]:
        """Closed-form row builder for the column order ``params`` (None if the networks do not qualify,
        see :func:`~ekf_plugin.bpnn.network_jacobian.supports_closed_form`, or if a weight outside the
        element networks requires grad)."""
        key = tuple(id(p) for p in params)
        if self._rows is not None and self._rows[0] == key:
            return self._rows[1]
        nets = self._energy_modules()
        ok = len(nets) == 1 and supports_closed_form(nets[0])
        if ok:
            inside = {id(p) for p in nets[0].parameters()}
            ok = all(id(p) in inside for p in params)
        builder = NetworkJacobians(nets[0], params) if ok else None
        self._rows = (key, builder)
        return builder

    def energies_and_rows(self, batch: Dict[str, torch.Tensor], rows: NetworkJacobians,
                          share: Tuple[int, int] = (0, 1)) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B,) energies in eV and their rows (B, n) = ∂E_b/∂θ, without autograd. ``share`` = (r, W): the part of
        element networks r, r + W, … (:meth:`NetworkJacobians.energy`); the W shares sum to the whole."""
        values, out = [], []
        for b in range(int(batch[props.n_atoms].shape[0])):
            structure = self._structure(batch, b, with_rij=False)
            s, species = self._features_and_species(batch, b, structure)  # (N_b, W), (N_b,)
            e, r = rows.energy(s, self._network_species(structure, species), share)  # (1,), (1, n)
            values.append(e), out.append(r)
        if len(values) == 1:  # one structure (the study's batch): no copy
            return values[0], out[0]  # (1,), (1, n)
        return torch.cat(values), torch.cat(out)  # (B,), (B, n)

    def force_components_and_rows(
        self, batch: Dict[str, torch.Tensor], b: int, pick: torch.Tensor, rows: NetworkJacobians
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`force_components` (k,) in eV/Å with their rows (k, n) = ∂F/∂θ, without autograd."""
        structure = self._structure(batch, b, with_rij=False)  # the columns form their labels' pairs only
        s, species = self._features_and_species(batch, b, structure)  # (N_b, W), (N_b,)
        net_species = self._network_species(structure, species)  # (N_b,)
        # in the networks' element order the rows read the column table (no gather)
        cols = self._chosen_columns(batch, b, structure, pick.to(s.device), s.dtype, self._positions_of(structure),
                                    table=species if net_species is species else None)
        return rows.forces(s, net_species, cols)  # (k,), (k, n)

    def _chosen_columns(self, batch, b: int, structure, pick: torch.Tensor, dtype: torch.dtype,
                        check: torch.Tensor, table: Optional[torch.Tensor] = None):
        """(k, N_b, W) dG/dr columns per Å of the force components ``pick`` of structure b (positions ``check``),
        in ``dtype``: gathered from a threshold selection's candidates when ``pick`` is among them, else computed
        (given the representation's species (N_b,) as ``table``, as a
        :class:`~ekf_plugin.bpnn.feature_derivatives.ColumnTable` for the closed-form rows)."""
        cols = self._candidate_columns(batch, b, check, pick)
        return self._new_columns(structure, pick, dtype, table) if cols is None else cols.to(dtype)

    def _new_columns(self, structure, pick: torch.Tensor, dtype: torch.dtype, table: Optional[torch.Tensor] = None):
        """(k, N_b, W) dG/dr columns per Å of the force components ``pick`` of ``structure``, computed, in ``dtype``;
        given the representation's species (N_b,) as ``table``, as a
        :class:`~ekf_plugin.bpnn.feature_derivatives.ColumnTable` (lazily)."""
        rep = self.representation
        if table is not None:
            return rep.feature_column_table(structure, pick // 3, pick % 3, table).to(dtype)  # (k, N_b, W) lazily
        return rep.feature_columns(structure, pick // 3, pick % 3).to(dtype)  # (k, N_b, W)

    def _candidate_columns(self, batch, b: int, check: torch.Tensor, pick: torch.Tensor) -> Optional[torch.Tensor]:
        """(k, N_b, W) columns of ``pick`` gathered from the last candidates' columns (taken once) when ``pick`` is
        a subset of them on the same frame and positions ``check``, else None. A column does not depend
        on the other labels of its call, so the gather equals a new evaluation bitwise (tested)."""
        memo, self._candidates = self._candidates, None
        if not self._memo_valid(memo, batch, b, check):
            return None
        _, _, cand, cols = memo
        where = (cand.to(pick.device).unsqueeze(0) == pick.unsqueeze(1))  # (k, c)
        if not bool(where.any(dim=1).all()):
            return None
        sel = where.to(torch.int8).argmax(dim=1)  # (k,) position of each pick among the candidates
        if isinstance(cols, ColumnTable):  # (k, N_b, S) of the table: the same columns, lazily
            return cols._replace(table=cols.table.index_select(0, sel.to(cols.table.device)))
        return cols[sel.to(cols.device)]  # (k, N_b, W)

    def _species(self, structure: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N_b,) element index of each atom in the networks' element order."""
        nets = self._energy_modules()[0]
        return species_of(structure[props.Z], nets.species_table, nets.elements)

    def _network_species(self, structure: Dict[str, torch.Tensor], species: torch.Tensor) -> torch.Tensor:
        """:meth:`_species` from the representation's element indices ``species`` (N_b,) of the feature cache:
        the same tensor where both list the elements in the same order (the builders' case), else looked up."""
        if self._same_elements is None:
            nets = self._energy_modules()[0]
            self._same_elements = list(nets.elements) == list(self.representation.elements)
        return species if self._same_elements else self._species(structure)
