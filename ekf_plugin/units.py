"""Unit conversions at the package's boundaries, all from :mod:`ase.units` (CODATA 2014).

Working units inside SchNetPack models: Å (length) and eV (energy), so forces are eV/Å and stress
eV/Å³. The study's symmetry-function parameters and the data sets are in Bohr and Hartree; i-PI
speaks atomic units (Bohr, Hartree, virial in Hartree).
"""

from ase import units

BOHR = units.Bohr  # Å per Bohr (0.52917721...)
HARTREE = units.Hartree  # eV per Hartree (27.2113862...)
HARTREE_PER_BOHR = units.Hartree / units.Bohr  # eV/Å per Hartree/Bohr

LENGTH_TO_ANGSTROM = {"Angstrom": 1.0, "Ang": 1.0, "A": 1.0, "Bohr": BOHR, "bohr": BOHR, "au": BOHR}
ENERGY_TO_EV = {"eV": 1.0, "Hartree": HARTREE, "Ha": HARTREE, "hartree": HARTREE, "au": HARTREE}


def length_factor(unit: str) -> float:
    """Å per ``unit`` (``"Angstrom"``, ``"Bohr"``)."""
    try:
        return LENGTH_TO_ANGSTROM[unit]
    except KeyError:
        raise ValueError(f"unknown length unit {unit!r}; expected one of {sorted(LENGTH_TO_ANGSTROM)}") from None


def energy_factor(unit: str) -> float:
    """eV per ``unit`` (``"eV"``, ``"Hartree"``)."""
    try:
        return ENERGY_TO_EV[unit]
    except KeyError:
        raise ValueError(f"unknown energy unit {unit!r}; expected one of {sorted(ENERGY_TO_EV)}") from None
