"""The host-compatibility fixes in ekf_plugin.compat, tested against the real SchNetPack install."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def _python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


def test_pth_hook_is_installed_and_imports_nothing():
    """The start-up hook is a finder for one name; an interpreter that never imports SchNetPack loads no
    ekf_plugin, pluggy or torch module because of it."""
    res = _python(
        "import sys; print(getattr(sys.meta_path[0], '__name__', type(sys.meta_path[0]).__name__), "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('ekf_plugin', 'pluggy', 'torch', 'schnetpack')))"
    )
    assert res.stdout.strip().split(maxsplit=1) == ["EkfPluginSchnetpackHook", "[]"], res.stdout + res.stderr


def test_installed_pth_is_the_repository_file():
    """pip copies ekf_plugin/ekf_plugin_compat.pth into site-packages (pyproject force-include)."""
    import site
    from pathlib import Path

    import ekf_plugin

    installed = [Path(d) / "ekf_plugin_compat.pth" for d in site.getsitepackages()]
    installed = [p for p in installed if p.exists()]
    assert installed, "ekf_plugin_compat.pth is not installed"
    source = Path(ekf_plugin.__file__).parent / "ekf_plugin_compat.pth"
    assert installed[0].read_text() == source.read_text(), "stale install: rerun scripts/install.sh"


def test_hook_fires_once_removes_itself_and_sets_no_environment():
    res = _python(
        "import os, sys, schnetpack, torch.utils.data.dataloader as dl; "
        "print([getattr(f, '__name__', type(f).__name__) for f in sys.meta_path if 'Schnetpack' in "
        "getattr(f, '__name__', type(f).__name__)], "
        "[k for k in os.environ if k.startswith('TORCH_FORCE')], hasattr(dl, 'T_co'), "
        "schnetpack.train.ReduceLROnPlateau._ekf_plugin_patched)"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[]", "[]", "True", "True"], res.stdout


def test_importing_schnetpack_refuses_a_pickle_exactly_as_stock_torch(tmp_path):
    """With the plugin installed, a process that imports SchNetPack refuses a malicious pickle with the same
    error as a process with stock torch (the hook disabled, SchNetPack not imported), and runs no code."""
    import torch

    from tests.helpers import _WritesMarker

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save(_WritesMarker(marker), evil)
    code = ("import sys, torch\n{pre}\ntry:\n    torch.load(sys.argv[1])\nexcept Exception as e:\n"
            "    print(type(e).__module__, type(e).__name__, 'Unsupported global' in str(e))\n")
    ours = subprocess.run([sys.executable, "-c", code.format(pre="import schnetpack"), str(evil)],
                          capture_output=True, text=True, timeout=120)
    stock = subprocess.run([sys.executable, "-c", code.format(pre=""), str(evil)], capture_output=True, text=True,
                           timeout=120, env={**__import__("os").environ, "EKF_PLUGIN_NO_COMPAT": "1"})
    assert ours.returncode == 0 and stock.returncode == 0, ours.stderr + stock.stderr
    assert ours.stdout.split() == stock.stdout.split() == ["_pickle", "UnpicklingError", "True"], ours.stdout
    assert not marker.exists()


def test_hardened_torch_still_loads_our_format_and_best_models(tmp_path):
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 (a hardened user): our format and allow-listed best_model files load."""
    import torch

    from ekf_plugin.models import save_model, water_bpnn

    save_model(water_bpnn(seed=0), tmp_path / "own.pt")
    torch.save(water_bpnn(seed=1), tmp_path / "best_model")
    code = ("import sys, schnetpack; from ekf_plugin.models import load_model\n"
            "for p in sys.argv[1:]: print(type(load_model(p)).__name__)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "own.pt"), str(tmp_path / "best_model")],
                         capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["NeuralNetworkPotential"] * 2


def test_spktrain_checkpoint_loading_is_scoped_to_the_cli_call():
    """Inside schnetpack.cli.train/predict, Lightning reads ckpt_path with weights_only=False; outside, not."""
    import pytorch_lightning as pl
    import schnetpack.cli as cli

    from ekf_plugin.compat import patch_schnetpack_cli, spktrain_checkpoint_loading

    seen = {}
    original_fit = pl.Trainer.fit
    original_module_load = pl.LightningModule.__dict__["load_from_checkpoint"]
    try:
        pl.Trainer.fit = lambda self, *a, **kw: seen.update(kw)  # stands in for Lightning's own fit
        with spktrain_checkpoint_loading():
            pl.Trainer.fit(None, ckpt_path="last.ckpt")
            assert cli.load_model.keywords == {"weights_only": False}
        assert seen == {"ckpt_path": "last.ckpt", "weights_only": False}
        seen.clear()
        pl.Trainer.fit(None, ckpt_path="last.ckpt")
        assert seen == {"ckpt_path": "last.ckpt"}, "restored after the call"
        assert pl.LightningModule.__dict__["load_from_checkpoint"] is original_module_load
        assert not hasattr(cli.load_model, "keywords")
    finally:
        pl.Trainer.fit = original_fit
    train = cli.train
    try:
        patch_schnetpack_cli(cli)
        assert cli.train._ekf_plugin_patched and cli.train.__wrapped__ is train
    finally:
        cli.train = train


def test_without_the_fix_schnetpack_does_not_import():
    """Proves the fix is needed on this host (torch >= 2.4 with schnetpack <= 2.1.1)."""
    res = _python("import schnetpack", EKF_PLUGIN_NO_COMPAT="1")
    if res.returncode == 0:
        pytest.skip("this SchNetPack imports without the T_co fix (newer host)")
    assert "T_co" in res.stderr


def test_schnetpack_reduce_lr_on_plateau_accepts_its_own_defaults():
    import schnetpack.train as spk_train

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = spk_train.ReduceLROnPlateau(opt, patience=0, factor=0.5, smoothing_factor=0.0)
    sched.step(1.0)
    sched.step(2.0)
    sched.step(3.0)
    assert opt.param_groups[0]["lr"] < 0.1


def test_contiguous_forces_gives_contiguous_stress_and_pickles():
    import pickle

    import schnetpack as spk
    from ase.build import bulk

    from ekf_plugin.compat import ContiguousForces

    atoms = bulk("Cu", cubic=True)
    conv = spk.interfaces.AtomsConverter(neighbor_list=spk.transform.ASENeighborList(cutoff=3.0), dtype=torch.float64)
    model = spk.model.NeuralNetworkPotential(
        representation=spk.representation.SchNet(
            n_atom_basis=4, n_interactions=1, radial_basis=spk.nn.GaussianRBF(5, 3.0), cutoff_fn=spk.nn.CosineCutoff(3.0)
        ),
        input_modules=[spk.atomistic.Strain(), spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=4, output_key="energy"), ContiguousForces(calc_stress=True)],
    ).double()
    out = model(conv(atoms))
    assert out["stress"].shape == (1, 3, 3)
    assert out["stress"].is_contiguous()
    out["stress"].view(-1)  # what torchmetrics does
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone.output_modules[1]).__qualname__ == "ContiguousForces"
