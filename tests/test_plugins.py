"""The plugin surface: entry points, the pluggy manager, `ekf-plugin list`, and the Hydra bridge."""

from __future__ import annotations

import os
import sys
import warnings
from importlib.metadata import entry_points

import pytest

from ekf_plugin import hookspecs, plugins
from ekf_plugin.plugins import KINDS, PluginLoadError, PluginLoadWarning, components, get_plugin_manager

from tests.helpers import make_fake_distribution, run_cli

TOY_PLUGIN = """
    from ekf_plugin import hookimpl

    @hookimpl
    def register_optimizers(register):
        register("toy_sgd", "torch.optim.SGD", "a throwaway optimizer")

    @hookimpl
    def register_config_dirs(register):
        import pathlib
        register("toy", (pathlib.Path(__file__).parent / "toy_configs").as_uri())
"""

BROKEN_PLUGIN = """
    raise ImportError("this plugin is broken on purpose")
"""


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A site dir with a working and a broken third-party plugin, on sys.path and PYTHONPATH."""
    site = tmp_path / "site"
    make_fake_distribution(site, "toy-plugin", TOY_PLUGIN)
    make_fake_distribution(site, "broken-plugin", BROKEN_PLUGIN)
    rep = site / "toy_configs" / "model" / "representation"
    rep.mkdir(parents=True)
    (rep / "toyrep.yaml").write_text("_target_: schnetpack.representation.SchNet\nn_atom_basis: 8\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    yield site
    for name in [m for m in sys.modules if m in ("toy_plugin", "broken_plugin")]:
        del sys.modules[name]
    get_plugin_manager(reload=True, strict=False)


def test_our_entry_point_is_in_installed_metadata():
    eps = {ep.name: ep for ep in entry_points(group=plugins.ENTRY_POINT_GROUP)}
    assert "ekf_plugin" in eps
    assert eps["ekf_plugin"].value == "ekf_plugin.default_plugin"
    assert eps["ekf_plugin"].dist.name == "ekf-plugin"


def test_our_components_come_through_our_own_entry_point():
    comps = components(pm=get_plugin_manager(reload=True))
    ours = {(c.kind, c.name) for c in comps if c.distribution == "ekf-plugin"}
    assert {("representations", "bpnn"), ("optimizers", "ekf"), ("callbacks", "fisher"), ("md_drivers", "ipi")} <= ours
    assert {c.kind for c in comps} == set(KINDS)


def test_hookspecs_are_few_and_all_register_style():
    specs = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert 1 <= len(specs) <= 5
    pm = get_plugin_manager()
    for name in specs:
        assert getattr(pm.hook, name).spec.argnames == ("register",)


def test_throwaway_plugin_is_loaded_and_broken_one_is_reported(fake_site):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_plugin_manager(reload=True, strict=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert any("broken_plugin" in m and "broken-plugin" in m for m in messages), messages
    names = {(c.name, c.distribution) for c in components(pm=pm)}
    assert ("toy_sgd", "toy-plugin") in names
    assert ("ekf", "ekf-plugin") in names  # the rest still load


def test_strict_mode_turns_a_broken_plugin_into_an_error(fake_site):
    with pytest.raises(PluginLoadError, match="broken_plugin"):
        get_plugin_manager(reload=True, strict=True)


def test_disabled_plugin_is_not_loaded(fake_site, monkeypatch):
    monkeypatch.setenv("EKF_PLUGIN_DISABLE", "broken_plugin,toy_plugin")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginLoadWarning)
        pm = get_plugin_manager(reload=True)
    assert "toy_sgd" not in {c.name for c in components(pm=pm)}


def test_duplicate_names_are_refused():
    class Twice:
        @hookspecs.hookimpl
        def register_callbacks(self, register):
            register("fisher", "x.Y")

    pm = get_plugin_manager(reload=True)
    pm.register(Twice(), name="twice")
    try:
        with pytest.raises(ValueError, match="registered twice"):
            components("callbacks", pm=pm)
    finally:
        pm.unregister(name="twice")


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown component kind"):
        components("widgets")


def test_cli_list_shows_components_with_distributions(fake_site):
    res = run_cli(["ekf-plugin", "list"])
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for kind in KINDS:
        assert f"{kind}:" in out
    assert "toy_sgd" in out and "[toy-plugin]" in out
    assert "[ekf-plugin]" in out
    assert "broken_plugin" in res.stderr  # reported, not fatal


@pytest.mark.slow
def test_spktrain_help_shows_our_options_and_third_party_configs(fake_site, tmp_path):
    res = run_cli(["spktrain", "--help"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    groups = {line.split(":")[0]: line for line in res.stdout.splitlines() if ":" in line}
    assert "toyrep" in groups["model/representation"]
    assert "bpnn_water" in groups["model/representation"]


def test_our_registered_targets_import():
    import importlib

    for comp in components(pm=get_plugin_manager(reload=True)):
        if comp.distribution != "ekf-plugin" or comp.kind == "config_dirs":
            continue
        module, _, attr = comp.target.replace(":", ".").rpartition(".")
        assert getattr(importlib.import_module(module), attr) is not None, comp
