"""``BehlerParrinello``: SchNetPack representation of scaled G2/G3 symmetry functions.

Reads ``_atomic_numbers`` (N,), ``_Rij`` (P, 3, Å), ``_idx_i``/``_idx_j`` (P,) — put
``schnetpack.atomistic.PairwiseDistances`` (after ``Strain`` for stress) in the model's input
modules — and writes ``scalar_representation`` (N, n_atom_basis): each element's functions in its
documented order, scaled per function to [s_min, s_max] (study: [−1, 1], SI Eq. 4), zero-padded to
the widest element.

Scaling statistics are computed automatically before training when the model runs under
``spktrain``: SchNetPack's ``AtomisticTask.setup`` calls ``model.initialize_transforms(dm)``, which
calls :meth:`BehlerParrinello.datamodule` (this class is a ``schnetpack.transform.Transform``); it
evaluates the raw functions over ``dm.train_dataloader()`` once and stores min/max in the model
(buffers ``scale_weight``/``scale_bias``). Outside Lightning call :meth:`fit_scaling` yourself.
A model whose scaling is already set (``scaling_fitted``, e.g. loaded from n2p2) is not refitted.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from ase.data import atomic_numbers, chemical_symbols

import ekf_plugin.compat  # noqa: F401  (host fixes before schnetpack)
import schnetpack.properties as props
from schnetpack.transform import Transform

from .presets import WATER_CUTOFF_BOHR, element_symbol, resolve
from .feature_derivatives import ColumnTable, feature_columns
from .symmetry import SymmetryFunctions
from ..data import batch_dicts
from ..units import BOHR


def species_table(elements: Sequence[str]) -> torch.Tensor:
    """(119,) long: atomic number → index in ``elements``, −1 for elements not in the model."""
    table = torch.full((len(chemical_symbols),), -1, dtype=torch.long)
    for n, e in enumerate(elements):
        table[atomic_numbers[e]] = n
    return table


def species_of(z: torch.Tensor, table: torch.Tensor, elements: Sequence[str]) -> torch.Tensor:
    """(N,) element indices; ValueError naming any element the model was not built for."""
    species = table[z]  # (N,)
    if bool((species < 0).any()):
        unknown = sorted({chemical_symbols[int(x)] for x in z[species < 0].unique().tolist()})
        raise ValueError(
            f"structure contains element(s) {', '.join(unknown)} that this model was not built for "
            f"(model elements: {', '.join(elements)})"
        )
    return species


def pair_vectors(inputs: Dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(P, 3) r_ij = R[j] − R[i] + offsets in Å from a SchNetPack batch with a neighbour list."""
    r = inputs[props.R] if dtype is None else inputs[props.R].to(dtype)  # (N, 3)
    idx_i, idx_j = inputs[props.idx_i].to(r.device), inputs[props.idx_j].to(r.device)  # (P,)
    return r[idx_j] - r[idx_i] + inputs[props.offsets].to(device=r.device, dtype=r.dtype)  # (P, 3)


class FeatureRange:
    """Running per-element minimum and maximum of raw symmetry functions, each (E, W) in float64.

    Args:
        elements: the representation's element symbols (E); width: W; device: where the sums live.
    """

    def __init__(self, elements: Sequence[str], width: int, device=None) -> None:
        self.elements = list(elements)
        E = len(self.elements)
        self.g_min = torch.full((E, width), float("inf"), dtype=torch.float64, device=device)  # (E, W)
        self.g_max = torch.full((E, width), float("-inf"), dtype=torch.float64, device=device)  # (E, W)

    def add(self, g: torch.Tensor, species: torch.Tensor) -> None:
        """Include raw features g (N, W) of atoms with element indices ``species`` (N,)."""
        g = g.to(self.g_min.dtype)
        for e in range(len(self.elements)):
            ge = g[species == e]  # (N_e, W)
            if ge.numel():
                self.g_min[e] = torch.minimum(self.g_min[e], ge.min(0).values)
                self.g_max[e] = torch.maximum(self.g_max[e], ge.max(0).values)

    def result(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(g_min, g_max), each (E, W); ValueError naming any element that never occurred."""
        missing = [self.elements[e] for e in range(len(self.elements)) if not torch.isfinite(self.g_min[e, 0])]
        if missing:
            raise ValueError(f"no atoms of element(s) {missing} in the data used for symmetry-function scaling")
        return self.g_min, self.g_max


class BehlerParrinello(Transform):
    """Behler-Parrinello representation (G2 + narrow G3, the study's water preset by default).

    Args:
        elements: element symbols or atomic numbers the model handles, e.g. ``["H", "O"]``.
        symmetry_functions: preset name (``"water_paper"``: the study's 30 O / 27 H functions) or a
            list of G2/G3 records or mappings (:func:`ekf_plugin.bpnn.presets.from_config`).
        cutoff: r_c in Å (default 12 Bohr = 6.3501 Å, the study).
        cutoff_type: ``"tanhu"`` = tanh³(1 − r/r_c) (study), or another :mod:`~ekf_plugin.bpnn.cutoff` type.
        cutoff_alpha: inner-radius fraction for the core cutoff types.
        parameter_unit: length unit of η/r_s in a user list (``"Angstrom"`` or ``"Bohr"``); presets are exact.
        angular_convention: ``"n2p2"`` (each neighbour pair once) or ``"ordered"`` (PiNN); see
            :mod:`ekf_plugin.bpnn.symmetry`.
        scale_range: (s_min, s_max) of the min/max scaling (study: (−1, 1)).
        n_atom_basis: optional check; must equal the widest element's number of functions.
        compile_kernels: fuse the per-triple math with ``torch.compile`` (opt-in; see
            :class:`~ekf_plugin.bpnn.symmetry.SymmetryFunctions`).
    """

    def __init__(
        self,
        elements: Sequence[Union[str, int]] = ("H", "O"),
        symmetry_functions="water_paper",
        cutoff: Optional[float] = None,
        cutoff_type="tanhu",
        cutoff_alpha: float = 0.0,
        parameter_unit: str = "Angstrom",
        angular_convention: str = "n2p2",
        scale_range: Tuple[float, float] = (-1.0, 1.0),
        n_atom_basis: Optional[int] = None,
        compile_kernels: bool = False,
    ) -> None:
        super().__init__()
        self.elements = [element_symbol(e) for e in elements]
        if len(set(self.elements)) != len(self.elements):
            raise ValueError(f"duplicate elements in {self.elements}")
        functions = resolve(symmetry_functions, parameter_unit)
        cutoff = WATER_CUTOFF_BOHR * BOHR if cutoff is None else float(cutoff)
        self.sf = SymmetryFunctions(self.elements, functions, cutoff, cutoff_type, cutoff_alpha, angular_convention,
                                    compile_kernels=compile_kernels)
        self.n_features = list(self.sf.n_features)
        self.n_atom_basis = self.sf.width
        if n_atom_basis is not None and int(n_atom_basis) != self.n_atom_basis:
            raise ValueError(
                f"n_atom_basis={n_atom_basis} but the symmetry functions give {self.n_atom_basis} "
                f"(per element {dict(zip(self.elements, self.n_features))})"
            )
        if not scale_range[1] > scale_range[0]:
            raise ValueError(f"scale_range must be (min, max) with min < max, got {scale_range}")
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.register_buffer("species_table", species_table(self.elements), persistent=False)
        E, W = len(self.elements), self.n_atom_basis
        self.register_buffer("scale_weight", torch.ones(E, W, dtype=torch.float64))
        self.register_buffer("scale_bias", torch.zeros(E, W, dtype=torch.float64))
        self.register_buffer("scaling_fitted", torch.tensor(False))

    @property
    def cutoff(self) -> torch.Tensor:
        """r_c in Å (0-dim tensor; ``spkdeploy`` reads ``representation.cutoff.item()``)."""
        return self.sf.cutoff

    def raw_features(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, n_atom_basis) unscaled symmetry functions (needs ``_Rij``, ``_idx_i``, ``_idx_j``)."""
        species = species_of(inputs[props.Z], self.species_table, self.elements)
        return self.sf(species, inputs[props.Rij], inputs[props.idx_i], inputs[props.idx_j])

    def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        species = species_of(inputs[props.Z], self.species_table, self.elements)
        g = self.sf(species, inputs[props.Rij], inputs[props.idx_i], inputs[props.idx_j])  # (N, W)
        inputs["scalar_representation"] = self.scale(g, species)  # (N, W)
        return inputs

    def scale(self, g: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Scaled features s = G·w + b (N, W) in G's dtype from raw functions G (N, W) of atoms of ``species`` (N,)."""
        w = self.scale_weight.to(g.dtype)[species]  # (N, W)
        b = self.scale_bias.to(g.dtype)[species]  # (N, W)
        return g * w + b  # (N, W)

    def feature_columns(self, inputs: Dict[str, torch.Tensor], atoms: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
        """∂s_i/∂r_{a_l, α_l} of the scaled features for L (atom, Cartesian component) pairs: (L, N, W) per Å.

        ``inputs`` needs the neighbour list and ``_Rij`` (P, 3) in Å, or positions and ``_offsets`` (then only the
        labelled atoms' pair vectors are formed); weights-independent, no graph (see
        :mod:`ekf_plugin.bpnn.feature_derivatives`).
        """
        return self.feature_column_table(inputs, atoms, components).dense()  # (L, N, W)

    def feature_column_table(self, inputs: Dict[str, torch.Tensor], atoms: torch.Tensor,
                             components: torch.Tensor, species: Optional[torch.Tensor] = None) -> ColumnTable:
        """:meth:`feature_columns` before the gather into the feature layout (a
        :class:`~ekf_plugin.bpnn.feature_derivatives.ColumnTable` whose factor includes the scaling);
        ``species`` (N,): the atoms' element indices where the caller has them."""
        if species is None:
            species = species_of(inputs[props.Z], self.species_table, self.elements)  # (N,)
        rij = inputs.get(props.Rij)
        cols = feature_columns(self.sf, species, rij, inputs[props.idx_i], inputs[props.idx_j], atoms, components,
                               positions=inputs[props.R] if rij is None else None,
                               offsets=inputs[props.offsets] if rij is None else None, as_table=True)
        return cols.scaled(self.scale_weight)  # (L, N, W) per Å of the scaled features

    # ---- scaling -----------------------------------------------------------------------------
    def set_scaling(self, g_min: torch.Tensor, g_max: torch.Tensor, g_mean: Optional[torch.Tensor] = None) -> None:
        """Set the affine scaling from per-element statistics, each (E, n_atom_basis).

        Without ``g_mean``: s = s_min + (s_max − s_min)(G − G_min)/(G_max − G_min) (study, Eq. S4).
        With ``g_mean`` (n2p2 ``center_symmetry_functions``): s = s_min + (s_max − s_min)(G − G_mean)/(G_max − G_min).
        Functions with G_max = G_min map to the middle of the range.
        """
        s_min, s_max = self.scale_range
        g_min, g_max = g_min.to(torch.float64), g_max.to(torch.float64)
        span = g_max - g_min
        flat = span.abs() <= 1e-12 * torch.clamp(g_max.abs(), min=1.0)
        weight = torch.where(flat, torch.zeros_like(span), (s_max - s_min) / torch.where(flat, torch.ones_like(span), span))
        ref = g_min if g_mean is None else g_mean.to(torch.float64)
        bias = torch.where(flat, torch.full_like(span, 0.5 * (s_min + s_max)), s_min - weight * ref)
        self.scale_weight.copy_(weight.to(self.scale_weight))
        self.scale_bias.copy_(bias.to(self.scale_bias))
        self.scaling_fitted.fill_(True)

    @torch.no_grad()
    def feature_statistics(self, batches: Iterable[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-element min and max, each (E, n_atom_basis), of the raw functions over ``batches``.

        Batches are SchNetPack batch dicts with a neighbour list (``_idx_i``, ``_idx_j``,
        ``_offsets``); ``_Rij`` is computed here as R[j] − R[i] + offsets (Å).
        """
        device = self.scale_weight.device
        stats = FeatureRange(self.elements, self.n_atom_basis, device)
        for batch in batch_dicts(batches):  # a loader's batches may be lists of batch dicts
            batch = {k: batch[k].to(device) for k in (props.R, props.Z, props.idx_i, props.idx_j, props.offsets)}
            rij = pair_vectors(batch, torch.float64)  # (P, 3) Å
            z = batch[props.Z]
            g = self.raw_features({props.Z: z, props.Rij: rij, props.idx_i: batch[props.idx_i], props.idx_j: batch[props.idx_j]})
            stats.add(g, self.species_table[z])
        return stats.result()

    def fit_scaling(self, batches: Iterable[Dict[str, torch.Tensor]]) -> None:
        """Min/max scaling (SI Eq. 4) from the raw functions over ``batches`` (the training set)."""
        self.set_scaling(*self.feature_statistics(batches))

    def datamodule(self, value) -> None:
        """Called by ``AtomisticTask.setup`` (``spktrain``): fit the scaling on the training split once."""
        if not bool(self.scaling_fitted):
            self.fit_scaling(value.train_dataloader())
