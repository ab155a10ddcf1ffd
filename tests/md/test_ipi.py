"""End-to-end with a real i-PI 3.3.1 server on a unix socket with a unique temporary name:
NPT run, step-0 agreement with a direct evaluation (socket client, <ffdirect>, i-PI's python
driver), and the failure modes (server killed, client SIGTERMed, wrong atom count)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import units

import ekf_plugin.md.pes as pes_module
from ekf_plugin.evaluation import ModelEvaluator
from ekf_plugin.md.runner import FORCEFIELD_DIRECT, FORCEFIELD_SOCKET, IPIServer, npt_xml, read_properties, write_ipi_xyz

from ._toy import gentle_toy_model, water_box

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent

def to_ipi_bar(p_ev_per_a3):
    """eV/Å³ → bar with i-PI's own constant (3.398827377e-9 Ha/Bohr³, 3e-5 off ASE's CODATA bar)."""
    from ipi.utils.units import unit_to_user

    return unit_to_user("pressure", "bar", p_ev_per_a3 / units.Hartree * units.Bohr**3)
TRICLINIC = np.array([[9.4, 0.0, 0.0], [1.9, 9.1, 0.0], [-1.2, 1.4, 9.6]])  # Å, rows


def ipi_length_scale() -> float:
    """i-PI reads Å with its own constant (1 Å = 1.8897261 Bohr) and we convert back with ASE's
    Bohr: the structure the model sees is scaled by this factor (1 − 1.3e-8). The direct reference
    uses the same scale, else a stiff model shows ~0.03 bar differences on the virial diagonal."""
    from ipi.utils.units import unit_to_internal

    return unit_to_internal("length", "angstrom", 1.0) * units.Bohr


def direct(model, z, positions, cell):
    k = ipi_length_scale()
    return ModelEvaluator(model)(z, positions * k, cell * k)


def symbols(z):
    return ["O" if a == 8 else "H" for a in z]


class Setup:
    """A model file, an i-PI xyz start structure and a fresh socket name in ``tmp``."""

    def __init__(self, tmp: Path, cell=None, n_side: int = 3):
        self.tmp = tmp
        self.model = gentle_toy_model()
        self.model_path = tmp / "model.pt"
        torch.save(self.model, self.model_path)
        self.z, r, h = water_box(n_side, seed=1)
        self.cell_rows = h if cell is None else cell
        if cell is not None:  # same fractional coordinates in the triclinic cell
            r = np.linalg.solve(h.T, r.T).T @ cell
        self.positions = write_ipi_xyz(tmp / "init.xyz", symbols(self.z), r, self.cell_rows)
        from ekf_plugin.md.runner import standard_frame

        _, self.cell_ipi, _ = standard_frame(r, self.cell_rows)  # the cell i-PI builds (rows, Å)
        self.name = f"ekft_{uuid.uuid4().hex[:12]}"
        self.socket = "/tmp/ipi_" + self.name

    def socket_xml(self, steps, **kw):
        return npt_xml("init.xyz", FORCEFIELD_SOCKET.format(address=self.name, timeout=0), steps=steps, **kw)

    def client(self, template="init.xyz", extra=()):
        cmd = [str(BIN / "ekf-plugin"), "ipi", "--model", str(self.model_path), "--template", template,
               "--unix", self.name, "--threads", "1", *extra]
        return subprocess.Popen(cmd, cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def direct(self):
        return direct(self.model, self.z, self.positions, self.cell_ipi)


def wait_for_step(out: Path, step: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists():
            lines = [ln for ln in out.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            if lines and float(lines[-1].split()[0]) >= step:
                return
        time.sleep(0.1)
    raise TimeoutError(f"i-PI did not reach step {step}")


def check_step0(props, ref, volume):
    """i-PI's step-0 potential, virial and pressure against the direct evaluation (``volume`` Å³)."""
    volume = volume * ipi_length_scale() ** 3
    assert props["potential"][0] == pytest.approx(ref.energy, rel=1e-6, abs=1e-8)
    assert props["volume"][0] == pytest.approx(volume, rel=1e-6)
    w = to_ipi_bar(ref.virial / volume)  # bar
    expect = np.array([w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]])
    np.testing.assert_allclose(props["virial_md"][0], expect, rtol=1e-6, atol=1e-6 * np.abs(expect).max())
    kinetic = props["kinetic_md"][0]  # eV, from i-PI
    pressure = to_ipi_bar((np.trace(ref.virial) + 2 * kinetic) / (3 * volume))
    assert props["pressure_md"][0] == pytest.approx(pressure, rel=1e-6)


def test_npt_water_run(tmp_path):
    """i-PI finishes, client exits 0, the volume changes, the conserved quantity is conserved,
    step 0 equals a direct evaluation of the model; the client reports its progress while it runs."""
    s = Setup(tmp_path)
    steps = 200
    with IPIServer(tmp_path, s.socket_xml(steps, stride=10), socket_path=s.socket) as server:
        proc = s.client(extra=("--progress", "0.05", "--expected-calls", str(steps + 1)))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert server.wait(30) == 0
    assert "received EXIT" in err
    progress = [ln for ln in err.splitlines() if f" of {steps + 1} (" in ln]
    assert progress, err  # e.g. "ekf-plugin ipi: 57 force calls of 201 (28 %), 91.3 calls/s (11.0 ms per call, ..."
    counts = [int(ln.split("ekf-plugin ipi: ")[1].split()[0]) for ln in progress]
    assert counts == sorted(counts) and 1 < counts[0] and counts[-1] <= steps + 1
    assert all("calls/s" in ln and "model" in ln for ln in progress)
    assert any("h left" in ln for ln in progress)
    props = read_properties(tmp_path / "npt.out")
    assert props["step"][-1] == steps
    vol = props["volume"]
    assert abs(vol[-1] / vol[0] - 1) > 0.02, vol  # the barostat moves the box
    drift = np.abs(props["conserved"] - props["conserved"][0]).max()
    assert drift < 5e-3, drift  # eV over 100 fs for 81 atoms (measured ~1e-5)
    check_step0(props, s.direct(), abs(np.linalg.det(s.cell_ipi)))
    # the example's plotting script turns this output into a PNG
    script = Path(__file__).resolve().parents[2] / "examples" / "ipi_npt_water" / "plot_density.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "npt.out"), "--out", str(tmp_path / "d.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unthreaded_simulation_runs_the_same_trajectory(tmp_path):
    """npt_xml turns i-PI's per-step worker threads off (threading='False'); the same seed then gives the same
    NPT trajectory as i-PI's threaded default, to the digits i-PI writes."""
    results = {}
    for threading in (True, False):
        work = tmp_path / str(threading)
        work.mkdir()
        s = Setup(work)
        xml = s.socket_xml(20, stride=2, threading=threading)
        assert f"threading='{threading}'" in xml
        with IPIServer(work, xml, socket_path=s.socket) as server:
            proc = s.client()
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert server.wait(30) == 0
        results[threading] = read_properties(work / "npt.out")
    assert results[True]["step"][-1] == results[False]["step"][-1] == 20
    for key in ("conserved", "potential", "volume", "temperature"):
        np.testing.assert_allclose(results[False][key], results[True][key], rtol=1e-12, atol=0)
    assert np.ptp(results[False]["volume"]) > 0  # the barostat acted


def test_example_start_structure(tmp_path, shared_data):
    """make_init.py writes an i-PI xyz with 192 atoms and a CELL line from the revPBE0-D3 set."""
    shared_data("revpbe0-d3-cheng2019", "dataset_1400_au.extxyz")
    script = Path(__file__).resolve().parents[2] / "examples" / "ipi_npt_water" / "make_init.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "init.xyz")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "init.xyz").read_text().splitlines()
    assert lines[0] == "192" and lines[1].startswith("# CELL(abcABC):") and len(lines) == 194
    a, b, c = map(float, lines[1].split()[2:5])
    density = 64 * 18.015 / (units.mol * 1e-24) / (a * b * c)
    assert abs(density - 1.0) < 0.03
    assert [ln.split()[0] for ln in lines[2:5]] == ["O", "H", "H"]


@pytest.mark.parametrize("route", ["client", "ffdirect", "py_driver"])
def test_triclinic_step0_matches_direct_evaluation(tmp_path, route):
    """A triclinic cell catches a transposed cell and wrong virial components (a cube cannot)."""
    s = Setup(tmp_path, cell=TRICLINIC, n_side=3)
    if route == "ffdirect":
        ff = FORCEFIELD_DIRECT.format(pes_path=pes_module.__file__, template="init.xyz",
                                      model=s.model_path, extra=", threads: 1")
        xml = npt_xml("init.xyz", ff, steps=2, stride=1)
        server = IPIServer(tmp_path, xml).start()
        assert server.wait(120) == 0, server.log.read_text()[-3000:]
    else:
        server = IPIServer(tmp_path, s.socket_xml(2, stride=1), socket_path=s.socket).start()
        try:
            if route == "client":
                proc = s.client()
            else:
                cmd = [str(BIN / "i-pi-py_driver"), "-u", "-a", s.name, "-m", "custom", "-P", pes_module.__file__,
                       "-o", f"template=init.xyz,model={s.model_path},threads=1"]
                proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert server.wait(30) == 0
        finally:
            server.stop()
    check_step0(read_properties(tmp_path / "npt.out"), s.direct(), abs(np.linalg.det(s.cell_ipi)))


def test_server_killed_client_exits_nonzero_without_spinning(tmp_path):
    s = Setup(tmp_path)
    server = IPIServer(tmp_path, s.socket_xml(100000, stride=10), socket_path=s.socket).start()
    try:
        proc = s.client()
        wait_for_step(tmp_path / "npt.out", 20)
        server.proc.kill()  # SIGKILL: no EXIT, the socket file stays behind
        t0 = time.monotonic()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read()
    finally:
        server.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert elapsed < 5
    assert "connection to i-PI lost" in err and "no EXIT received" in err
    # never spins: user CPU is the start-up (imports, model) plus the steps, not a busy loop
    assert usage.ru_utime < 60


def test_sigterm_mid_run_then_second_client_finishes(tmp_path):
    s = Setup(tmp_path)
    steps = 100
    # 0.1 fs steps: the toy model's near-ideal gas stays close to its start whenever the second client joins. With
    # 0.5 fs and a loaded machine the first client could run ~20 steps past the SIGTERM, and the second client then
    # rightly refused its first structure (its geometry check: two H atoms 0.47 Å apart, 2 of 15 runs)
    with IPIServer(tmp_path, s.socket_xml(steps, stride=10, timestep_fs=0.1), socket_path=s.socket) as server:
        first = s.client()
        wait_for_step(tmp_path / "npt.out", 20)
        first.send_signal(signal.SIGTERM)
        _, err1 = first.communicate(timeout=30)
        second = s.client()
        _, err2 = second.communicate(timeout=120)
        # i-PI waits for a client as long as the run is unfinished: a second client that refused its first structure
        # (as above at 0.5 fs) left it waiting, seen as a slow exit; the message says which
        try:
            code = server.wait(90)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, (second.returncode, err1[-2000:], err2[-3000:], (tmp_path / "ipi.log").read_text()[-1500:])
    assert first.returncode == 128 + signal.SIGTERM, err1
    assert "terminated by SIGTERM" in err1 and "closed the connection cleanly" in err1
    assert second.returncode == 0, err2
    props = read_properties(tmp_path / "npt.out")
    assert props["step"][-1] == steps
    assert np.all(np.diff(props["step"]) > 0)


def test_wrong_atom_count_is_a_clear_error(tmp_path):
    s = Setup(tmp_path)
    other = tmp_path / "other.xyz"
    write_ipi_xyz(other, symbols(s.z[:-3]), s.positions[:-3], s.cell_ipi)
    with IPIServer(tmp_path, s.socket_xml(10), socket_path=s.socket):
        proc = s.client(template=str(other))
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    assert "i-PI sent 81 atoms but the template has 78" in err


def test_trained_n2p2_water_potential_step0_and_short_npt(tmp_path, shared_data):
    """The real RPBE-D3 n2p2 water potential on a revPBE0-D3 liquid frame (192 atoms):
    client exits 0 and i-PI's step-0 potential, virial and pressure equal the direct evaluation."""
    potential = shared_data("n2p2-h2o-potentials", "H2O_RPBE-D3")
    frames = shared_data("revpbe0-d3-cheng2019", "dataset_1400_au.extxyz")
    from ase.io import read

    from ekf_plugin.models import load_model

    atoms = read(frames, index=126)  # the example's start: lowest energy near 1 g/cm³ (frame 0 is a hot snapshot)
    z = atoms.numbers
    positions = write_ipi_xyz(tmp_path / "init.xyz", atoms.get_chemical_symbols(),
                              atoms.positions * units.Bohr, atoms.cell.array * units.Bohr)
    from ekf_plugin.md.runner import standard_frame

    _, cell, _ = standard_frame(atoms.positions * units.Bohr, atoms.cell.array * units.Bohr)
    name = f"ekft_{uuid.uuid4().hex[:12]}"
    steps = 4
    xml = npt_xml("init.xyz", FORCEFIELD_SOCKET.format(address=name, timeout=0), steps=steps, stride=1)
    with IPIServer(tmp_path, xml, socket_path="/tmp/ipi_" + name) as server:
        cmd = [str(BIN / "ekf-plugin"), "ipi", "--model", str(potential), "--template", "init.xyz",
               "--unix", name, "--threads", "1"]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert server.wait(30) == 0
    props = read_properties(tmp_path / "npt.out")
    assert props["step"][-1] == steps
    ref = direct(load_model(potential), z, positions, cell)
    check_step0(props, ref, abs(np.linalg.det(cell)))
    assert np.ptp(props["volume"]) > 0  # the barostat acts
    drift = np.abs(props["conserved"] - props["conserved"][0]).max()
    assert drift < 0.05, drift  # eV over 2 fs, 192 atoms (measured 12 meV, thermostat + barostat on)


def test_path_integral_batched_requests_equal_unbatched(tmp_path):
    """Path-integral NPT (4 beads) with a trained BPNN through ``ekf-plugin ipi``: i-PI's batched requests
    (``<batch_size>4``) give the same potentials, virials and per-bead forces as one structure per request."""
    from ekf_plugin.md.runner import FORCEFIELD_SOCKET_BATCHED

    model = Path(__file__).resolve().parents[2] / "examples" / "water_revpbe0" / "models" / "ekf_lr1e-3_s0.pt"
    nbeads, steps = 4, 3
    runs = {}
    for batch in (1, nbeads):  # both runs at once: same seed, same start
        d = tmp_path / f"batch{batch}"
        d.mkdir()
        s = Setup(d)
        ff = FORCEFIELD_SOCKET_BATCHED.format(address=s.name, timeout=0, batch_size=batch)
        xml = npt_xml("init.xyz", ff, steps=steps, stride=1, nbeads=nbeads, thermostat="pile_g")
        xml = xml.replace("    <checkpoint", "    <trajectory filename='for' stride='1' format='xyz'> forces </trajectory>\n"
                          "    <checkpoint")
        server = IPIServer(d, xml, socket_path=s.socket).start()
        s.model_path = model
        runs[batch] = (d, server, s.client())
    try:
        for batch, (d, server, proc) in runs.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert server.wait(30) == 0
            assert ("batches of 4 structures" in err) == (batch > 1), err
    finally:
        for _, server, proc in runs.values():
            server.stop()
            if proc.poll() is None:
                proc.kill()
    (d1, *_), (dn, *_) = runs[1], runs[nbeads]
    p1, pn = read_properties(d1 / "npt.out"), read_properties(dn / "npt.out")
    assert list(pn["step"]) == list(range(steps + 1))
    np.testing.assert_allclose(pn["potential"], p1["potential"], rtol=1e-9)
    np.testing.assert_allclose(pn["virial_md"], p1["virial_md"], rtol=1e-8, atol=1e-8 * np.abs(p1["virial_md"]).max())
    for k in range(nbeads):  # every bead's forces at every step: no bead swapped or mixed up
        f1 = _xyz_values(d1 / f"npt.for_{k}.xyz")
        fn = _xyz_values(dn / f"npt.for_{k}.xyz")
        assert f1.shape == (steps + 1, 81, 3)
        np.testing.assert_allclose(fn, f1, rtol=1e-8, atol=1e-10 * np.abs(f1).max())
    assert np.abs(_xyz_values(dn / "npt.for_0.xyz")[-1] - _xyz_values(dn / "npt.for_1.xyz")[-1]).max() > 0


def _xyz_values(path: Path) -> np.ndarray:
    """(frames, N, 3) columns 2–4 of an i-PI xyz trajectory."""
    lines = path.read_text().splitlines()
    frames, i = [], 0
    while i < len(lines):
        n = int(lines[i])
        frames.append([[float(x) for x in ln.split()[1:4]] for ln in lines[i + 2:i + 2 + n]])
        i += n + 2
    return np.array(frames)


def test_run_sh_killed_mid_run_resumes_and_continues_the_same_trajectory(tmp_path):
    """The example's ``run.sh``, killed hard (i-PI and client, as when a machine goes down), given again: it resumes
    from i-PI's last checkpoint, and the merged outputs equal an uninterrupted run's, each step once."""
    script = Path(__file__).resolve().parents[2] / "examples" / "ipi_npt_water" / "run.sh"
    s = Setup(tmp_path)
    steps = 120
    xml = tmp_path / "input.xml"  # the example's protocol on the toy box, checkpoints every 10 steps
    xml.write_text(npt_xml("init.xyz", FORCEFIELD_SOCKET.format(address="ekf_npt_water", timeout=0), steps=steps,
                           stride=5, traj_stride=5, checkpoint_stride=10))

    def command(run_dir):
        run_dir.mkdir(exist_ok=True)
        (run_dir / "init.xyz").write_bytes((tmp_path / "init.xyz").read_bytes())
        env = {**os.environ, "RUN_DIR": str(run_dir), "SOCKET_NAME": f"{s.name}_{run_dir.name}", "INPUT": str(xml),
               "PYTHON": sys.executable}
        return ["bash", str(script), str(s.model_path), str(steps)], env

    cmd, env = command(tmp_path / "whole")
    whole = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    cmd, env = command(tmp_path / "stopped")
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    wait_for_step(tmp_path / "stopped" / "npt.out", 25, timeout=120)
    os.killpg(first.pid, signal.SIGKILL)  # no clean exit: i-PI's last periodic checkpoint is all that is left
    first.communicate(timeout=30)
    stopped_at = read_properties(tmp_path / "stopped" / "npt.out")["step"][-1]
    assert 25 <= stopped_at < steps
    # i-PI wrote one file per checkpoint; the newest is cut short here, as a kill while i-PI writes it leaves it
    checkpoints = sorted((tmp_path / "stopped").glob("npt.restart_*"), key=lambda p: int(p.name.split("_")[-1]))
    assert len(checkpoints) >= 2
    text = checkpoints[-1].read_text()
    checkpoints[-1].write_text(text[:len(text) // 2])
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming from {tmp_path / 'stopped' / checkpoints[-2].name}" in again.stdout, again.stdout
    assert f"of {steps}" in again.stdout and not list((tmp_path / "stopped").glob("npt.restart_*"))
    ref, got = (read_properties(tmp_path / d / "npt.out") for d in ("whole", "stopped"))
    assert got["step"].tolist() == ref["step"].tolist() == list(range(0, steps + 1, 5))
    for key in ("conserved", "temperature", "potential", "volume", "density"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-7, err_msg=key)  # i-PI prints 9 digits
    assert _xyz_steps(tmp_path / "stopped" / "npt.pos_0.xyz") == list(range(0, steps + 1, 5))
    np.testing.assert_allclose(_xyz_values(tmp_path / "stopped" / "npt.pos_0.xyz"),
                               _xyz_values(tmp_path / "whole" / "npt.pos_0.xyz"), rtol=0, atol=1.1e-5)  # 5 decimals
    # the same command once more: the run is complete, nothing is run again or lost
    before = (tmp_path / "stopped" / "npt.out").read_text()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "already done" in done.stdout, done.stdout + done.stderr
    assert (tmp_path / "stopped" / "npt.out").read_text() == before
    # a different model or length in the same folder starts over instead of continuing a foreign trajectory
    cmd[-1] = str(steps // 3)
    fresh = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0 and "resuming" not in fresh.stdout, fresh.stdout + fresh.stderr
    assert read_properties(tmp_path / "stopped" / "npt.out")["step"].tolist() == list(range(0, steps // 3 + 1, 5))
    # a retrained model saved at the same path (a queue's models/<run>.pt) is another run, not "already done"
    before = read_properties(tmp_path / "stopped" / "npt.out")
    with torch.no_grad():
        next(s.model.parameters()).mul_(1.01)
    torch.save(s.model, s.model_path)
    new = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert new.returncode == 0 and "starting over" in new.stdout and "already done" not in new.stdout, new.stdout
    after = read_properties(tmp_path / "stopped" / "npt.out")
    assert after["step"].tolist() == before["step"].tolist()
    assert after["potential"][0] != before["potential"][0]  # the new model's energies


def _xyz_steps(path: Path) -> list:
    return [int(line.split("Step:")[1].split()[0]) for line in path.read_text().splitlines() if "Step:" in line]
