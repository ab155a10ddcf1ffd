"""Test helpers: location of the real data beside the checkout, fake installed plugins, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EKF_PLUGIN_SHARED_DATA", REPO.parent / "shared" / "data"))
VENV_BIN = Path(sys.executable).parent


def in_ci() -> bool:
    """Whether the tests run in CI (``CI=true``, as GitHub Actions, GitLab and most CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_shared_data(path: Path) -> None:
    """Skip the calling test because ``path`` is absent, or fail it in CI, where the data must be present."""
    if in_ci():
        pytest.fail(f"CI=true but the shared data {path} is missing (set EKF_PLUGIN_SHARED_DATA or provide "
                    "../shared/data beside the checkout)", pytrace=False)
    pytest.skip(f"needs the shared data set {path} (present beside the checkout in CI; not shipped)")


def shared_data_path(*parts: str) -> Path:
    """Path under ``../shared/data``; skips the calling test with a reason when it is absent (fails in CI)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        missing_shared_data(path)
    return path


def make_fake_distribution(root: Path, name: str, module_source: str, entry_points: Optional[Dict[str, str]] = None) -> Path:
    """Write an importable module plus a ``*.dist-info`` with ``ekf_plugin`` entry points into ``root``.

    This is what ``pip install`` leaves in site-packages, so putting ``root`` on ``sys.path``
    (or ``PYTHONPATH``) exercises the same discovery path third-party plugins use.
    """
    root.mkdir(parents=True, exist_ok=True)
    module = name.replace("-", "_")
    (root / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{module}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    eps = entry_points or {module: module}
    lines = ["[ekf_plugin]"] + [f"{k} = {v}" for k, v in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


def run_cli(args, env_extra: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None, timeout: int = 300):
    """Run a console script of this venv (``ekf-plugin``, ``spktrain``) and return the CompletedProcess."""
    env = dict(os.environ)
    env.update(env_extra or {})
    exe = str(VENV_BIN / args[0])
    return subprocess.run(
        [exe, *args[1:]], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


class _WritesMarker:
    """Pickles as ``builtins.exec(<write marker>)``: what a malicious model file does on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def write_malicious_models(folder: Path, marker: Path) -> Dict[str, Path]:
    """Model files that run code (write ``marker``) when unpickled with ``weights_only=False``:

    ``pickle`` (a bare object), ``own_format`` (disguised as ekf-plugin's export format) and
    ``best_model`` (a real SchNetPack model carrying the payload in an attribute, so the allow-list of
    SchNetPack classes is not enough to load it).
    """
    import torch

    from ekf_plugin.models.io import FORMAT
    from tests.md._toy import toy_model

    folder.mkdir(parents=True, exist_ok=True)
    evil = _WritesMarker(marker)
    files = {"pickle": folder / "evil.pt", "own_format": folder / "evil_export.pt", "best_model": folder / "best_model"}
    torch.save(evil, files["pickle"])
    torch.save({"format": FORMAT, "config": "{}", "state_dict": {"w": evil}}, files["own_format"])
    model = toy_model()
    model.payload = evil
    torch.save(model, files["best_model"])
    return files
