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
    overrides = [_override(option), "++globals.cutoff=5.0", "++globals.lr=1e-3"]
    if str(option.parent) not in ("model", "experiment"):
        overrides.insert(0, "model=nnp")
    cfg = compose(config_name="train", overrides=overrides)
    tree = OmegaConf.to_container(cfg, resolve=False)
    if str(option.parent) == "callbacks":
        assert "model_checkpoint" in tree["callbacks"], "appending must keep SchNetPack's checkpoint callback"
    for where, target in _targets(tree):
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
    for g in groups:
        if g in chosen:
            assert chosen[g].name in " ".join(args)
    assert res.stdout.count("ekf_plugin.") >= len([g for g in groups if g in chosen])
