"""Behler-Parrinello neural network potentials: symmetry functions, scaling, element networks.

Public names: :class:`BehlerParrinello` (SchNetPack representation), :class:`ElementNetworks`
(output module), :class:`SymmetryFunctions` (raw G2/G3), :class:`CutoffFunction`, the parameter
records :class:`G2`/:class:`G3` and the study's preset :func:`water_paper`.
"""

from .cutoff import CutoffFunction
from .networks import ElementNetworks
from .presets import G2, G3, water_paper, water_paper_bohr
from .representation import BehlerParrinello
from .symmetry import SymmetryFunctions

__all__ = ["BehlerParrinello", "ElementNetworks", "SymmetryFunctions", "CutoffFunction", "G2", "G3",
           "water_paper", "water_paper_bohr"]
