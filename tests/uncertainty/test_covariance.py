"""Covariance files: round trip, float32, refusal of pickled code, extraction from EKF checkpoints."""

from __future__ import annotations

import pytest
import torch

from ekf_plugin import EKF
from ekf_plugin.uncertainty import (CovarianceError, CovarianceMismatchError, covariance_from_checkpoint,
                                    covariance_from_optimizer, default_path, load_covariance, read_checkpoint,
                                    save_covariance)
from ekf_plugin.uncertainty.covariance import FORMAT, _column_order
from tests.helpers import _WritesMarker
from tests.uncertainty._models import random_covariance, tiny_bpnn


def test_round_trip_float64_is_exact_and_float32_halves_the_size(tmp_path):
    model = tiny_bpnn()
    lw = {"c_energy": 999.9, "c_forces": 1000.0, "n_force_components": 10, "energy_per_atom": False}
    cov = random_covariance(model, [100, sum(p.numel() for p in model.parameters()) - 100], label_weights=lw, noise=1e3)
    p64 = save_covariance(cov, tmp_path / "m.pt.cov.pt")
    p32 = save_covariance(cov, tmp_path / "m32.cov.pt", dtype=torch.float32)
    back = load_covariance(p64)
    assert back.blocks == cov.blocks and back.names == cov.names and back.shapes == cov.shapes
    assert back.noise == 1e3 and back.label_weights == lw and back.step == 5 and back.meta["stored_dtype"] == "float64"
    for a, b in zip(back.P, cov.P):
        assert torch.equal(a, b)
    assert torch.equal(back.weights, cov.weights)
    b32 = load_covariance(p32)
    assert b32.dtype == torch.float64 and b32.meta["stored_dtype"] == "float32"
    assert load_covariance(p32, dtype=torch.float32).dtype == torch.float32
    torch.testing.assert_close(b32.P[1], cov.P[1], rtol=1e-7, atol=1e-7)
    assert 0.45 < p32.stat().st_size / p64.stat().st_size < 0.6
    assert default_path(tmp_path / "best_model") == tmp_path / "best_model.cov.pt"


def test_pickled_code_and_foreign_files_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    evil = _WritesMarker(marker)
    files = {
        "plain_pickle": evil,
        "inside_our_format": {"format": FORMAT, "P": [evil], "blocks": [[0, 1]], "names": ["w"], "shapes": [[1]],
                              "weights": torch.zeros(1), "noise": 1.0},
        "not_ours": {"format": "something/1", "P": [torch.eye(2)]},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CovarianceError):
            load_covariance(tmp_path / name)
    assert not marker.exists()
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CovarianceError, match="empty"):
        load_covariance(tmp_path / "empty")
    good = save_covariance(random_covariance(tiny_bpnn()), tmp_path / "good.cov.pt")
    (tmp_path / "cut").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CovarianceError, match="truncated"):
        load_covariance(tmp_path / "cut")
    with pytest.raises(FileNotFoundError):
        load_covariance(tmp_path / "missing")


def _fake_lightning_checkpoint(path, model, opt, marker, **hp):
    """What spktrain writes, reduced to what matters: task state dict (model.*), optimizer states, and
    hyper-parameters that pickle foreign objects (here one that writes ``marker`` when unpickled)."""
    ck = {
        "epoch": 0, "global_step": 7,
        "state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()},
        "optimizer_states": [opt.state_dict()],
        "hyper_parameters": {"model": _WritesMarker(marker), "c_energy": 999.9, "c_forces": 1000.0,
                             "n_force_components": 10, "energy_per_atom": False, "param_blocks": None, **hp},
    }
    torch.save(ck, path)
    return path


def _train_a_little(model, opt, steps=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps, len(list(model.parameters())), generator=g, dtype=torch.float64)
    for k in range(steps):  # any closure: ξ linear in the weights
        opt.step(lambda: torch.stack([sum(xi * p.sum() for xi, p in zip(x[k], model.parameters()))]))


@pytest.mark.parametrize("param_blocks", [None, "element", "layer"])
def test_covariance_from_a_checkpoint_runs_nothing_from_it_and_matches_the_optimizer(tmp_path, param_blocks):
    from ekf_plugin.training.task import PaperScheduleTask

    model = tiny_bpnn()
    task = PaperScheduleTask(model, outputs=[], optimizer_args={"lr": 2e-3}, param_blocks=param_blocks)
    opt = task.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple) else opt
    opt = opt[0] if isinstance(opt, list) else opt
    _train_a_little(model, opt)
    marker = tmp_path / "pwned"
    ckpt = _fake_lightning_checkpoint(tmp_path / "last.ckpt", model, opt, marker, param_blocks=param_blocks)
    cov = covariance_from_checkpoint(ckpt, tiny_bpnn())
    assert not marker.exists()
    ref = covariance_from_optimizer(opt, model)
    assert cov.names == ref.names == _column_order(model, {"param_blocks": param_blocks})
    assert cov.blocks == ref.blocks and cov.step == 3 and cov.noise == pytest.approx(1 / 2e-3)
    assert cov.label_weights["c_energy"] == 999.9
    for a, b in zip(cov.P, ref.P):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(cov.P[0].diagonal().min()) < 1.0  # the filter moved P away from P(0) = I
    cov.check_weights(model)
    with pytest.raises(CovarianceMismatchError, match="other weights"):
        cov.check_weights(tiny_bpnn(seed=5))


def test_checkpoints_without_an_ekf_state_are_refused(tmp_path):
    model = tiny_bpnn()
    adam = torch.optim.Adam(model.parameters())
    ck = tmp_path / "adam.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_states": [adam.state_dict()], "hyper_parameters": {}}, ck)
    with pytest.raises(CovarianceError, match="not trained with the EKF"):
        covariance_from_checkpoint(ck, model)
    torch.save({"state_dict": {}}, tmp_path / "weights_only.ckpt")
    with pytest.raises(CovarianceError, match="no optimizer state"):
        covariance_from_checkpoint(tmp_path / "weights_only.ckpt", model)
    opt = EKF(model.parameters(), lr=1e-3)
    other = tiny_bpnn(hidden=(6, 4))
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_states": [opt.state_dict()], "hyper_parameters": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CovarianceMismatchError):
        covariance_from_checkpoint(tmp_path / "other.ckpt", other)
    assert read_checkpoint(tmp_path / "other.ckpt")["hyper_parameters"] == {}
