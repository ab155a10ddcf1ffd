"""No public load path runs code from a model file; broken model files give one clear line.

Each malicious file writes a marker file when unpickled with ``weights_only=False``; the control test
shows that it really does, so the refusals below are not vacuous.
"""

from __future__ import annotations

import pytest
import torch
from ase import Atoms

from ekf_plugin.models import ModelLoadError, UntrustedModelError, load_model, save_model
from tests.helpers import run_cli, write_malicious_models

KINDS = ("pickle", "own_format", "best_model")


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


@pytest.fixture
def evil(tmp_path, marker):
    return write_malicious_models(tmp_path / "evil", marker)


@pytest.fixture
def template(tmp_path):
    path = tmp_path / "init.xyz"
    Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=[8, 8, 8], pbc=True).write(path)
    return path


def test_control_a_full_unpickle_runs_the_payload(evil, marker):
    with pytest.raises(ModelLoadError):  # loads (and runs the payload), but is no model
        load_model(evil["pickle"], trust_pickle=True)
    assert marker.exists(), "the malicious test file must really execute code when fully unpickled"


@pytest.mark.parametrize("kind", KINDS)
def test_python_load_paths_refuse_malicious_files(evil, marker, kind):
    from ekf_plugin import calculator
    from ekf_plugin.evaluation import ModelEvaluator, load_any_model

    for load in (load_model, load_any_model, ModelEvaluator, calculator):
        with pytest.raises(UntrustedModelError, match=r"trust_pickle=True \(CLI: --trust-model\)"):
            load(evil[kind])
        assert not marker.exists(), f"{load.__name__} ran code from {kind}"


def test_real_schnetpack_and_bpnn_best_models_load_without_trust(tmp_path):
    """spktrain's best_model is ``torch.save(model)``: the scoped allow-list reads it with weights_only=True."""
    from ekf_plugin.models import water_bpnn
    from tests.md._toy import toy_model

    before = list(torch.serialization.get_safe_globals())
    for name, model in (("schnet", toy_model()), ("bpnn", water_bpnn(seed=0))):
        path = tmp_path / name
        torch.save(model, path)
        loaded = load_model(path)
        assert type(loaded) is type(model)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a.cpu(), b.cpu())
    assert torch.serialization.get_safe_globals() == before, "the allow-list is scoped, never added globally"


def test_broken_model_files_are_one_clear_error(tmp_path):
    from ekf_plugin.models import water_bpnn

    good = save_model(water_bpnn(seed=0), tmp_path / "good.pt")
    data = good.read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a model\n")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict.pt")
    expected = {"empty.pt": "is empty", "truncated.pt": "truncated or not a torch file",
                "text.pt": "not a readable torch file|truncated or not a torch file", "dict.pt": "neither an ekf-plugin"}
    for name, message in expected.items():
        with pytest.raises(ModelLoadError, match=message):
            load_model(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


def _one_clear_line(res, *needles):
    err = res.stderr.strip()
    assert res.returncode != 0
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("kind", ["own_format", "best_model"])
def test_ipi_command_refuses_malicious_model(tmp_path, evil, marker, template, kind):
    res = run_cli(["ekf-plugin", "ipi", "--model", str(evil[kind]), "--template", str(template), "--unix",
                   "ekft_never", "--connect-timeout", "0.1"], timeout=120)
    _one_clear_line(res, "--trust-model")
    assert res.returncode == 1
    assert not marker.exists()


def test_fisher_command_refuses_malicious_and_broken_models(tmp_path, evil, marker, template):
    (tmp_path / "empty").write_bytes(b"")
    for model, needle in ((evil["pickle"], "--trust-model"), (tmp_path / "empty", "is empty")):
        res = run_cli(["ekf-plugin", "fisher", str(model), "--data", str(template), "--out", str(tmp_path / "o")],
                      timeout=120)
        _one_clear_line(res, needle)
    assert not marker.exists()


def test_ipi_command_truncated_model_is_one_line(tmp_path, template):
    from ekf_plugin.models import water_bpnn

    data = save_model(water_bpnn(seed=0), tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:1000])
    res = run_cli(["ekf-plugin", "ipi", "--model", str(tmp_path / "cut.pt"), "--template", str(template),
                   "--unix", "ekft_never", "--connect-timeout", "0.1"], timeout=120)
    _one_clear_line(res, "cut.pt", "truncated or not a torch file")
    assert res.returncode == 1
