"""Symmetry-function parameter sets: the study's water set and user-defined lists.

A parameter set is a list of :class:`G2` (radial) and :class:`G3` (narrow angular) records, in the
order the features appear in each element's vector. Records store parameters in **Å** (η in Å⁻²,
r_s in Å); :func:`convert_length` converts from another unit once, at the boundary.

The study's set (SI Tables S1/S2, Bohr; ``water_paper()``), in this documented order:

* O (30): G2 O–H η = 0.001, 0.01, 0.03, 0.06 (r_s 0) and 0.15, 0.30, 0.60, 1.50 (r_s 0.9 Bohr);
  G2 O–O same η with r_s 0 / 4.0 Bohr; G3 O–HH (λ = +1: (ζ, η) = (4, 0.01), (1, 0.03), (1, 0.07);
  λ = −1: same); G3 O–OH (λ = ±1: (4, 0.001), (1, 0.03)); G3 O–OO (λ = ±1: (4, 0.001), (1, 0.03)).
* H (27): G2 H–H η as above (r_s 0 / 1.9 Bohr); G2 H–O (r_s 0 / 0.9 Bohr); G3 H–OH (λ = +1:
  (4, 0.01), (1, 0.03), (1, 0.07), (1, 0.20); λ = −1: (4, 0.01), (1, 0.03), (1, 0.07));
  G3 H–OO (λ = ±1: (4, 0.001), (1, 0.03)).

Table S2 prints the O–H–H triplet twice. The second O–H–H block (η 0.001/0.03, ζ 4/1) is the
O–O–O block: n2p2's ``input.nn`` of the same 57 functions (``n2p2-h2o-rpbe-d3``, also the four
``H2O_*`` potentials and Cheng 2019) has exactly these parameters for ``O 3 O O`` and no second O–HH
block, and only with it does O reach 30 functions (16 G2 + 6 + 4 + 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, List, Sequence, Tuple, Union

from ase.data import atomic_numbers, chemical_symbols

from ..units import length_factor


def element_symbol(element: Union[str, int]) -> str:
    """``"O"``/``8`` → ``"O"``; ValueError for anything that is not an element."""
    if isinstance(element, str) and element in atomic_numbers:
        return element
    try:
        z = int(element)
        if 0 < z < len(chemical_symbols):
            return chemical_symbols[z]
    except (TypeError, ValueError):
        pass
    raise ValueError(f"not a chemical element: {element!r}")


@dataclass(frozen=True)
class G2:
    """Radial G2 = Σ_j exp(−η (r_ij − r_s)²) f_c(r_ij) over neighbours j of element ``neighbor``.

    η in Å⁻², r_s in Å (after :func:`convert_length`).
    """

    center: str
    neighbor: str
    eta: float
    rs: float = 0.0
    kind: str = field(default="G2", init=False)


@dataclass(frozen=True)
class G3:
    """Narrow angular G3 (n2p2 type 3, PiNN ``G3``) for neighbour elements ``neighbors`` (unordered).

    G3 = 2^(1−ζ) Σ_{j<k} (1 + λ cos θ_ijk)^ζ exp(−η[(r_ij−r_s)² + (r_ik−r_s)² + (r_jk−r_s)²])
    f_c(r_ij) f_c(r_ik) f_c(r_jk); η in Å⁻², r_s in Å. See :mod:`ekf_plugin.bpnn.symmetry` for the
    pair-counting convention.
    """

    center: str
    neighbors: Tuple[str, str]
    eta: float
    lam: float
    zeta: float
    rs: float = 0.0
    kind: str = field(default="G3", init=False)

    def __post_init__(self) -> None:
        if self.lam not in (-1.0, 1.0):
            raise ValueError(f"G3 lambda must be +1 or -1, got {self.lam}")
        if self.zeta < 1:
            raise ValueError(f"G3 zeta must be >= 1, got {self.zeta}")
        object.__setattr__(self, "neighbors", tuple(sorted(self.neighbors, key=lambda s: atomic_numbers[s])))


SymmetryFunction = Union[G2, G3]


def convert_length(functions: Iterable[SymmetryFunction], unit: str) -> List[SymmetryFunction]:
    """Parameters given in ``unit`` (``"Bohr"``, ``"Angstrom"``) → Å: η / a², r_s · a (a = Å per unit)."""
    a = length_factor(unit)
    return [replace(f, eta=f.eta / a**2, rs=f.rs * a) for f in functions]


def from_config(items: Sequence, unit: str = "Angstrom") -> List[SymmetryFunction]:
    """Build records from YAML/Python items, parameters in ``unit``.

    Each item is a G2/G3 record or a mapping ``{center: O, type: G2, neighbors: [H], eta: 0.01,
    rs: 0.0}`` / ``{center: O, type: G3, neighbors: [H, H], eta: 0.01, lambda: 1, zeta: 4}``.
    """
    out: List[SymmetryFunction] = []
    for item in items:
        if isinstance(item, (G2, G3)):
            out.append(item)
            continue
        d = dict(item)
        kind = str(d.get("type", "G2")).upper()
        center = element_symbol(d["center"])
        neigh = [element_symbol(e) for e in d.get("neighbors", [d.get("neighbor")])]
        if kind in ("G2", "2"):
            if len(neigh) != 1:
                raise ValueError(f"G2 needs one neighbour element, got {neigh}")
            out.append(G2(center, neigh[0], float(d["eta"]), float(d.get("rs", 0.0))))
        elif kind in ("G3", "3"):
            if len(neigh) != 2:
                raise ValueError(f"G3 needs two neighbour elements, got {neigh}")
            lam = float(d.get("lambda", d.get("lam")))
            out.append(G3(center, tuple(neigh), float(d["eta"]), lam, float(d["zeta"]), float(d.get("rs", 0.0))))
        else:
            raise ValueError(f"unknown symmetry function type {kind!r}; expected G2 or G3")
    return convert_length(out, unit)


_ETA_RAD = (0.001, 0.01, 0.03, 0.06, 0.15, 0.30, 0.60, 1.50)  # Bohr^-2, Table S1


def _g2_block(center: str, neighbor: str, rs_far: float) -> List[G2]:
    return [G2(center, neighbor, eta, 0.0 if n < 4 else rs_far) for n, eta in enumerate(_ETA_RAD)]


def _g3_block(center: str, neighbors: Tuple[str, str], rows) -> List[G3]:
    return [G3(center, neighbors, eta, lam, zeta) for lam, pairs in rows for zeta, eta in pairs]


def water_paper_bohr() -> List[SymmetryFunction]:
    """The study's 57 water functions (30 O, then 27 H), parameters in **Bohr** (Tables S1/S2)."""
    oh_oo = ((4.0, 0.001), (1.0, 0.03))
    o = (
        _g2_block("O", "H", 0.9)
        + _g2_block("O", "O", 4.0)
        + _g3_block("O", ("H", "H"), [(lam, ((4.0, 0.01), (1.0, 0.03), (1.0, 0.07))) for lam in (1.0, -1.0)])
        + _g3_block("O", ("H", "O"), [(lam, oh_oo) for lam in (1.0, -1.0)])
        + _g3_block("O", ("O", "O"), [(lam, oh_oo) for lam in (1.0, -1.0)])
    )
    h = (
        _g2_block("H", "H", 1.9)
        + _g2_block("H", "O", 0.9)
        + _g3_block("H", ("H", "O"), [(1.0, ((4.0, 0.01), (1.0, 0.03), (1.0, 0.07), (1.0, 0.20))),
                                      (-1.0, ((4.0, 0.01), (1.0, 0.03), (1.0, 0.07)))])
        + _g3_block("H", ("O", "O"), [(lam, oh_oo) for lam in (1.0, -1.0)])
    )
    return o + h


WATER_CUTOFF_BOHR = 12.0


def water_paper() -> List[SymmetryFunction]:
    """The study's 57 water functions with parameters in Å (converted from Bohr with ase.units)."""
    return convert_length(water_paper_bohr(), "Bohr")


PRESETS = {"water_paper": water_paper}


def resolve(symmetry_functions, unit: str = "Angstrom") -> List[SymmetryFunction]:
    """A preset name (``"water_paper"``, Å) or a list for :func:`from_config` (in ``unit``)."""
    if isinstance(symmetry_functions, str):
        try:
            return PRESETS[symmetry_functions]()
        except KeyError:
            raise ValueError(f"unknown symmetry-function preset {symmetry_functions!r}; known: {sorted(PRESETS)}") from None
    return from_config(symmetry_functions, unit)


def per_element(functions: Sequence[SymmetryFunction], elements: Sequence[str]) -> dict:
    """{element: [functions centred on it, in order]}; ValueError if a function names an unknown element."""
    out = {e: [] for e in elements}
    for f in functions:
        names = (f.center, f.neighbor) if isinstance(f, G2) else (f.center, *f.neighbors)
        for n in names:
            if n not in out:
                raise ValueError(f"symmetry function {f} uses element {n!r}, not in the model's elements {list(elements)}")
        out[f.center].append(f)
    return out
