"""Hook specifications for ekf-plugin plugins.

A plugin is a module (or object) with ``@hookimpl`` functions, exposed through the ``ekf_plugin``
entry-point group::

    # pyproject.toml of your package
    [project.entry-points.ekf_plugin]
    my_plugin = "my_package.ekf_hooks"

    # my_package/ekf_hooks.py
    from ekf_plugin import hookimpl

    @hookimpl
    def register_optimizers(register):
        register("my_optimizer", "my_package.optim.MyOptimizer", description="...")

Every ``register`` callback takes ``(name, target, description="")`` where ``target`` is a dotted
import path (nothing is imported at registration time).
"""

from pluggy import HookimplMarker, HookspecMarker

PROJECT = "ekf_plugin"
hookspec = HookspecMarker(PROJECT)
hookimpl = HookimplMarker(PROJECT)


@hookspec
def register_representations(register):
    """Register atomistic representations (SchNetPack ``model/representation`` modules)."""


@hookspec
def register_optimizers(register):
    """Register optimizers (``torch.optim.Optimizer`` subclasses) and training tasks."""


@hookspec
def register_callbacks(register):
    """Register Lightning callbacks."""


@hookspec
def register_md_drivers(register):
    """Register molecular-dynamics drivers (e.g. i-PI clients)."""


@hookspec
def register_config_dirs(register):
    """Register Hydra config directories (``pkg://package.path`` or ``file://`` paths) for ``spktrain``."""
