"""The study's training protocol inside SchNetPack: label schedule and the manual-optimization task."""

from .schedule import C_ENERGY_EV, C_FORCES_EV_ANG, draw_kinds, weighted_errors
from .task import PaperScheduleTask

__all__ = ["PaperScheduleTask", "C_ENERGY_EV", "C_FORCES_EV_ANG", "draw_kinds", "weighted_errors"]
