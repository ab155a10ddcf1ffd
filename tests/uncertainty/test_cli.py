"""`ekf-plugin covariance` and `ekf-plugin select` on a small generated set (in-process, seconds)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from ase.io import read, write

from ekf_plugin.cli import main
from ekf_plugin.models import save_model
from ekf_plugin.uncertainty import PredictiveUncertainty, default_path, load_covariance, save_covariance
from tests.bpnn._systems import water_cluster
from tests.uncertainty._models import random_covariance, tiny_bpnn


def _frames(n=8):
    frames = []
    for i in range(n):
        a = water_cluster(2, seed=i)
        a.rattle(0.02 + 0.03 * i, seed=i)  # later frames further from equilibrium
        frames.append(a)
    return frames


def test_select_writes_the_k_most_uncertain_frames_and_a_ranked_table(tmp_path, capsys):
    model = tiny_bpnn()
    path = save_model(model, tmp_path / "model.pt")
    save_covariance(random_covariance(model, seed=2), default_path(path))
    data = tmp_path / "pool.extxyz"
    write(str(data), _frames(), format="extxyz")
    out = tmp_path / "sel.extxyz"
    assert main(["select", str(path), "--data", str(data), "-n", "3", "-o", str(out)]) == 0
    assert "wrote 3 of 8 structures" in capsys.readouterr().out
    table = list(csv.DictReader(open(tmp_path / "sel.csv")))
    assert [int(r["rank"]) for r in table] == list(range(1, 9))
    sig = [float(r["sigma_E_per_atom_meV"]) for r in table]
    assert sig == sorted(sig, reverse=True) and sig[0] > sig[-1] > 0
    assert [int(r["selected"]) for r in table] == [1, 1, 1, 0, 0, 0, 0, 0]
    chosen = read(str(out), index=":")
    assert [a.info["ekf_frame"] for a in chosen] == [int(r["frame"]) for r in table[:3]]
    # the table's σ is the library's
    unc = PredictiveUncertainty(tiny_bpnn(), load_covariance(default_path(path)))
    frames = _frames()
    best = int(table[0]["frame"])
    assert float(table[0]["sigma_E_eV"]) == pytest.approx(unc.atoms(frames[best]).energy_std, rel=1e-9)
    np.testing.assert_allclose(chosen[0].positions, frames[best].positions, atol=1e-6)
    # forces score
    assert main(["select", str(path), "--data", str(data), "-n", "2", "-o", str(tmp_path / "f.extxyz"),
                 "--score", "forces"]) == 0
    ft = list(csv.DictReader(open(tmp_path / "f.csv")))
    fs = [float(r["sigma_F_max_eV_per_A"]) for r in ft]
    assert fs == sorted(fs, reverse=True) and np.isfinite(fs).all()


def test_select_errors_are_one_line(tmp_path, capsys):
    model = tiny_bpnn()
    path = save_model(model, tmp_path / "model.pt")
    data = tmp_path / "pool.extxyz"
    write(str(data), _frames(2), format="extxyz")
    assert main(["select", str(path), "--data", str(data), "-n", "1"]) == 1
    assert "no covariance file" in capsys.readouterr().out
    save_covariance(random_covariance(tiny_bpnn(seed=7)), default_path(path))
    assert main(["select", str(path), "--data", str(data), "-n", "1"]) == 1
    assert "other weights" in capsys.readouterr().out


def test_covariance_command_writes_the_file_from_a_checkpoint(tmp_path, capsys):
    from ekf_plugin import EKF
    from tests.uncertainty.test_covariance import _fake_lightning_checkpoint, _train_a_little

    model = tiny_bpnn()
    path = save_model(model, tmp_path / "model.pt")
    opt = EKF(model.parameters(), lr=1e-3)
    ckpt = _fake_lightning_checkpoint(tmp_path / "a.ckpt", model, opt, tmp_path / "pwned")
    assert main(["covariance", str(ckpt), "--model", str(path)]) == 0
    assert "n = " in capsys.readouterr().out and default_path(path).exists()
    # the checkpoint trained on: its weights differ from model.pt's; refused, or written with --save-model
    _train_a_little(model, opt)
    ckpt = _fake_lightning_checkpoint(tmp_path / "b.ckpt", model, opt, tmp_path / "pwned")
    assert main(["covariance", str(ckpt), "--model", str(path), "-o", str(tmp_path / "x.cov.pt")]) == 1
    assert "other weights" in capsys.readouterr().out
    assert main(["covariance", str(ckpt), "--model", str(path), "--save-model", str(tmp_path / "new.pt"),
                 "--dtype", "float32"]) == 0
    cov = load_covariance(tmp_path / "new.pt.cov.pt")
    assert cov.meta["stored_dtype"] == "float32" and cov.step == 3
    from ekf_plugin.models import load_model

    PredictiveUncertainty(load_model(tmp_path / "new.pt", dtype=torch.float64), cov)  # weights match
    assert not (tmp_path / "pwned").exists()
