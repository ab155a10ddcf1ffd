"""Fixes that let SchNetPack 2.0.x/2.1.x run on the PyTorch/torchmetrics versions we pin.

Each fix names the host versions it is for, and acts only on what SchNetPack needs to import and
run; none changes torch's global behaviour (no environment variable, no change of ``torch.load``).

=======================  =====================================  ============================================
fix                      host versions                          symptom without it
=======================  =====================================  ============================================
``T_co`` alias           schnetpack <= 2.1.1 with torch >= 2.4  ``ImportError: cannot import name 'T_co'``
scheduler ``verbose``    schnetpack <= 2.1.1 with torch >= 2.7  ``TypeError: ... unexpected keyword 'verbose'``
spktrain checkpoints     schnetpack <= 2.2.0 with torch >= 2.6  ``UnpicklingError`` in ``trainer.test(ckpt_path="best")``
contiguous stress        schnetpack <= 2.2.0, torchmetrics 1.9  ``RuntimeError: view size is not compatible``
=======================  =====================================  ============================================

How they are applied (blast radius, see ``docs/install.md``):

* ``ekf_plugin_compat.pth`` (installed into site-packages) puts a tiny finder at the front of
  ``sys.meta_path`` in every interpreter of the environment. It imports nothing (not even
  ``ekf_plugin``) and reacts to one module name only, ``schnetpack``; every other import passes
  through at the cost of one string comparison. ``EKF_PLUGIN_NO_COMPAT=1`` disables it (SchNetPack
  2.1.1 then does not import on torch >= 2.4).
* On the first ``import schnetpack`` it adds ``torch.utils.data.dataloader.T_co`` (an alias of the
  renamed ``_T_co``) before SchNetPack runs, wraps ``schnetpack.train.ReduceLROnPlateau.__init__``
  after, and removes itself from ``sys.meta_path``.
* Only in SchNetPack's own console scripts (``spktrain``, ``spkpredict``; recognised by
  ``sys.argv[0]``) it also wraps ``schnetpack.cli.train``/``predict`` so that, for the duration of that
  call, Lightning's ``Trainer.fit/validate/test/predict`` and ``LightningModule.load_from_checkpoint``
  read the run's own checkpoints (``checkpoints/last.ckpt``, ``ckpt_path="best"``, the best checkpoint
  it turns into ``best_model``) with ``weights_only=False``, and ``schnetpack.cli``'s
  ``load_model("best_model")`` does the same: Lightning checkpoints of SchNetPack pickle the whole
  model in their hyper-parameters. Every other ``torch.load`` in the process keeps torch's default
  (``weights_only=True``), so a process that imports SchNetPack refuses a pickle exactly as stock
  torch does. With ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` torch overrides these call sites too, and
  ``spktrain`` cannot resume or test from its Lightning checkpoints (everything ekf-plugin loads
  itself still works).

The contiguous-stress fix is not patched into SchNetPack: use ``ekf_plugin.compat.ContiguousForces``
(our configs do).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any, Iterator, Optional, Sequence

SPK_SCRIPTS = ("spktrain", "spkpredict")  # SchNetPack console scripts whose checkpoint reads we scope


def apply_torch_fixes() -> None:
    """The fix needed *before* SchNetPack is imported: the ``T_co`` alias (renamed ``_T_co`` in torch 2.4).

    Adds one module attribute that SchNetPack <= 2.1.1 (``schnetpack/data/loader.py``) imports; changes
    nothing else (no environment variable, no ``torch.load`` default).
    """
    import torch.utils.data.dataloader as dl

    if not hasattr(dl, "T_co") and hasattr(dl, "_T_co"):
        dl.T_co = dl._T_co


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


@contextlib.contextmanager
def spktrain_checkpoint_loading() -> Iterator[None]:
    """While active, Lightning's ``Trainer.fit/validate/test/predict`` and ``LightningModule.load_from_checkpoint``
    load checkpoints with ``weights_only=False`` unless the caller says otherwise, and ``schnetpack.cli.load_model``
    too.

    For SchNetPack's own CLI only (see the module docstring): it reads checkpoints that the same run wrote
    (Lightning checkpoints pickle the model in their hyper-parameters). Not thread-safe by design: it is
    entered once around ``schnetpack.cli.train``/``predict`` in an ``spktrain``/``spkpredict`` process.
    """
    import pytorch_lightning as pl

    saved = {}
    for name in ("fit", "validate", "test", "predict"):
        original = getattr(pl.Trainer, name)
        saved[name] = original

        def call(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            kwargs.setdefault("weights_only", False)
            return _original(self, *args, **kwargs)

        functools.update_wrapper(call, original)
        setattr(pl.Trainer, name, call)
    module_load = pl.LightningModule.__dict__["load_from_checkpoint"]  # spktrain: best_task = load_from_checkpoint(best)

    def load_from_checkpoint(cls: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("weights_only", False)
        return module_load.__get__(None, cls)(*args, **kwargs)

    pl.LightningModule.load_from_checkpoint = classmethod(load_from_checkpoint)
    cli = sys.modules.get("schnetpack.cli")
    cli_load = getattr(cli, "load_model", None)
    if cli_load is not None:
        cli.load_model = functools.partial(cli_load, weights_only=False)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(pl.Trainer, name, original)
        pl.LightningModule.load_from_checkpoint = module_load
        if cli_load is not None:
            cli.load_model = cli_load


def patch_schnetpack_cli(cli: Any) -> None:
    """Wrap ``schnetpack.cli.train``/``predict`` in :func:`spktrain_checkpoint_loading` (idempotent)."""
    for name in ("train", "predict"):
        fn = getattr(cli, name, None)
        if fn is None or getattr(fn, "_ekf_plugin_patched", False):
            continue

        def wrapped(*args: Any, _fn: Any = fn, **kwargs: Any) -> Any:
            with spktrain_checkpoint_loading():
                return _fn(*args, **kwargs)

        functools.update_wrapper(wrapped, fn)
        wrapped._ekf_plugin_patched = True  # type: ignore[attr-defined]
        setattr(cli, name, wrapped)


def _is_spk_script() -> bool:
    argv0 = os.path.basename(sys.argv[0]) if getattr(sys, "argv", None) else ""
    return argv0 in SPK_SCRIPTS


def _after_schnetpack_import() -> None:
    """Post-import fixes: scheduler; in ``spktrain``/``spkpredict`` processes the CLI wrapper."""
    lr = sys.modules.get("schnetpack.train.lr_scheduler")
    if lr is not None:
        patch_reduce_lr_on_plateau(lr)
    if _is_spk_script():
        import schnetpack.cli as cli

        patch_schnetpack_cli(cli)


def remove_import_hook() -> None:
    """Remove every ekf-plugin finder from ``sys.meta_path`` (the ``.pth`` one and :class:`_SchnetpackFinder`)."""
    sys.meta_path[:] = [
        f for f in sys.meta_path
        if not (isinstance(f, _SchnetpackFinder) or getattr(f, "__name__", "") == "EkfPluginSchnetpackHook")
    ]


class _PatchingLoader(importlib.abc.Loader):
    """Wraps SchNetPack's real loader and applies our fixes around ``exec_module``."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        remove_import_hook()  # fired: out of sys.meta_path before SchNetPack imports anything
        apply_torch_fixes()
        self._loader.exec_module(module)
        _after_schnetpack_import()

    def __getattr__(self, item: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, item)


def find_schnetpack_spec(fullname: str, path: Optional[Sequence[str]] = None,
                         target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
    """Spec of ``schnetpack`` with our loader around the real one (``None`` for any other name)."""
    if fullname != "schnetpack" or os.environ.get("EKF_PLUGIN_NO_COMPAT") == "1":
        return None
    for finder in list(sys.meta_path):
        if isinstance(finder, _SchnetpackFinder) or getattr(finder, "__name__", "") == "EkfPluginSchnetpackHook":
            continue
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        spec = find(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, fullname)
            return spec
    return None


class _SchnetpackFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder for ``schnetpack`` only (what :func:`install_import_hook` installs)."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None):
        return find_schnetpack_spec(fullname, path, target)


def install_import_hook() -> None:
    """Apply the fixes on the first ``import schnetpack`` (idempotent; imports nothing now).

    The ``.pth`` file installs an equivalent, smaller finder itself; this is for interpreters
    without it (e.g. a source checkout on ``PYTHONPATH``).
    """
    if os.environ.get("EKF_PLUGIN_NO_COMPAT") == "1":
        return
    if "schnetpack" in sys.modules:  # imported before us: fix what can still be fixed
        ensure_host_compat()
        return
    if any(isinstance(f, _SchnetpackFinder) or getattr(f, "__name__", "") == "EkfPluginSchnetpackHook"
           for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _SchnetpackFinder())


def ensure_host_compat() -> None:
    """Apply the import/run fixes now, whether or not SchNetPack is imported yet. Safe to call repeatedly."""
    apply_torch_fixes()
    import schnetpack.train.lr_scheduler as lr

    patch_reduce_lr_on_plateau(lr)
    remove_import_hook()


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
