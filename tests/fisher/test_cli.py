"""``ekf-plugin fisher``: two models, the same labels, one overlay plot and one table row per model."""

from __future__ import annotations

import csv
import json

import ase.io
import numpy as np
import pytest
import torch

from ekf_plugin.fisher import FisherSpectrum, fisher_spectrum, sample_labels
from tests.fisher._tiny import cu_frames, structures, tiny_model
from tests.helpers import run_cli


@pytest.fixture
def two_models(tmp_path):
    frames = cu_frames(12, seed=1)
    ase.io.write(tmp_path / "cu.extxyz", frames)
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"m{seed}.pt"
        torch.save(tiny_model(seed=seed, dtype=torch.float32), path)  # pickled model, like spktrain's best_model
        paths.append(path)
    return tmp_path, frames, paths


@pytest.mark.slow
def test_compare_two_models_writes_overlay_and_table(two_models):
    root, frames, paths = two_models
    out = root / "cmp"
    res = run_cli(["ekf-plugin", "fisher", *map(str, paths), "--data", str(root / "cu.extxyz"),
                   "--labels", "16", "--seed", "3", "--out", str(out), "--names", "first,second"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "first" in res.stdout and "second" in res.stdout and "log10_median" in res.stdout
    for name in ("fisher_overlay.png", "fisher_overlay_energy.png", "fisher_overlay_forces.png"):
        assert (out / name).stat().st_size > 1000
    with open(out / "fisher_table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == ["first", "second"]
    assert json.loads((out / "fisher_table.json").read_text())[1]["model"] == "second"
    # the command's numbers are those of the library on the same labels
    labels = sample_labels(len(frames), lambda s: len(frames[s]), 16, "both", seed=3)
    for row, path in zip(rows, paths):
        spec = fisher_spectrum(torch.load(path, weights_only=False), structures(frames, torch.float32), labels)
        saved = FisherSpectrum.load(out / f"{row['model']}.npz")
        floor = spec.rel_tol("all") * spec.eigenvalues["all"].max()  # float32 model: smaller ones are noise
        np.testing.assert_allclose(saved.eigenvalues["all"], spec.eigenvalues["all"], rtol=1e-4, atol=floor)
        assert saved.summary()["rank"] == spec.summary()["rank"]
        assert float(row["log10_median"]) == pytest.approx(spec.summary()["log10_median"], abs=1e-3)
        assert int(row["n_labels"]) == 16 and int(row["n_weights"]) == spec.n_weights


def test_bad_label_count_is_refused(two_models):
    root, _, paths = two_models
    res = run_cli(["ekf-plugin", "fisher", str(paths[0]), "--data", str(root / "cu.extxyz"), "--labels", "0"])
    assert res.returncode != 0 and "--labels must be >= 1" in res.stderr


def test_threads_below_one_are_refused(two_models):
    root, _, paths = two_models
    res = run_cli(["ekf-plugin", "fisher", str(paths[0]), "--data", str(root / "cu.extxyz"), "--threads", "0"])
    assert res.returncode != 0 and "--threads" in res.stderr and "Traceback" not in res.stderr
