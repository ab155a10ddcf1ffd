"""Plugin discovery: one pluggy manager that loads the ``ekf_plugin`` entry points one by one.

A plugin that fails to import is reported with a warning naming it and its distribution, and the
others still load; ``EKF_PLUGIN_STRICT=1`` (or ``strict=True``) turns that into an error.
``EKF_PLUGIN_DISABLE=a,b`` blocks entry points by name.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Dict, List, Optional

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "ekf_plugin"
KINDS = ("representations", "optimizers", "callbacks", "md_drivers", "config_dirs")


class PluginLoadError(RuntimeError):
    """A plugin could not be loaded (raised in strict mode only)."""


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded and was skipped."""


@dataclass(frozen=True)
class Component:
    """One registered component: ``kind`` is one of :data:`KINDS`, ``target`` a dotted path."""

    kind: str
    name: str
    target: str
    plugin: str
    distribution: str
    description: str = ""


_pm: Optional[pluggy.PluginManager] = None
_distributions: Dict[str, str] = {}


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _load_entry_points(pm: pluggy.PluginManager, strict: bool) -> None:
    blocked = {n.strip() for n in os.environ.get("EKF_PLUGIN_DISABLE", "").split(",") if n.strip()}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in blocked or pm.get_plugin(ep.name) is not None:
            continue
        dist = ep.dist.name if ep.dist is not None else "?"
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not take the host down
            msg = f"ekf-plugin: skipped plugin {ep.name!r} from distribution {dist!r} ({ep.value}): {exc!r}"
            if strict:
                raise PluginLoadError(msg) from exc
            warnings.warn(msg, PluginLoadWarning, stacklevel=2)
            continue
        _distributions[ep.name] = dist


def get_plugin_manager(strict: Optional[bool] = None, reload: bool = False) -> pluggy.PluginManager:
    """Return the process-wide plugin manager with every installed plugin loaded.

    Args:
        strict: raise :class:`PluginLoadError` instead of warning on a broken plugin
            (default: ``EKF_PLUGIN_STRICT=1`` in the environment).
        reload: forget the cached manager and load the entry points again.
    """
    global _pm
    if strict is None:
        strict = os.environ.get("EKF_PLUGIN_STRICT") == "1"
    if _pm is None or reload:
        _distributions.clear()
        pm = _new_manager()
        _load_entry_points(pm, strict)
        pm.check_pending()
        _pm = pm
    return _pm


def _distribution_of(pm: pluggy.PluginManager, plugin: object) -> str:
    name = pm.get_name(plugin) or "?"
    return _distributions.get(name, "(registered at run time)")


def components(kind: Optional[str] = None, pm: Optional[pluggy.PluginManager] = None) -> List[Component]:
    """All registered components (of one ``kind`` if given), in registration order.

    Raises:
        ValueError: on an unknown ``kind`` or a name registered twice within one kind.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")
    pm = pm or get_plugin_manager()
    found: List[Component] = []
    for k in KINDS if kind is None else (kind,):
        hook = getattr(pm.hook, f"register_{k}")
        for impl in reversed(hook.get_hookimpls()):  # pluggy calls last-registered first
            plugin_name = pm.get_name(impl.plugin) or "?"
            dist = _distribution_of(pm, impl.plugin)

            def register(name: str, target: str, description: str = "", _k=k, _p=plugin_name, _d=dist) -> None:
                if any(c.kind == _k and c.name == name for c in found):
                    raise ValueError(f"{_k[:-1]} {name!r} registered twice (second time by plugin {_p!r})")
                found.append(Component(_k, name, target, _p, _d, description))

            impl.function(**{a: register for a in impl.argnames})
    return found


def config_search_paths(pm: Optional[pluggy.PluginManager] = None) -> List[str]:
    """Hydra search-path entries contributed by every plugin (``pkg://...`` or ``file://...``)."""
    return [c.target for c in components("config_dirs", pm)]
