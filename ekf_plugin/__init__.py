"""ekf-plugin: Extended Kalman Filter training and Behler-Parrinello potentials for SchNetPack.

Importing this package is cheap: the public names below are resolved lazily, so that plugin
discovery and the start-up compatibility hook import neither torch nor SchNetPack.

Public API::

    from ekf_plugin import EKF                 # torch.optim-style Extended Kalman Filter
    from ekf_plugin import calculator          # ASE calculator for any model the plugin can load
    from ekf_plugin import hookimpl            # marker for third-party plugins
    from ekf_plugin import get_plugin_manager  # the pluggy manager with every plugin loaded
"""

from __future__ import annotations

from typing import Any

from .__about__ import __version__
from .hookspecs import hookimpl

_LAZY = {
    "EKF": ("ekf_plugin.optim.ekf", "EKF"),
    "calculator": ("ekf_plugin.ase_calculator", "calculator"),
    "get_plugin_manager": ("ekf_plugin.plugins", "get_plugin_manager"),
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ekf_plugin' has no attribute {name!r}")
