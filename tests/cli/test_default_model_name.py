"""The default names of models in the CLI's tables (``ekf-plugin errors`` and ``ekf-plugin fisher``)."""

from ekf_plugin.cli import default_model_name


def test_best_models_of_two_runs_get_their_run_names_files_their_stems_folders_their_names(tmp_path):
    paths = []
    for run in ("ekf_s0", "adam_s0"):
        (tmp_path / run).mkdir()
        for name in ("best_model", "best_model_fisher"):
            (tmp_path / run / name).write_bytes(b"x")
            paths.append(tmp_path / run / name)
    assert [default_model_name(p) for p in paths] == ["ekf_s0", "ekf_s0", "adam_s0", "adam_s0"]
    (tmp_path / "water_500k.pt").write_bytes(b"x")
    assert default_model_name(tmp_path / "water_500k.pt") == "water_500k"
    (tmp_path / "RPBE-D3.n2p2").mkdir()
    assert default_model_name(tmp_path / "RPBE-D3.n2p2") == "RPBE-D3.n2p2", "a folder keeps its whole name"
