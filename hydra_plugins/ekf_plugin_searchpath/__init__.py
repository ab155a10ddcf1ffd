"""Hydra search-path plugin: adds every ekf-plugin plugin's config directories to SchNetPack's apps.

Hydra imports this module at the start of every Hydra app in the environment, so it stays light
and acts only when SchNetPack's own configs are on the search path (``spktrain``).
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

SCHNETPACK_CONFIGS = "pkg://schnetpack.configs"


def _is_schnetpack_app(path: str) -> bool:
    """True for SchNetPack's primary config dir (Hydra writes it ``pkg://schnetpack/configs`` at first)."""
    return path.replace("/", ".").rstrip(".").replace("pkg:..", "pkg://") == SCHNETPACK_CONFIGS


class EkfPluginSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not any(_is_schnetpack_app(element.path or "") for element in search_path.get_path()):
            return
        from ekf_plugin.plugins import components

        for comp in components("config_dirs"):
            search_path.append(provider=f"{comp.plugin}:{comp.name}", path=comp.target)
