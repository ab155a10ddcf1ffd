"""Fixes that let SchNetPack 2.0.x/2.1.x run on the PyTorch/torchmetrics versions we pin.

Each fix names the host versions it is for. They are applied automatically, without any
change to SchNetPack's files, by :func:`install_import_hook`, which ekf-plugin's
``ekf_plugin_compat.pth`` file runs at interpreter start-up: the hook waits for the first
``import schnetpack`` and removes itself afterwards, so processes that never import
SchNetPack pay nothing (no torch import at start-up).

=====================  =====================================  =========================================
fix                    host versions                          symptom without it
=====================  =====================================  =========================================
``T_co`` alias         schnetpack <= 2.1.1 with torch >= 2.4  ``ImportError: cannot import name 'T_co'``
scheduler ``verbose``  schnetpack <= 2.1.1 with torch >= 2.7  ``TypeError: ... unexpected keyword 'verbose'``
``weights_only``       schnetpack <= 2.2.0 with torch >= 2.6  ``UnpicklingError`` in ``trainer.test(ckpt_path="best")``
contiguous stress      schnetpack <= 2.2.0, torchmetrics 1.9  ``RuntimeError: view size is not compatible``
=====================  =====================================  =========================================

The last one is not patched into SchNetPack: use ``ekf_plugin.compat.ContiguousForces`` (our configs do).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any, Optional, Sequence

_HOOKED = ("schnetpack", "schnetpack.train.lr_scheduler")


def apply_torch_fixes() -> None:
    """Fixes needed *before* SchNetPack is imported (T_co alias, weights_only default).

    ``weights_only``: Lightning checkpoints and SchNetPack's ``best_model`` files pickle the whole
    model, which torch >= 2.6 refuses by default. ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` restores the
    old default only for call sites that pass no ``weights_only``; it is set only in processes that
    import SchNetPack. Load only checkpoints you trust (as with any pickle).
    """
    import torch.utils.data.dataloader as dl

    if not hasattr(dl, "T_co") and hasattr(dl, "_T_co"):
        dl.T_co = dl._T_co  # renamed in torch 2.4; schnetpack/data/loader.py <= 2.1.1 imports the old name
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def patch_reduce_lr_on_plateau(module: Any) -> None:
    """Drop ``verbose=`` from ``schnetpack.train.ReduceLROnPlateau`` (removed from torch in 2.7)."""
    cls = getattr(module, "ReduceLROnPlateau", None)
    if cls is None or getattr(cls, "_ekf_plugin_patched", False):
        return
    import inspect

    import torch

    if "verbose" in inspect.signature(torch.optim.lr_scheduler.ReduceLROnPlateau.__init__).parameters:
        return  # this torch still accepts it
    original_init = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        base_init = torch.optim.lr_scheduler.ReduceLROnPlateau.__init__

        def base_without_verbose(obj: Any, *a: Any, verbose: Any = None, **kw: Any) -> None:
            base_init(obj, *a, **kw)

        torch.optim.lr_scheduler.ReduceLROnPlateau.__init__ = base_without_verbose
        try:
            original_init(self, *args, **kwargs)
        finally:
            torch.optim.lr_scheduler.ReduceLROnPlateau.__init__ = base_init

    cls.__init__ = __init__
    cls._ekf_plugin_patched = True


class _PatchingLoader(importlib.abc.Loader):
    """Wraps the real loader of a hooked module and applies our fix around ``exec_module``."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        if self._name == "schnetpack":
            apply_torch_fixes()
        self._loader.exec_module(module)
        if self._name == "schnetpack.train.lr_scheduler":
            patch_reduce_lr_on_plateau(module)

    def __getattr__(self, item: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, item)


class _SchnetpackFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that intercepts only the modules in ``_HOOKED``."""

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Any = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname not in _HOOKED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None


def install_import_hook() -> None:
    """Apply the fixes on the first ``import schnetpack`` (idempotent; cheap: imports nothing)."""
    if os.environ.get("EKF_PLUGIN_NO_COMPAT") == "1":
        return
    if any(isinstance(f, _SchnetpackFinder) for f in sys.meta_path):
        return
    if "schnetpack" in sys.modules:  # imported before us: fix what can still be fixed
        ensure_host_compat()
        return
    sys.meta_path.insert(0, _SchnetpackFinder())


def ensure_host_compat() -> None:
    """Apply all fixes now, whether or not SchNetPack is imported yet. Safe to call repeatedly."""
    apply_torch_fixes()
    import schnetpack.train.lr_scheduler as lr

    patch_reduce_lr_on_plateau(lr)


def _make_contiguous_forces() -> type:
    ensure_host_compat()
    from schnetpack.atomistic import Forces

    class ContiguousForces(Forces):
        """``schnetpack.atomistic.Forces`` whose stress is contiguous.

        For schnetpack <= 2.2.0 with torchmetrics >= 1.9, whose metrics call ``view(-1)`` on the
        stress (strides (9, 1, 3) otherwise). Stress unit: energy unit / length unit**3.
        """

        def forward(self, inputs):  # type: ignore[override]
            inputs = super().forward(inputs)
            if self.calc_stress and self.stress_key in inputs:
                inputs[self.stress_key] = inputs[self.stress_key].contiguous()
            return inputs

    ContiguousForces.__module__ = __name__  # pickles as ekf_plugin.compat.ContiguousForces
    ContiguousForces.__qualname__ = "ContiguousForces"
    return ContiguousForces


_LAZY: dict = {}


def __getattr__(name: str) -> Any:
    """Build ``ContiguousForces`` on first use, so importing this module imports no torch."""
    if name == "ContiguousForces":
        if name not in _LAZY:
            _LAZY[name] = _make_contiguous_forces()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
