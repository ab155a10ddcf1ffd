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


def test_pth_hook_is_installed_and_lazy():
    res = _python("import sys; print(type(sys.meta_path[0]).__name__, 'torch' in sys.modules)")
    assert res.stdout.split() == ["_SchnetpackFinder", "False"], res.stderr


def test_schnetpack_imports_and_hook_removes_nothing_else():
    res = _python("import schnetpack, os; print(os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"


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
