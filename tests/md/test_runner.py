"""ekf_plugin.md.runner's restart helpers on hand-made i-PI files (the end-to-end resume is in test_ipi.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ekf_plugin.md.runner import checkpoint_step, drop_replayed_steps, read_properties, resume_checkpoint

HEADER = ("# column   1     --> time{picosecond} : The elapsed simulation time.\n"
          "# column   2     --> step : The current simulation time step.\n"
          "# column   3     --> density{g/cm3} : The mass density of the physical system.\n")


def _rows(steps, density):
    return "".join(f"{0.0005 * s:.8e} {s:.8e} {density + s:.8e}\n" for s in steps)


def test_replayed_steps_of_a_properties_file_keep_the_later_copy_and_the_order(tmp_path):
    out = tmp_path / "npt.out"
    # first run: 0..50, stopped; the restart from the checkpoint at 30 appends 40..100 (a header repeated too)
    out.write_text(HEADER + _rows(range(0, 60, 10), 1.0) + HEADER + _rows(range(40, 110, 10), 2.0))
    assert drop_replayed_steps(out) == 2  # steps 40 and 50 of the first run
    p = read_properties(out)
    assert p["step"].tolist() == list(range(0, 110, 10))
    np.testing.assert_allclose(p["density"], [1.0 + s for s in range(0, 40, 10)] + [2.0 + s for s in range(40, 110, 10)])
    assert out.read_text().count("# column   1") == 1
    assert drop_replayed_steps(out) == 0  # a clean file is left as it is


def test_replayed_frames_of_an_xyz_trajectory(tmp_path):
    def frame(step, x):
        return f"2\n# CELL(abcABC): 10 10 10 90 90 90  Step: {step:11d}  Bead: 0 positions{{angstrom}}\nO {x} 0 0\nH {x} 1 0\n"

    traj = tmp_path / "npt.pos_0.xyz"
    traj.write_text("".join(frame(s, 1) for s in (0, 20, 40)) + "".join(frame(s, 2) for s in (20, 40, 60)))
    assert drop_replayed_steps(traj) == 2
    text = traj.read_text()
    assert [int(w) for w in text.split("Step:")[1:] for w in [w.split()[0]]] == [0, 20, 40, 60]
    assert text.count("O 1 0 0") == 1 and text.count("O 2 0 0") == 3


def _checkpoint(path, step):
    path.write_text(f"<simulation>\n   <step>{step}</step>\n   <total_steps>100</total_steps>\n</simulation>\n")


def test_resume_checkpoint_takes_the_newest_before_the_end(tmp_path):
    assert resume_checkpoint(tmp_path, 100) is None  # nothing to resume
    _checkpoint(tmp_path / "npt.restart", 60)
    assert resume_checkpoint(tmp_path, 100) == tmp_path / "npt.restart"
    _checkpoint(tmp_path / "RESTART", 40)  # an older soft exit: the periodic checkpoint is newer
    assert resume_checkpoint(tmp_path, 100) == tmp_path / "npt.restart"
    _checkpoint(tmp_path / "RESTART", 75)  # SIGTERM after the last periodic checkpoint
    assert resume_checkpoint(tmp_path, 100) == tmp_path / "RESTART" and checkpoint_step(tmp_path / "RESTART") == 75
    _checkpoint(tmp_path / "RESTART", 100)  # the run ended: nothing to resume
    _checkpoint(tmp_path / "npt.restart", 100)
    assert resume_checkpoint(tmp_path, 100) is None
    (tmp_path / "RESTART").write_text("<simulation> truncated")  # a half-written file is not a checkpoint
    _checkpoint(tmp_path / "npt.restart", 80)
    assert resume_checkpoint(tmp_path, 100) == tmp_path / "npt.restart"
    with pytest.raises(ValueError, match="not a complete"):
        checkpoint_step(tmp_path / "RESTART")
    # one file per checkpoint (overwrite='False'): the newest complete one; one cut short after its <step> is skipped
    (tmp_path / "npt.restart").unlink()
    for k, step in enumerate((20, 40, 60), start=1):
        _checkpoint(tmp_path / f"npt.restart_{k}", step)
    assert resume_checkpoint(tmp_path, 100) == tmp_path / "npt.restart_3"
    full = (tmp_path / "npt.restart_3").read_text()
    (tmp_path / "npt.restart_4").write_text(full.replace("60", "80")[:-20])  # killed while i-PI wrote it
    assert resume_checkpoint(tmp_path, 100) == tmp_path / "npt.restart_3"
