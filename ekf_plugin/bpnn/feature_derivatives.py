"""Columns ∂G/∂r_aα of the symmetry-function Jacobian from the neighbourhood of atom a.

A force label F_aα = −Σ_i ∇_G E_i · ∂G_i/∂r_aα needs one column of dG/dr per label. The columns do not
depend on the network weights: with them (and the cached features), the Jacobian of a force label w.r.t.
the weights passes through the element networks only, not through the symmetry functions.

Everything is built from the pairs of a (its row of the neighbour list, ~106 on 192-atom water with
r_c = 6.35 Å), by translation invariance: put the moved copy of a at the origin and hold every other
point fixed, also the periodic images of a itself (their motion is counted when the image is the
origin, i.e. through the pair list of a, which holds each image once per offset).

* radial: a pair (a → p) with vector u contributes −h'(|u|) û_α to G2 of a (neighbour element of p) and
  the same to G2 of p (neighbour element of a), h(r) = exp(−η (r − r_s)²) f_c(r);
* angular: every unordered pair {p, q} of pairs of a with |r_pq| < r_c (r_pq = u_q − u_p) is a triangle
  whose three triples (a; p, q), (p; a, q) and (q; a, p) all contain a. The narrow G3 term of a triple is
  R_k · (1 + λ cos θ_c)^ζ with the side factor R_k = h_k(|u_p|) h_k(|u_q|) h_k(|r_pq|) common to the three
  (k: distinct (η, r_s); h_k as above), so R_k and ∂R_k/∂r_aα are computed once per triangle and combined
  with the three angles per distinct (λ, ζ). |r_pq| does not move with a (no f_c' of that side needed).

Every (triple, vertex that is an image of a) is met exactly once that way, so the sum is the column.
The pair vectors of p → q are taken as u_q − u_p: exact for a neighbour list whose vectors are
R_j − R_i + offsets in one precision; with float32 offsets the columns agree with the per-triple route to
float32 rounding.

Cost (192-atom water, 10 labels, ~19 000 triangles, 1 thread; the previous per-triple implementation, kept
as the tests' reference, took 23-27 ms): the torch path is a fixed sequence of ~60 vectorised ops (about 3-4 ms);
the compiled kernel (default on CPU where a C++ compiler is found; ``EKF_PLUGIN_NATIVE_COLUMNS=0`` or
``native=False`` turns it off; :func:`native_module`, built by :mod:`ekf_plugin.native` in about a second on
first use and cached on disk) builds the label atoms' pair slots, the radial part and the angular part in one call
(:func:`_columns_native`; 2.1 against 3.0 ms for the slots and radial part in torch beside the same angular
loop, 10 labels, one core beside two trainings). Its angular loop takes the triangles of a label 256 at a time as
structure of arrays, so the geometry, the angle factors and the terms of every key vectorise (``-march=native``)
and only the sums into the accumulators stay scalar: 30 labels in 5.7 against 10.7 ms for the loop that took one
triangle at a time (``_columns_native`` alone, float32, the same frames interleaved in one process, two
trainings on the two cores). Nothing is cached per frame:
the pairs of the label atoms come from a binary search of the centre-sorted list (two ``searchsorted`` on the torch
path, one compiled call on the native one); transient memory is
O(L·M²) for the triangle search plus O(T·U_a) per call (~15 MB in float64 on the torch path).

Shapes: L labels, N atoms, P pairs, M = max pairs per label atom, T triangles of all labels; lengths in Å.
Pair lists sorted by centre (SchNetPack/matscipy, ASE) need no extra tables; an unsorted list is sorted
once per call (``torch.argsort``).
"""

from __future__ import annotations

import ctypes
import math
import os
import weakref
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from ..native import VECTOR_MATH
from .symmetry import SymmetryFunctions


class _Keys(NamedTuple):
    """Per (device, dtype) constants of a :class:`SymmetryFunctions` for the columns."""

    rad_eta: torch.Tensor  # (U_r,) η of the distinct G2 (η, r_s) in Å⁻²
    rad_rs: torch.Tensor  # (U_r,) r_s in Å
    side_eta: torch.Tensor  # (K,) η of the distinct (η, r_s) of the angular keys, Å⁻²
    side_rs: torch.Tensor  # (K,) r_s in Å
    side_of_key: torch.Tensor  # (U_a,) k of every angular key
    lam: torch.Tensor  # (C,) λ of the distinct (λ, ζ) of the angular keys
    zeta: torch.Tensor  # (C,) ζ
    angle_of_key: torch.Tensor  # (U_a,) c of every angular key
    zeta_runs: List[Tuple[float, int, int]]  # (ζ, first, end) runs of equal ζ over the (λ, ζ) columns
    triangle_penalty: torch.Tensor  # (E, E, E) 0 where one of the triangle's three triples has functions, else 1
    native: Tuple[torch.Tensor, ...]  # kernel tables: ζ (C,) long, first sorted column of every (λ, ζ) (C+1,),
    # side of every key and its output column with keys sorted by (λ, ζ) (U_a,) each, penalty (E, E, E) bool
    native_args: tuple  # label_columns' constant arguments: addresses of the tables above and their sizes
    native_cutoff: tuple  # (r_c in Å, kind, norm) of the cutoff in the kernel, or () where it has not got it


_KEYS: "weakref.WeakKeyDictionary[SymmetryFunctions, Dict]" = weakref.WeakKeyDictionary()


def _keys(sf: SymmetryFunctions, dtype: torch.dtype, device: torch.device) -> _Keys:
    """The column constants of ``sf``, built once per (dtype, device, buffer dtype) and kept beside ``sf``."""
    cache = _KEYS.setdefault(sf, {})
    key = (dtype, device, sf.ang_eta.dtype, sf.rad_eta.dtype)
    hit = cache.get(key)
    if hit is not None:
        return hit
    E = len(sf.elements)
    ang = list(zip(sf.ang_eta.tolist(), sf.ang_rs.tolist(), sf.ang_lam.tolist(), sf.ang_zeta.tolist()))
    sides = sorted({(e, r) for e, r, _, _ in ang})
    angles = sorted({(lam, z) for _, _, lam, z in ang}, key=lambda c: (c[1], c[0]))  # equal ζ contiguous
    runs: List[List] = []
    for n, (_, z) in enumerate(angles):
        z = int(z) if float(z).is_integer() else z
        if runs and runs[-1][0] == z:
            runs[-1][2] = n + 1
        else:
            runs.append([z, n, n + 1])
    used = sf.triplet_used.view(E, E, E).cpu()  # (E, E, E) [centre, j, k]
    pen = torch.ones(E, E, E)  # (E, E, E) [e_a, e_p, e_q]
    for a in range(E):
        for p in range(E):
            for q in range(E):
                if used[a, p, q] or used[p, a, q] or used[q, a, p]:
                    pen[a, p, q] = 0.0

    def t(values, kind=dtype):
        return torch.tensor(values, dtype=kind, device=device)

    angle_of_key = t([angles.index((lam, z)) for _, _, lam, z in ang], torch.long)  # (U_a,)
    side_of_key = t([sides.index((e, r)) for e, r, _, _ in ang], torch.long)  # (U_a,)
    col = torch.argsort(angle_of_key, stable=True)  # (U_a,) keys grouped by (λ, ζ)
    run = torch.cumsum(torch.bincount(angle_of_key, minlength=len(angles)), 0)  # (C,)
    native = (t([round(c[1]) for c in angles], torch.long), torch.cat([run.new_zeros(1), run]),
              side_of_key.index_select(0, col).contiguous(), col.contiguous(), pen.to(device) > 0)
    rad_eta, rad_rs = (v.to(device=device, dtype=dtype).contiguous() for v in (sf.rad_eta, sf.rad_rs))
    side_eta, side_rs, lam = t([s[0] for s in sides]), t([s[1] for s in sides]), t([c[0] for c in angles])
    native_args = (rad_eta.data_ptr(), rad_rs.data_ptr(), sf.n_rad_keys, side_eta.data_ptr(), side_rs.data_ptr(),
                   lam.data_ptr(), *(v.data_ptr() for v in native), len(sides), len(angles), sf.n_ang_keys)
    keys = _Keys(
        rad_eta=rad_eta, rad_rs=rad_rs, side_eta=side_eta, side_rs=side_rs,
        side_of_key=side_of_key, lam=lam, zeta=t([c[1] for c in angles]),
        angle_of_key=angle_of_key, zeta_runs=[tuple(r) for r in runs],
        triangle_penalty=pen.to(device=device, dtype=dtype), native=native, native_args=native_args,
        native_cutoff=() if _native_cutoff(sf.cutoff_fn) is None else (float(sf.cutoff), *_native_cutoff(sf.cutoff_fn)),
    )
    cache[key] = keys
    return keys


class _Slots(NamedTuple):
    """The pairs of every label atom in a padded (L, M) table (invalid slots: outside r_c or padding)."""

    valid: torch.Tensor  # (L, M) bool
    u: torch.Tensor  # (L, M, 3) pair vector a → p in Å; (2 r_c, 0, 0) where invalid
    r: torch.Tensor  # (L, M) |u| in Å
    x: torch.Tensor  # (L, M) û_α, α the label's component
    atom: torch.Tensor  # (L, M) neighbour atom p
    element: torch.Tensor  # (L, M) element of p


def _centre_ranges(idx_i: torch.Tensor, atoms: torch.Tensor):
    """Where the pairs of each label atom lie in the centre-sorted pair list: (order, first, count, M) with
    ``order`` (P,) the stable sort of an unsorted ``idx_i`` (None when it is sorted already), ``first`` and
    ``count`` (L,) the range of a_l's pairs in sorted order, M = max(count, 1)."""
    n_pairs = idx_i.shape[0]
    order = None
    if n_pairs > 1 and not bool((idx_i[1:] >= idx_i[:-1]).all()):
        order = torch.argsort(idx_i, stable=True)  # (P,)
        idx_i = idx_i.index_select(0, order)  # (P,) sorted
    first = torch.searchsorted(idx_i, atoms)  # (L,)
    count = torch.searchsorted(idx_i, atoms, right=True) - first  # (L,)
    return order, first, count, max(int(count.max()) if count.numel() else 0, 1)


def _label_slots(sf, species, r_ij, idx_i, idx_j, atoms, components, positions=None, offsets=None) -> _Slots:
    """Pairs with centre a_l of every label, gathered from the neighbour list sorted by centre. Their vectors
    come from ``r_ij`` (P, 3), or when it is None from ``positions`` (N, 3) and ``offsets`` (P, 3) for the
    gathered pairs only."""
    ref = r_ij if r_ij is not None else positions
    device, dtype = ref.device, ref.dtype
    n_pairs = idx_i.shape[0]
    idx_i_orig = idx_i  # (P,) in list order
    order, first, count, m = _centre_ranges(idx_i, atoms)
    slot = torch.arange(m, device=device)  # (M,)
    listed = slot[None, :] < count[:, None]  # (L, M)
    pos = (first[:, None] + slot[None, :]).clamp(max=max(n_pairs - 1, 0)).reshape(-1)  # (L·M,)
    if order is not None:
        pos = order.index_select(0, pos)  # (L·M,)
    if n_pairs == 0:
        pos = torch.zeros_like(pos)
        r_ij = ref.new_zeros(1, 3)
        idx_j = idx_i.new_zeros(1)
    if r_ij is not None:
        u = r_ij.index_select(0, pos).view(atoms.shape[0], m, 3)  # (L, M, 3)
    else:  # r_j − r_i + offset of the gathered pairs, as representation.pair_vectors
        r_j = positions.index_select(0, idx_j.index_select(0, pos))  # (L·M, 3)
        r_i = positions.index_select(0, idx_i_orig.index_select(0, pos))  # (L·M, 3)
        off = offsets.index_select(0, pos).to(device=device, dtype=dtype)  # (L·M, 3) Å
        u = (r_j - r_i + off).view(atoms.shape[0], m, 3)  # (L, M, 3)
    rc = float(sf.cutoff)
    valid = listed & ((u * u).sum(-1) < rc * rc)  # (L, M)
    far = torch.tensor([2.0 * rc, 0.0, 0.0], dtype=dtype, device=device)  # (3,)
    u = torch.where(valid[:, :, None], u, far)  # (L, M, 3)
    r = torch.linalg.vector_norm(u, dim=-1)  # (L, M)
    x = u.gather(2, components.view(-1, 1, 1).expand(-1, m, 1)).squeeze(2) / r  # (L, M)
    atom = idx_j.index_select(0, pos).view(atoms.shape[0], m)  # (L, M)
    return _Slots(valid, u, r, x, atom, species.index_select(0, atom.reshape(-1)).view_as(atom))


class ColumnTable(NamedTuple):
    """The columns of L labels before the gather into the feature layout: column[l, i, w] =
    ``table[l, i, slot[e_i, w]] · factor[e_i, w]`` with e_i = ``species[i]``. The compiled rows
    (:mod:`ekf_plugin.bpnn.native_rows`) read it so; :meth:`dense` is the (L, N, W) tensor."""

    table: torch.Tensor  # (L, N, S) per slot: E·U_r radial, then E·E·U_a angular
    slot: torch.Tensor  # (E, W) int64 slot of each feature of each element
    factor: torch.Tensor  # (E, W) prefactor of each feature (and any scaling), table's dtype
    species: torch.Tensor  # (N,) element of each atom

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(L, N, W) of the dense columns."""
        return (self.table.shape[0], self.table.shape[1], self.slot.shape[1])

    def dense(self) -> torch.Tensor:
        """(L, N, W) columns in the feature layout."""
        sel = self.slot[self.species].expand(self.table.shape[0], -1, -1)  # (L, N, W)
        return torch.gather(self.table, 2, sel) * self.factor[self.species]  # (L, N, W)

    def scaled(self, weight: torch.Tensor) -> "ColumnTable":
        """The same columns times a per-(element, feature) ``weight`` (E, W), e.g. the representation's scaling."""
        return self._replace(factor=self.factor * weight.to(self.factor.dtype))

    def to(self, dtype: torch.dtype) -> "ColumnTable":
        return self if self.table.dtype == dtype else self._replace(table=self.table.to(dtype),
                                                                    factor=self.factor.to(dtype))


@torch.no_grad()
def feature_columns(
    sf: SymmetryFunctions,
    species: torch.Tensor,
    r_ij: torch.Tensor,
    idx_i: torch.Tensor,
    idx_j: torch.Tensor,
    atoms: torch.Tensor,
    components: torch.Tensor,
    native: Optional[bool] = None,
    positions: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    as_table: bool = False,
):
    """∂G_i/∂r_{a_l, α_l} of the raw symmetry functions for L (atom, component) labels.

    Args:
        sf: the symmetry functions.
        species: (N,) element index per atom.
        r_ij: (P, 3) pair vectors r_j − r_i (+ cell offset) in Å, full neighbour list (both directions); or None
            with ``positions`` (N, 3) Å and ``offsets`` (P, 3) Å: then only the labelled atoms' pairs are formed
            (a 192-atom water frame has ~25 k pairs, a force update needs the ~10 × 130 of its labels).
        idx_i, idx_j: (P,) atoms of each pair.
        atoms: (L,) atom a_l of each label.
        components: (L,) Cartesian component α_l ∈ {0, 1, 2} of each label.
        native: angular part by the compiled CPU kernel (:func:`native_module`) where it applies (CPU tensors,
            integer ζ, tanhu/tanh/cos cutoff); ``None``: ``NATIVE_DEFAULT`` (on unless env ``EKF_PLUGIN_NATIVE_COLUMNS=0``).

    Returns:
        (L, N, width) in the feature layout of :meth:`SymmetryFunctions.forward`, in feature units per Å; with
        ``as_table`` the same as a :class:`ColumnTable` (no gather: the compiled rows read the table).
    """
    n_atoms, n_labels = species.shape[0], atoms.shape[0]
    E = len(sf.elements)
    atoms, components = atoms.to(idx_i.device), components.to(idx_i.device)
    ref = r_ij if r_ij is not None else positions
    keys = _keys(sf, ref.dtype, ref.device)
    native = NATIVE_DEFAULT if native is None else native
    table = None
    if native and _native_supported(sf, ref):
        module = native_module()
        if module is not None:  # slots, radial and angular parts in one compiled call
            table = _columns_native(module, sf, keys, species, r_ij, idx_i, idx_j, atoms, components, positions,
                                    offsets)  # (L, N, S)
    if table is None:
        slots = _label_slots(sf, species, r_ij, idx_i, idx_j, atoms, components, positions, offsets)
        label_elem = species.index_select(0, atoms)  # (L,) element of a_l
        rad = _radial_columns(sf, keys, slots, atoms, label_elem, n_atoms)  # (L·N·E, U_r)
        ang = _angular_columns(sf, keys, slots, atoms, components, label_elem, n_atoms, native)  # (L·N·E·E, U_a)
        rad = rad.reshape(n_labels, n_atoms, E * sf.n_rad_keys)  # (L, N, E·U_r)
        ang = ang.reshape(n_labels, n_atoms, E * E * sf.n_ang_keys)  # (L, N, E·E·U_a)
        table = torch.cat([rad, ang], 2)  # (L, N, S)
    columns = ColumnTable(table, sf.feature_slot, sf.feature_prefactor.to(ref.dtype), species)
    return columns if as_table else columns.dense()  # (L, N, W)


def _radial_columns(sf, keys: _Keys, slots: _Slots, atoms, label_elem, n_atoms: int) -> torch.Tensor:
    """(L·N·E, U_r) tangents of the radial slots: −h'(|u|) û_α to rows (a, e_p) and (p, e_a) per pair a → p."""
    E, (L, M), U_r = len(sf.elements), slots.r.shape, sf.n_rad_keys
    rad = slots.r.new_zeros(L * n_atoms * E, U_r)  # (L·N·E, U_r)
    if not (U_r and L):
        return rad
    f, g = sf.cutoff_fn.value_and_derivative(slots.r)  # (L, M) each; 0 at invalid slots (r = 2 r_c)
    y = slots.r[:, :, None] - keys.rad_rs  # (L, M, U_r)
    gauss = torch.exp(-keys.rad_eta * y * y)  # (L, M, U_r)
    terms = gauss * (2.0 * keys.rad_eta * y * f[:, :, None] - g[:, :, None]) * slots.x[:, :, None]  # (L, M, U_r)
    lab = torch.arange(L, device=atoms.device)[:, None] * n_atoms  # (L, 1)
    rows_a = ((lab + atoms[:, None]) * E + slots.element).reshape(-1)  # (L·M,) centre a
    rows_p = ((lab + slots.atom) * E + label_elem[:, None]).reshape(-1)  # (L·M,) centre p
    terms = terms.reshape(L * M, U_r)  # (L·M, U_r)
    rad.index_add_(0, torch.cat([rows_a, rows_p]), torch.cat([terms, terms]))
    return rad


def _side_factors(keys: _Keys, cutoff_fn, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """h_k(r) = exp(−η_k (r − r_s,k)²) f_c(r) and h_k'(r), (..., K) each, for r (...,) in Å."""
    f, g = cutoff_fn.value_and_derivative(r)  # (...,) each
    y = r[..., None] - keys.side_rs  # (..., K)
    gauss = torch.exp(-keys.side_eta * y * y)  # (..., K)
    return gauss * f[..., None], gauss * (g[..., None] - 2.0 * keys.side_eta * y * f[..., None])  # (..., K) each


def _triangles(sf, keys: _Keys, slots: _Slots, label_elem) -> torch.Tensor:
    """(T,) flat indices l·M² + m·M + n (m < n) of the triangles {a_l, p_m, p_n} with |u_n − u_m| < r_c
    and functions on at least one of the three triples (both slots valid)."""
    L, M = slots.r.shape
    rc2 = float(sf.cutoff) ** 2
    big = 4.0 * rc2  # any penalty ≥ r_c² (Gram r² ≥ −rounding)
    sq = slots.r * slots.r + torch.where(slots.valid, 0.0, big)  # (L, M) |u|² (+ penalty where invalid)
    upper = torch.ones(M, M, dtype=torch.bool, device=sq.device).triu(1)  # (M, M) m < n
    base = sq[:, :, None] + torch.where(upper, sq[:, None, :], big)  # (L, M, M)
    pen = keys.triangle_penalty  # (E, E, E)
    if bool(pen.any()):  # element triangles without functions (water: H–H–H)
        onehot = torch.nn.functional.one_hot(slots.element, pen.shape[0]).to(sq.dtype)  # (L, M, E)
        per_label = pen.index_select(0, label_elem) * big  # (L, E, E)
        base = base + torch.bmm(torch.bmm(onehot, per_label), onehot.transpose(1, 2))  # (L, M, M)
    r2 = torch.baddbmm(base, slots.u, slots.u.transpose(1, 2), alpha=-2.0)  # (L, M, M) |u_n − u_m|² (+ penalties)
    return torch.nonzero((r2 < rc2).view(-1)).squeeze(1)  # (T,)


def _angle_factors(keys: _Keys, cos: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(1 + λ cos)^ζ and its derivative w.r.t. cos per distinct (λ, ζ): cos (3, T) → (C, 3, T) each."""
    lam = keys.lam[:, None, None]  # (C, 1, 1)
    base = (1.0 + lam * cos[None]).clamp(min=0.0)  # (C, 3, T)
    values, slopes = [], []
    for z, a, b in keys.zeta_runs:  # rows grouped by equal ζ
        x = base[a:b]  # (C_z, 3, T)
        if z == 1:
            values.append(x), slopes.append(lam[a:b].expand_as(x))
        elif isinstance(z, int):
            xm = x if z == 2 else (x * x if z == 3 else torch.pow(x, z - 1))  # (C_z, 3, T)
            values.append(xm * x), slopes.append(xm * (z * lam[a:b]))
        else:
            values.append(torch.pow(x, z)), slopes.append(torch.pow(x, z - 1.0) * (z * lam[a:b]))
    value = values[0] if len(values) == 1 else torch.cat(values, 0)  # (C, 3, T)
    slope = slopes[0] if len(slopes) == 1 else torch.cat(slopes, 0)  # (C, 3, T)
    return value, slope


def _angular_columns(sf, keys: _Keys, slots: _Slots, atoms, components, label_elem, n_atoms: int,
                     native: bool = False) -> torch.Tensor:
    """(L·N·E·E, U_a) tangents of the angular slots from the triangles {a, p, q} (module docstring).

    Per-triangle tensors are feature-major, (F, T), so every feature is a contiguous row.
    """
    E, (L, M), U_a = len(sf.elements), slots.r.shape, sf.n_ang_keys
    n_rows = L * n_atoms * E * E
    if not (U_a and L and M >= 2):
        return slots.r.new_zeros(n_rows, U_a)
    if native and _native_supported(sf, slots.r):
        module = native_module()
        if module is not None:
            return _angular_columns_native(module, sf, keys, slots, atoms, components, label_elem, n_atoms)
    tri = _triangles(sf, keys, slots, label_elem)  # (T,)
    if tri.numel() == 0:
        return slots.r.new_zeros(n_rows, U_a)
    lab = torch.div(tri, M * M, rounding_mode="floor")  # (T,)
    s1 = torch.div(tri, M, rounding_mode="floor")  # (T,) flat slot l·M + m of p
    s2 = lab * M + (tri - s1 * M)  # (T,) flat slot l·M + n of q
    h, hp = _side_factors(keys, sf.cutoff_fn, slots.r)  # (L, M, K) each
    K = h.shape[-1]
    per_slot = torch.cat([slots.u.permute(2, 0, 1), slots.r[None], slots.x[None], h.permute(2, 0, 1),
                          (hp * slots.x[..., None]).permute(2, 0, 1)]).reshape(5 + 2 * K, L * M)  # (5+2K, L·M)
    t1, t2 = per_slot.index_select(1, s1), per_slot.index_select(1, s2)  # (5+2K, T) each
    u, r1, x1, h1, b1 = t1[:3], t1[3], t1[4], t1[5:5 + K], t1[5 + K:]  # p side: (3, T), (T,) ×2, (K, T) ×2
    w, r2, x2, h2, b2 = t2[:3], t2[3], t2[4], t2[5:5 + K], t2[5 + K:]  # q side
    d = w - u  # (3, T) r_pq
    uw = (u * w).sum(0)  # (T,)
    ud = (u * d).sum(0)  # (T,)
    wd = (w * d).sum(0)  # (T,)
    r3 = torch.sqrt((d * d).sum(0))  # (T,)
    alpha = components.index_select(0, lab)  # (T,) label component α
    x3 = d.gather(0, alpha[None]).squeeze(0) / r3  # (T,) d̂_α
    y3 = r3 - keys.side_rs[:, None]  # (K, T)
    h3 = torch.exp(-keys.side_eta[:, None] * y3 * y3) * sf.cutoff_fn(r3)  # (K, T)
    side = h1 * h2 * h3  # (K, T) R_k
    dside = -h3 * (b1 * h2 + h1 * b2)  # (K, T) ∂R_k/∂r_aα
    cos_a = uw / (r1 * r2)  # (T,) angle at a
    cos_p = -ud / (r1 * r3)  # (T,) angle at p (towards a and q)
    cos_q = wd / (r2 * r3)  # (T,) angle at q (towards a and p)
    dcos_a = -((x2 - cos_a * x1) / r1 + (x1 - cos_a * x2) / r2)  # (T,)
    dcos_p = (x3 + cos_p * x1) / r1  # (T,)
    dcos_q = (cos_q * x2 - x3) / r2  # (T,)
    value, slope = _angle_factors(keys, torch.stack([cos_a, cos_p, cos_q]))  # (C, 3, T) each
    slope = slope * torch.stack([dcos_a, dcos_p, dcos_q])  # (C, 3, T) d(1 + λ cos)^ζ/dr_aα
    c_of, k_of = keys.angle_of_key, keys.side_of_key  # (U_a,) each
    terms = value.index_select(0, c_of) * dside.index_select(0, k_of)[:, None, :]  # (U_a, 3, T)
    terms.addcmul_(slope.index_select(0, c_of), side.index_select(0, k_of)[:, None, :])  # (U_a, 3, T)
    e = slots.element.view(-1)  # (L·M,)
    e1, e2 = e.index_select(0, s1), e.index_select(0, s2)  # (T,)
    ea = label_elem.index_select(0, lab)  # (T,)
    atom = slots.atom.view(-1)  # (L·M,)
    centre = torch.stack([atoms.index_select(0, lab), atom.index_select(0, s1), atom.index_select(0, s2)])  # (3, T)
    lo = torch.stack([torch.minimum(e1, e2), torch.minimum(ea, e2), torch.minimum(ea, e1)])  # (3, T)
    hi = torch.stack([torch.maximum(e1, e2), torch.maximum(ea, e2), torch.maximum(ea, e1)])  # (3, T)
    rows = ((lab * n_atoms + centre) * E + lo) * E + hi  # (3, T)
    ang = slots.r.new_zeros(U_a, n_rows)  # (U_a, L·N·E·E)
    ang.index_add_(1, rows.view(-1), terms.view(U_a, -1))  # (U_a, L·N·E·E)
    return ang.t()  # (L·N·E·E, U_a)


# ---------------------------------------------------------------------------------------------------------
# Optional fused CPU kernel for the angular columns (same math as _angular_columns, one loop over triangles)

_NATIVE_SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

namespace {
constexpr int64_t CH = 256;  // triangles per chunk of the angular loop
constexpr int64_t PAIR_PAD = 16;  // slack after the triangle buffers: the vector pair loop stores whole vectors

/* a^2 + b^2 + c^2 summed as pairs_wide's vectors do (two fused multiply-adds) where the CPU has FMA; without it
   (and without pairs_wide) the plain sum: std::fma would be a library call on every pair. */
template <typename T>
inline T norm2(T a, T b, T c) {
#if defined(__FMA__)
  return std::fma(c, c, std::fma(b, b, a * a));
#else
  return a * a + b * b + c * c;
#endif
}

/* Step 1 of angular() for the slots n >= n0 of slot m, a vector of slots at a time where AVX-512 has them: the pairs
   (m, n) with ok[n] and |u_n - u_m|^2 < rc2 appended at n_tri in n order (squared distance, m, n), as the scalar
   loop after it does (the same fused sum). Returns the new n_tri; n0 becomes the first slot left to the scalar loop.
   10 force labels, 192-atom water, float32: this step 0.19 of 0.62 ms of angular() as a scalar loop. */
template <typename T>
inline int64_t pairs_wide(const T*, const T*, const T*, const unsigned char*, T, int64_t, int64_t&, int64_t, int32_t*,
                          int32_t*, T*, int64_t n_tri) {
  return n_tri;
}
#if defined(__AVX512F__) && defined(__AVX512VL__)
template <>
inline int64_t pairs_wide<float>(const float* ux, const float* uy, const float* uz, const unsigned char* ok, float rc2,
                                 int64_t m, int64_t& n0, int64_t M, int32_t* tm, int32_t* tn, float* r3, int64_t n_tri) {
  const __m512 xm = _mm512_set1_ps(ux[m]), ym = _mm512_set1_ps(uy[m]), zm = _mm512_set1_ps(uz[m]);
  const __m512 r2 = _mm512_set1_ps(rc2);
  const __m512i mv = _mm512_set1_epi32(static_cast<int>(m));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = n0;
  for (; n + 16 <= M; n += 16) {
    const __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(ux + n), xm), d1 = _mm512_sub_ps(_mm512_loadu_ps(uy + n), ym),
                 d2 = _mm512_sub_ps(_mm512_loadu_ps(uz + n), zm);
    const __m512 q = _mm512_fmadd_ps(d2, d2, _mm512_fmadd_ps(d1, d1, _mm512_mul_ps(d0, d0)));
    const __m512i okv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ok + n)));
    const __mmask16 keep = _mm512_test_epi32_mask(okv, okv) & _mm512_cmp_ps_mask(q, r2, _CMP_LT_OQ);
    _mm512_storeu_ps(r3 + n_tri, _mm512_maskz_compress_ps(keep, q));
    _mm512_storeu_si512(tn + n_tri, _mm512_maskz_compress_epi32(keep, _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(n)), lane)));
    _mm512_storeu_si512(tm + n_tri, mv);
    n_tri += __builtin_popcount(static_cast<unsigned>(keep));
  }
  n0 = n;
  return n_tri;
}
template <>
inline int64_t pairs_wide<double>(const double* ux, const double* uy, const double* uz, const unsigned char* ok,
                                  double rc2, int64_t m, int64_t& n0, int64_t M, int32_t* tm, int32_t* tn, double* r3,
                                  int64_t n_tri) {
  const __m512d xm = _mm512_set1_pd(ux[m]), ym = _mm512_set1_pd(uy[m]), zm = _mm512_set1_pd(uz[m]);
  const __m512d r2 = _mm512_set1_pd(rc2);
  const __m256i mv = _mm256_set1_epi32(static_cast<int>(m)), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t n = n0;
  for (; n + 8 <= M; n += 8) {
    const __m512d d0 = _mm512_sub_pd(_mm512_loadu_pd(ux + n), xm), d1 = _mm512_sub_pd(_mm512_loadu_pd(uy + n), ym),
                  d2 = _mm512_sub_pd(_mm512_loadu_pd(uz + n), zm);
    const __m512d q = _mm512_fmadd_pd(d2, d2, _mm512_fmadd_pd(d1, d1, _mm512_mul_pd(d0, d0)));
    const __m512i okv = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ok + n)));
    const __mmask8 keep = _mm512_test_epi64_mask(okv, okv) & _mm512_cmp_pd_mask(q, r2, _CMP_LT_OQ);
    _mm512_storeu_pd(r3 + n_tri, _mm512_maskz_compress_pd(keep, q));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tn + n_tri),
                        _mm256_maskz_compress_epi32(keep, _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tm + n_tri), mv);
    n_tri += __builtin_popcount(static_cast<unsigned>(keep));
  }
  n0 = n;
  return n_tri;
}
#endif

""" + VECTOR_MATH + r"""

template <typename T>
void angular(const T* u, const bool* valid, const int64_t* atom, const int64_t* elem, const T* r, const T* x,
             const T* h, const T* b, const int64_t* atoms, const int64_t* comps, const int64_t* lelem,
             const T* side_eta, const T* side_rs, const T* lam, const int64_t* zeta, const int64_t* run,
             const int64_t* k_of, const int64_t* col, const bool* pen, int64_t L, int64_t M, int64_t K, int64_t C,
             int64_t U, int64_t E, int64_t N, T rc, int kind, T norm, T* out, int64_t stride, int64_t offset) {
  // row of (label l, atom i) in out: out + (l N + i) stride + offset, then (e1 E + e2) U + column
  // keys in sorted position v (grouped by angle combo): side k_of[v], output column col[v]
  const T rc2 = rc * rc;
  const int64_t cap = M * (M - 1) / 2;
  std::vector<int32_t> tri_m(cap + PAIR_PAD), tri_n(cap + PAIR_PAD);
  std::vector<T> r3v(cap + PAIR_PAD), f3v(cap), h3v(K * cap), ux(M), uy(M), uz(M);
  std::vector<unsigned char> ok(E * M);
  // step 3 works on vectors of NL keys (VT<T>: 16 float32 or 8 float64 lanes)
  typedef typename VT<T>::v V;
  typedef typename VT<T>::vi VI;
  constexpr int NL = VT<T>::L;
  const int64_t NC = (U + NL - 1) / NL, KV = (K + NL - 1) / NL;  // vectors of keys, of side factors
  // lane constants of key v = c NL + lane (sorted position): lambda, zeta lambda, zeta - 1, side k (padding: 0)
  std::vector<V> lamv(NC), zlv(NC);
  std::vector<VI> zm1v(NC), kv(NC);
  int zbits = 0;
  for (int64_t q = 0; q < C; ++q)
    for (int64_t v = run[q]; v < run[q + 1]; ++v) {
      const int64_t c = v / NL, lane = v % NL;
      lamv[c][lane] = lam[q]; zlv[c][lane] = T(zeta[q]) * lam[q];
      zm1v[c][lane] = zeta[q] - 1; kv[c][lane] = k_of[v];
      while ((int64_t(1) << zbits) <= zeta[q] - 1) ++zbits;
    }
  // one chunk of CH triangles: cosines and their derivatives (3, CH), each triangle's side factors (CH, KV)
  // twice, accumulator offsets (CH) x 3
  std::vector<T> cosv(3 * CH), dcosv(3 * CH);
  std::vector<V> sidev(CH * KV), dsidev(CH * KV);
  std::vector<V> hv(L * M * KV), bv(L * M * KV);  // h, b of every slot, k in the lanes
  for (int64_t s = 0; s < L * M; ++s)
    for (int64_t k = 0; k < K; ++k) { hv[s * KV + k / NL][k % NL] = h[s * K + k]; bv[s * KV + k / NL][k % NL] = b[s * K + k]; }
  std::vector<int64_t> slot_a(CH), slot_p(CH), slot_q(CH);
  // per label: centre a by element pair (E, E, NC); centre = atom of a slot, by element of the other slot (M, E, NC);
  // two copies of each (even and odd triangles: consecutive sums into one row do not wait for each other)
  const int64_t na = E * E * NC, ns = M * E * NC;
  std::vector<V> acc_a(2 * na), acc_s(2 * ns);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t a = atoms[l], ea = lelem[l], alpha = comps[l];
    const int64_t base_l = l * M;
    // 1. triangles {a, p_m, p_n}, m < n, |u_n - u_m| < r_c, with functions; without branches on the distance
    //    (about half of the ~6000 pairs of a water atom pass: a branch there mispredicts; this step ~0.27 against
    //    ~0.16 ms for 10 labels):
    //    each pair is written at n_tri and kept by advancing n_tri (the same triangles in the same order)
    for (int64_t e = 0; e < E; ++e)  // ok[e][n]: slot n valid and a function on (a, element e, element of n)
      for (int64_t n = 0; n < M; ++n) {
        const int64_t sn = base_l + n;
        ok[e * M + n] = static_cast<unsigned char>(valid[sn] && !pen[(ea * E + e) * E + elem[sn]]);
      }
    for (int64_t n = 0; n < M; ++n) {
      const T* un = u + 3 * (base_l + n);
      ux[n] = un[0]; uy[n] = un[1]; uz[n] = un[2];
    }
    int64_t n_tri = 0;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t sm = base_l + m;
      if (!valid[sm]) continue;
      const T xm = ux[m], ym = uy[m], zm = uz[m];
      const unsigned char* ok_m = ok.data() + elem[sm] * M;
      int64_t n0 = m + 1;  // a vector of slots at a time where AVX-512 has them, the rest here
      n_tri = pairs_wide<T>(ux.data(), uy.data(), uz.data(), ok_m, rc2, m, n0, M, tri_m.data(), tri_n.data(), r3v.data(),
                            n_tri);
      for (int64_t n = n0; n < M; ++n) {
        const T d0 = ux[n] - xm, d1 = uy[n] - ym, d2 = uz[n] - zm;
        const T r3sq = norm2(d0, d1, d2);
        tri_m[n_tri] = static_cast<int32_t>(m);
        tri_n[n_tri] = static_cast<int32_t>(n);
        r3v[n_tri] = r3sq;
        n_tri += static_cast<int64_t>(ok_m[n] & static_cast<unsigned char>(r3sq < rc2));
      }
    }
    // 2. |r_pq|, its cutoff and side factors (vectorised loops)
    T* __restrict__ r3p = r3v.data();
    T* __restrict__ f3p = f3v.data();
#pragma omp simd
    for (int64_t t = 0; t < n_tri; ++t) r3p[t] = std::sqrt(r3p[t]);
    if (kind == 0) {
#pragma omp simd
      for (int64_t t = 0; t < n_tri; ++t) {
        const T th = std::tanh(T(1) - r3p[t] / rc);
        f3p[t] = th * th * th / norm;
      }
    } else {
#pragma omp simd
      for (int64_t t = 0; t < n_tri; ++t) f3p[t] = T(0.5) * (std::cos(T(M_PI) * (r3p[t] / rc)) + T(1));
    }
    for (int64_t k = 0; k < K; ++k) {  // the side factor of r_pq, h3_k = exp(-eta_k (r_pq - r_s,k)^2) f_c(r_pq)
      T* __restrict__ hk = h3v.data() + k * cap;
      const T eta = side_eta[k], rs = side_rs[k];
#pragma omp simd
      for (int64_t t = 0; t < n_tri; ++t) {
        const T y = r3p[t] - rs;
        hk[t] = std::exp(-eta * y * y) * f3p[t];
      }
    }
    // 3. the three triples of every triangle, CH triangles at a time: per triangle its cosines (scalar, one
    //    division per length) and side factors (k in the lanes), then its terms with the keys in the lanes, each
    //    vertex's summed into its centre's accumulator row by vector adds. 10 force labels, 192-atom water,
    //    float32: 0.75-0.77 ms for the whole call against 0.93-0.95 with terms vectorised over triangles and one
    //    scalar add per (triangle, key, vertex)
    std::fill(acc_a.begin(), acc_a.end(), V{});
    std::fill(acc_s.begin(), acc_s.end(), V{});
    for (int64_t t0 = 0; t0 < n_tri; t0 += CH) {
      const int64_t nt = std::min<int64_t>(CH, n_tri - t0);
      T* __restrict__ cs = cosv.data();  // (3, CH) cosines at a, p, q
      T* __restrict__ dcs = dcosv.data();  // (3, CH) their derivatives w.r.t. r_a,alpha
      const int32_t* __restrict__ tm = tri_m.data() + t0;
      const int32_t* __restrict__ tn = tri_n.data() + t0;
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t sm = base_l + tm[i], sn = base_l + tn[i];
        const T* um = u + 3 * sm;
        const T* un = u + 3 * sn;
        const T d0 = un[0] - um[0], d1 = un[1] - um[1], d2 = un[2] - um[2];
        const T r3 = r3p[t0 + i], rm = r[sm], xm = x[sm], rn = r[sn], xn = x[sn];
        const T i3 = T(1) / r3, im = T(1) / rm, in = T(1) / rn;  // one division each
        const T x3 = (alpha == 0 ? d0 : (alpha == 1 ? d1 : d2)) * i3;
        const T uw = um[0] * un[0] + um[1] * un[1] + um[2] * un[2];
        const T ud = um[0] * d0 + um[1] * d1 + um[2] * d2;
        const T wd = un[0] * d0 + un[1] * d1 + un[2] * d2;
        const T ca = uw * (im * in), cp = -ud * (im * i3), cq = wd * (in * i3);
        cs[i] = ca; cs[CH + i] = cp; cs[2 * CH + i] = cq;
        dcs[i] = -((xn - ca * xm) * im + (xm - ca * xn) * in);
        dcs[CH + i] = (x3 + cp * xm) * im;
        dcs[2 * CH + i] = (cq * xn - x3) * in;
        const int64_t em = elem[sm], en = elem[sn];
        slot_a[i] = (em * E + en) * NC;  // centre a, neighbours of elements em, en
        slot_p[i] = (tm[i] * E + en) * NC;  // centre p (slot m), neighbours a and q
        slot_q[i] = (tn[i] * E + em) * NC;  // centre q (slot n), neighbours a and p
        T* h3 = reinterpret_cast<T*>(sidev.data() + i * KV);  // the triangle's h3_k, k in the lanes
        for (int64_t k = 0; k < K; ++k) h3[k] = h3v[k * cap + t0 + i];
      }
      for (int64_t i = 0; i < nt; ++i) {  // side factors R_k and dR_k/dr_a,alpha of the triangle, k in the lanes
        const int64_t sm = base_l + tm[i], sn = base_l + tn[i];
        const V *hm = hv.data() + sm * KV, *hn = hv.data() + sn * KV, *bm = bv.data() + sm * KV, *bn = bv.data() + sn * KV;
        for (int64_t c = 0; c < KV; ++c) {
          const V h3 = sidev[i * KV + c];
          sidev[i * KV + c] = hm[c] * hn[c] * h3;
          dsidev[i * KV + c] = -h3 * (bm[c] * hn[c] + hm[c] * bn[c]);
        }
      }
      // the terms of the three triples of every triangle, NL keys per vector: for key v (combo lambda, zeta;
      // side k) at vertex c: P = max(1 + lambda c, 0)^zeta, S = zeta lambda max(.)^(zeta-1) dc, term
      // P dR_k + S R_k, summed into the rows of the three centres
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t par = i & 1;
        V* A = acc_a.data() + par * na + slot_a[i];
        V* Sp = acc_s.data() + par * ns + slot_p[i];
        V* Q = acc_s.data() + par * ns + slot_q[i];
        const V* sv = sidev.data() + i * KV;
        const V* dv = dsidev.data() + i * KV;
        const T c0 = cs[i], c1 = cs[CH + i], c2 = cs[2 * CH + i];
        const T g0 = dcs[i], g1 = dcs[CH + i], g2 = dcs[2 * CH + i];
        for (int64_t c = 0; c < NC; ++c) {
          V sk, dk;
#if defined(__GNUC__) && !defined(__clang__)  /* a permute instruction; clang has no variable shuffle builtin */
          if (KV == 1) {
            sk = __builtin_shuffle(sv[0], kv[c]);
            dk = __builtin_shuffle(dv[0], kv[c]);
          } else
#endif
          {
            const T* s1 = reinterpret_cast<const T*>(sv);
            const T* d1 = reinterpret_cast<const T*>(dv);
            for (int lane = 0; lane < NL; ++lane) { sk[lane] = s1[kv[c][lane]]; dk[lane] = d1[kv[c][lane]]; }
          }
          const V lm = lamv[c], zl = zlv[c];
          const VI zm = zm1v[c];
          auto term = [&](T cv, T dcv) {
            V bs = lm * cv + T(1);
            bs = bs > T(0) ? bs : V{};
            V pm = bs - bs + T(1), base = bs;  // bs^(zeta-1) by squaring, bit by bit of zeta - 1
            for (int bit = 0; bit < zbits; ++bit) {
              pm = ((zm >> bit) & 1) != 0 ? pm * base : pm;
              base = base * base;
            }
            return (pm * bs) * dk + (zl * dcv) * pm * sk;
          };
          A[c] += term(c0, g0);
          Sp[c] += term(c1, g1);
          Q[c] += term(c2, g2);
        }
      }
    }
    // 4. flush into the rows of out (column col[v] of the key in sorted position v), both copies
    const T* as = reinterpret_cast<const T*>(acc_s.data());
    const T* aa = reinterpret_cast<const T*>(acc_a.data());
    const int64_t us = NC * NL;  // lanes per accumulator row
    for (int64_t m = 0; m < M; ++m) {  // centre = atom of slot m, neighbours a and a slot of element e
      if (!valid[base_l + m]) continue;
      for (int64_t e = 0; e < E; ++e) {
        T* row = out + (l * N + atom[base_l + m]) * stride + offset + (std::min(ea, e) * E + std::max(ea, e)) * U;
        const T* src = as + (m * E + e) * us;
        for (int64_t v = 0; v < U; ++v) row[col[v]] += src[v] + src[ns * NL + v];
      }
    }
    for (int64_t e1 = 0; e1 < E; ++e1) {  // centre a, neighbours of elements e1, e2
      for (int64_t e2 = 0; e2 < E; ++e2) {
        T* row = out + (l * N + a) * stride + offset + (std::min(e1, e2) * E + std::max(e1, e2)) * U;
        const T* src = aa + (e1 * E + e2) * us;
        for (int64_t v = 0; v < U; ++v) row[col[v]] += src[v] + src[na * NL + v];
      }
    }
  }
}

/* The whole column table of L labels in one call: the label atoms' pair slots (from the centre-sorted pair
   list), the radial tangents, the side factors of every slot, then angular() above. table (L, N, E Ur + E E U)
   zeroed; rows are (label, atom), columns the radial slots [e][Ur] then the angular slots [e1][e2][U]. */
template <typename T>
void label_columns(const T* rij, const T* pos, const T* off, const int64_t* idx_j, const int64_t* order,
                   const int64_t* first, const int64_t* count, const int64_t* species, const int64_t* atoms,
                   const int64_t* comps, const T* rad_eta, const T* rad_rs, int64_t Ur, const T* side_eta,
                   const T* side_rs, const T* lam, const int64_t* zeta, const int64_t* run, const int64_t* k_of,
                   const int64_t* col, const bool* pen, int64_t K, int64_t C, int64_t U, int64_t L, int64_t M,
                   int64_t E, int64_t N, T rc, int kind, T norm, T* table) {
  const int64_t stride = E * Ur + E * E * U, LM = L * M;
  std::vector<T> u(3 * LM), r(LM), x(LM), h(K * LM), b(K * LM);
  std::vector<int64_t> atom(LM, 0), elem(LM, 0), lelem(L);
  std::vector<unsigned char> valid_c(LM, 0);
  const T rc2 = rc * rc;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t a = atoms[l], ea = species[a], alpha = comps[l];
    lelem[l] = ea;
    T* rad_a = table + (l * N + a) * stride;  // radial slots of centre a
    for (int64_t s = 0; s < M; ++s) {
      const int64_t sl = l * M + s;
      T* us = u.data() + 3 * sl;
      us[0] = T(2) * rc; us[1] = T(0); us[2] = T(0); r[sl] = T(2) * rc; x[sl] = T(0);
      for (int64_t k = 0; k < K; ++k) { h[K * sl + k] = T(0); b[K * sl + k] = T(0); }
      if (s >= count[l]) continue;
      int64_t p = first[l] + s;
      if (order) p = order[p];
      const int64_t j = idx_j[p];
      T v0, v1, v2;
      if (rij) { v0 = rij[3 * p]; v1 = rij[3 * p + 1]; v2 = rij[3 * p + 2]; }
      else {
        v0 = pos[3 * j] - pos[3 * a] + off[3 * p];
        v1 = pos[3 * j + 1] - pos[3 * a + 1] + off[3 * p + 1];
        v2 = pos[3 * j + 2] - pos[3 * a + 2] + off[3 * p + 2];
      }
      atom[sl] = j; elem[sl] = species[j];
      const T q2 = v0 * v0 + v1 * v1 + v2 * v2;
      if (!(q2 < rc2)) continue;
      valid_c[sl] = 1;
      us[0] = v0; us[1] = v1; us[2] = v2;
      const T rs = std::sqrt(q2), xs = (alpha == 0 ? v0 : (alpha == 1 ? v1 : v2)) / rs;
      r[sl] = rs; x[sl] = xs;
      T f, g;  // f_c(r), f_c'(r)
      if (kind == 0) {
        const T t = std::tanh(T(1) - rs / rc), t2 = t * t;
        f = t2 * t / norm; g = T(3) * t2 * (t2 - T(1)) / rc / norm;
      } else {
        const T w = T(M_PI) * (rs / rc);
        f = T(0.5) * (std::cos(w) + T(1)); g = T(-0.5) * T(M_PI) * std::sin(w) / rc;
      }
      T* rad_p = table + (l * N + j) * stride + ea * Ur;  // radial slots of centre p, neighbour element of a
      T* rad_ap = rad_a + elem[sl] * Ur;  // radial slots of centre a, neighbour element of p
      for (int64_t q = 0; q < Ur; ++q) {
        const T y = rs - rad_rs[q], eta = rad_eta[q];
        const T term = std::exp(-eta * y * y) * (T(2) * eta * y * f - g) * xs;
        rad_ap[q] += term;
        rad_p[q] += term;
      }
      for (int64_t k = 0; k < K; ++k) {
        const T y = rs - side_rs[k], eta = side_eta[k], gauss = std::exp(-eta * y * y);
        h[K * sl + k] = gauss * f;
        b[K * sl + k] = gauss * (g - T(2) * eta * y * f) * xs;
      }
    }
  }
  if (U > 0 && M >= 2)
    angular<T>(u.data(), reinterpret_cast<const bool*>(valid_c.data()), atom.data(), elem.data(), r.data(), x.data(),
               h.data(), b.data(), atoms, comps, lelem.data(), side_eta, side_rs, lam, zeta, run, k_of, col, pen, L, M,
               K, C, U, E, N, rc, kind, norm, table, stride, E * Ur);
}
}  // namespace

#define ANGULAR_COLUMNS(NAME, T)                                                                             \
  extern "C" void NAME(const T* u, const bool* valid, const int64_t* atom, const int64_t* elem, const T* r,           \
                       const T* x, const T* h, const T* b, const int64_t* atoms, const int64_t* comps,               \
                       const int64_t* lelem, const T* side_eta, const T* side_rs, const T* lam, const int64_t* zeta,  \
                       const int64_t* run, const int64_t* k_of, const int64_t* col, const bool* pen, int64_t L,       \
                       int64_t M, int64_t K, int64_t C, int64_t U, int64_t E, int64_t N, double rc, int64_t kind,     \
                       double norm, T* out) {                                                                         \
    angular<T>(u, valid, atom, elem, r, x, h, b, atoms, comps, lelem, side_eta, side_rs, lam, zeta, run, k_of, col,  \
               pen, L, M, K, C, U, E, N, static_cast<T>(rc), static_cast<int>(kind), static_cast<T>(norm), out, E * E * U, 0);      \
  }
ANGULAR_COLUMNS(angular_columns_f64, double)
ANGULAR_COLUMNS(angular_columns_f32, float)
#define LABEL_COLUMNS(NAME, T)                                                                                \
  extern "C" void NAME(const T* rij, const T* pos, const T* off, const int64_t* idx_j, const int64_t* order,         \
                       const int64_t* first, const int64_t* count, const int64_t* species, const int64_t* atoms,     \
                       const int64_t* comps, const T* rad_eta, const T* rad_rs, int64_t Ur, const T* side_eta,       \
                       const T* side_rs, const T* lam, const int64_t* zeta, const int64_t* run, const int64_t* k_of,  \
                       const int64_t* col, const bool* pen, int64_t K, int64_t C, int64_t U, int64_t L, int64_t M,    \
                       int64_t E, int64_t N, double rc, int64_t kind, double norm, T* table) {                        \
    label_columns<T>(rij, pos, off, idx_j, order, first, count, species, atoms, comps, rad_eta, rad_rs, Ur, side_eta, \
                     side_rs, lam, zeta, run, k_of, col, pen, K, C, U, L, M, E, N, static_cast<T>(rc),               \
                     static_cast<int>(kind), static_cast<T>(norm), table);                                           \
  }
LABEL_COLUMNS(label_columns_f64, double)
LABEL_COLUMNS(label_columns_f32, float)

/* first, count (L,) of each label atom's pairs in a centre-sorted idx_i (P,) by binary search; returns
   M = max(count, 1), or -1 when idx_i is not sorted (then the caller sorts it). */
extern "C" int64_t centre_ranges(const int64_t* idx_i, int64_t P, const int64_t* atoms, int64_t L, int64_t* first,
                                 int64_t* count) {
  bool sorted = true;
  for (int64_t p = 1; p < P; ++p) sorted &= idx_i[p] >= idx_i[p - 1];
  if (!sorted) return -1;
  int64_t m = 1;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* lo = std::lower_bound(idx_i, idx_i + P, atoms[l]);
    const int64_t* hi = std::upper_bound(lo, idx_i + P, atoms[l]);
    first[l] = lo - idx_i;
    count[l] = hi - lo;
    m = std::max(m, count[l]);
  }
  return m;
}
"""


_NATIVE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-shared")
NATIVE_DEFAULT = os.environ.get("EKF_PLUGIN_NATIVE_COLUMNS", "1") != "0"  # on where it builds; "0" turns it off


def native_module():
    """The compiled kernel (:func:`ekf_plugin.native.native_library`: the system C++ compiler, about a second
    on first use, then cached on disk), or None if it cannot be built (then a warning, once, and the torch path)."""
    from ekf_plugin.native import optional_library

    module = optional_library(_NATIVE_SOURCE, _NATIVE_FLAGS, "bpnn_feature_columns", "native feature-column kernel")
    if module is not None and not getattr(module, "_ekf_typed", False):  # typed once: plain ints per call
        P, I, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        for name in ("label_columns_f64", "label_columns_f32"):
            fn = getattr(module, name)
            fn.argtypes = [P] * 12 + [I] + [P] * 8 + [I] * 7 + [D, I, D, P]
            fn.restype = None
        module.centre_ranges.argtypes = [P, I, P, I, P, P]
        module.centre_ranges.restype = I
        module._ekf_typed = True
    return module


def _native_cutoff(cutoff_fn) -> Optional[Tuple[int, float]]:
    """(kind, norm) of the cutoff in the kernel, or None when the kernel does not have it."""
    if cutoff_fn.kind in ("tanhu", "tanh"):
        return 0, (math.tanh(1.0) ** 3 if cutoff_fn.kind == "tanh" else 1.0)
    if cutoff_fn.kind == "cos" and cutoff_fn.alpha == 0.0:
        return 1, 1.0
    return None


def _native_supported(sf, r: torch.Tensor) -> bool:
    return (r.device.type == "cpu" and sf.ang_zeta_int is not None and min(sf.ang_zeta_int, default=1) >= 1
            and _native_cutoff(sf.cutoff_fn) is not None)


def _angular_columns_native(module, sf, keys: _Keys, slots: _Slots, atoms, components, label_elem,
                            n_atoms: int) -> torch.Tensor:
    """(L·N·E·E, U_a) as :func:`_angular_columns`, by the compiled kernel (CPU, integer ζ)."""
    E, (L, M), U_a = len(sf.elements), slots.r.shape, sf.n_ang_keys
    h, hp = _side_factors(keys, sf.cutoff_fn, slots.r)  # (L, M, K) each
    b = hp * slots.x[..., None]  # (L, M, K) h_k'(|u|) û_α
    out = slots.r.new_zeros(L * n_atoms * E * E, U_a)  # (L·N·E·E, U_a)
    kind, norm = _native_cutoff(sf.cutoff_fn)
    zeta, run, k_sorted, col, pen = keys.native
    fn = module.angular_columns_f64 if out.dtype == torch.float64 else module.angular_columns_f32
    if out.dtype not in (torch.float64, torch.float32):
        raise TypeError(f"native feature columns: float32/float64 only, got {out.dtype}")
    args = [slots.u, slots.valid, slots.atom, slots.element, slots.r, slots.x, h, b, atoms, components, label_elem,
            keys.side_eta, keys.side_rs, keys.lam, zeta, run, k_sorted, col, pen]
    args = [a.contiguous() for a in args]  # kept alive until the call returns
    for a in args:  # the C signature: float arrays in out's dtype, int64 indices, bool masks
        if a.dtype not in (out.dtype, torch.int64, torch.bool) or a.device.type != "cpu":
            raise TypeError(f"native feature columns: unexpected {a.dtype} on {a.device}")
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    fn.restype = None
    fn(*(vp(a.data_ptr()) for a in args), i64(L), i64(M), i64(keys.side_eta.numel()), i64(keys.lam.numel()),
       i64(col.numel()), i64(E), i64(n_atoms), ctypes.c_double(float(sf.cutoff)), i64(kind), ctypes.c_double(norm),
       vp(out.data_ptr()))
    return out


def _columns_native(module, sf, keys: _Keys, species, r_ij, idx_i, idx_j, atoms, components, positions,
                    offsets) -> torch.Tensor:
    """(L, N, E·U_r + E·E·U_a) column table of :func:`feature_columns` by one compiled call (CPU, integer ζ):
    the label atoms' slots as :func:`_label_slots`, the radial part as :func:`_radial_columns`, the angular
    part as :func:`_angular_columns`. The Python path costs ~1.4 ms of small tensor operations per call
    beside the angular loop (10 labels, 192-atom water); here they are part of the loop."""
    ref = r_ij if r_ij is not None else positions
    dtype = ref.dtype
    if dtype not in (torch.float64, torch.float32) or ref.device.type != "cpu" or keys.side_eta.dtype != dtype:
        raise TypeError(f"native feature columns: float32/float64 CPU tensors with keys of their dtype, got {dtype} "
                        f"on {ref.device}")
    E, n_atoms, L = len(sf.elements), species.shape[0], atoms.shape[0]
    idx_i, atoms = idx_i.to(torch.int64).contiguous(), atoms.to(torch.int64).contiguous()
    ranges = torch.empty(2, L, dtype=torch.int64)  # (2, L): first pair and count of each label atom
    first, count = ranges[0], ranges[1]
    m = module.centre_ranges(idx_i.data_ptr(), idx_i.shape[0], atoms.data_ptr(), L, first.data_ptr(),
                             count.data_ptr())  # one call for four torch ops (~35 µs)
    order = None
    if m < 0:  # not sorted by centre: sort once (torch)
        order, first, count, m = _centre_ranges(idx_i, atoms)
    table = ref.new_zeros(L, n_atoms, E * sf.n_rad_keys + E * E * sf.n_ang_keys)  # (L, N, S)
    if r_ij is not None:
        vec, pos, off = r_ij.contiguous(), None, None  # (P, 3)
    else:
        vec, pos, off = None, positions.contiguous(), offsets.to(dtype).contiguous()  # (N, 3), (P, 3) Å
    longs = [None if a is None else a.to(torch.int64).contiguous()  # kept alive until the call returns
             for a in (idx_j, order, first, count, species, atoms, components)]
    fn = module.label_columns_f64 if dtype == torch.float64 else module.label_columns_f32
    fn(*(None if a is None else a.data_ptr() for a in (vec, pos, off, *longs)), *keys.native_args, L, m, E, n_atoms,
       *keys.native_cutoff, table.data_ptr())
    return table

