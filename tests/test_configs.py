"""Every spktrain option shipped in ekf_plugin/configs composes with SchNetPack's own train config and
names classes that import. A real `spktrain --cfg job` run checks the console-script path."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object
from omegaconf import OmegaConf

from tests.helpers import run_cli

CONFIGS = Path(__file__).resolve().parents[1] / "ekf_plugin" / "configs"
OPTIONS = sorted(p.relative_to(CONFIGS).with_suffix("") for p in CONFIGS.rglob("*.yaml"))


def _override(option: Path) -> str:
    group, name = str(option.parent), option.name
    if group == "callbacks":
        return f"+callbacks={name}"  # append: never drop SchNetPack's checkpoint callback
    return f"{group}={name}"


def _targets(node, path=""):
    """All (path, dotted target) pairs of `_target_` / `*_cls` keys in a config tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if (k == "_target_" or k.endswith("_cls")) and isinstance(v, str) and "." in v:
                yield f"{path}.{k}", v
            else:
                yield from _targets(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def _package(option: Path) -> tuple:
    """Where an option's content lands in the composed config (``# @package _global_``: the root)."""
    text = (CONFIGS / option).with_suffix(".yaml").read_text()
    if "# @package _global_" in text.splitlines()[0]:
        return ()
    return tuple(str(option.parent).split("/"))


def _option_content(option: Path) -> dict:
    content = OmegaConf.to_container(OmegaConf.load((CONFIGS / option).with_suffix(".yaml")), resolve=False)
    content.pop("defaults", None)
    return content


def _missing(expected, actual, path="") -> list:
    """Every leaf of ``expected`` that ``actual`` does not hold at the same place (unresolved values)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected a mapping, got {actual!r}"]
        out = []
        for k, v in expected.items():
            out += _missing(v, actual.get(k, "<absent>"), f"{path}.{k}") if k in actual else [f"{path}.{k}: absent"]
        return out
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {expected!r}, got {actual!r}"]
        return [m for i, (e, a) in enumerate(zip(expected, actual)) for m in _missing(e, a, f"{path}[{i}]")]
    if expected == "???":  # OmegaConf: merging MISSING keeps the value already there
        return []
    return [] if expected == actual else [f"{path}: expected {expected!r}, got {actual!r}"]


def _at(tree: dict, package: tuple):
    for key in package:
        tree = tree[key]
    return tree


@pytest.fixture(scope="module")
def hydra_schnetpack():
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="schnetpack.configs", version_base="1.2"):
        yield
    GlobalHydra.instance().clear()


def test_there_are_options_to_check():
    groups = {str(o.parent) for o in OPTIONS}
    assert {"model/representation", "callbacks"} <= groups, groups


@pytest.mark.parametrize("option", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_option_composes_and_its_targets_import(hydra_schnetpack, option):
    # SchNetPack leaves globals.cutoff/lr to the experiment: supply them unless the option sets them itself
    own = _option_content(option).get("globals", {}) if not _package(option) else {}
    overrides = [_override(option)] + [f"++globals.{k}={v}" for k, v in (("cutoff", 5.0), ("lr", 1e-3)) if k not in own]
    if str(option.parent) not in ("model", "experiment"):
        overrides.insert(0, "model=nnp")
    cfg = compose(config_name="train", overrides=overrides)
    tree = OmegaConf.to_container(cfg, resolve=False)
    if str(option.parent) == "callbacks":
        assert "model_checkpoint" in tree["callbacks"], "appending must keep SchNetPack's checkpoint callback"
    assert not _missing(_option_content(option), _at(tree, _package(option))), "the option's values are in the config"
    targets = list(_targets(tree))
    assert targets, "a composed training config names classes"
    for where, target in targets:
        if target.startswith(("ekf_plugin", "hydra_plugins")):
            assert get_object(target) is not None, f"{option}: {where} -> {target} does not import"


@pytest.mark.slow
def test_spktrain_cfg_job_with_our_options(tmp_path):
    """One console-script run with a representation, a model, a task and a callback of ours together."""
    chosen = {}
    for option in OPTIONS:
        chosen.setdefault(str(option.parent), option)  # one option per group (Hydra takes one +callbacks=)
    groups = ("model", "model/representation", "task", "callbacks")
    args = ["spktrain", "--cfg", "job", "++globals.cutoff=5.0", "++globals.lr=1e-3"]
    args += [_override(chosen[g]) for g in groups if g in chosen]
    res = run_cli(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    job = OmegaConf.to_container(OmegaConf.create(res.stdout), resolve=False)  # the config spktrain would run
    used = [g for g in groups if g in chosen]
    assert len(used) == 4, chosen
    for g in used:
        missing = _missing(_option_content(chosen[g]), _at(job, _package(chosen[g])))
        assert not missing, f"spktrain's job config lacks {chosen[g]}: {missing[:5]}"
