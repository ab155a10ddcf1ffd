"""Optimizers: the Extended Kalman Filter (:class:`EKF`), plain PyTorch, no chemistry."""

from .ekf import EKF, EKFDivergenceError, plan_blocks

__all__ = ["EKF", "EKFDivergenceError", "plan_blocks"]
