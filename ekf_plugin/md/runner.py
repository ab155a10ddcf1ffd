"""Helpers to run i-PI from Python: input files, a supervised i-PI process, its output.

Used by the example, the tests and the benchmark; nothing here imports torch or i-PI.
Units: the xyz writer takes Å; i-PI's properties are read as written (units given in the XML).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def ipi_executable() -> str:
    """The ``i-pi`` script next to this Python (the venv), else on ``PATH``."""
    here = Path(sys.executable).with_name("i-pi")
    found = str(here) if here.exists() else shutil.which("i-pi")
    if not found:
        raise FileNotFoundError("cannot find the i-pi executable (pip install ipi)")
    return found


def standard_frame(positions: np.ndarray, cell: np.ndarray):
    """Rotate ``positions`` (N, 3) Å and ``cell`` (3, 3) Å rows into i-PI's frame (a ∥ x, b in the
    xy-plane: the cell that i-PI builds from a, b, c, α, β, γ). Returns ``(positions, cell, cellpar)``."""
    from ase.geometry import cell_to_cellpar, cellpar_to_cell

    par = cell_to_cellpar(cell)
    std = cellpar_to_cell(par)  # (3, 3) rows: a along x, b in xy
    frac = np.linalg.solve(cell.T, positions.T).T  # (N, 3), unwrapped stays unwrapped
    return frac @ std, std, par


def write_ipi_xyz(path: PathLike, symbols: Sequence[str], positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Write an i-PI xyz file (``# CELL(abcABC): ... cell{angstrom} positions{angstrom}``).

    ``positions`` (N, 3) Å and ``cell`` (3, 3) Å (rows) are rotated into i-PI's frame first;
    returns the rotated positions (N, 3) Å, so callers can evaluate the same structure directly.
    """
    pos, _, par = standard_frame(np.asarray(positions, float), np.asarray(cell, float))
    lines = [str(len(symbols)),
             "# CELL(abcABC): " + " ".join(f"{x:.10f}" for x in par) + " cell{angstrom} positions{angstrom}"]
    lines += [f"{s:2s} {x:.10f} {y:.10f} {z:.10f}" for s, (x, y, z) in zip(symbols, pos)]
    Path(path).write_text("\n".join(lines) + "\n")
    return pos


FORCEFIELD_SOCKET = """  <ffsocket name='nnp' mode='unix' pbc='false'>
    <address>{address}</address> <latency>1e-4</latency> <timeout>{timeout}</timeout>
  </ffsocket>"""

FORCEFIELD_SOCKET_BATCHED = """  <ffsocket name='nnp' mode='unix' pbc='false'>
    <address>{address}</address> <latency>1e-4</latency> <timeout>{timeout}</timeout>
    <consolidate_messages>true</consolidate_messages> <batch_size>{batch_size}</batch_size>
  </ffsocket>"""
"""The socket force field with i-PI's batched requests: ``batch_size`` structures per request (e.g. the
beads of a path integral), announced to the client in the INIT string; 1 is the ordinary protocol."""

FORCEFIELD_DIRECT = """  <ffdirect name='nnp' pbc='false'>
    <pes>custom</pes> <pes_path>{pes_path}</pes_path>
    <parameters>{{template: {template}, model: {model}{extra}}}</parameters>
  </ffdirect>"""


def npt_xml(
    init: str,
    forcefield: str,
    steps: int = 200,
    temperature: float = 320.0,
    pressure_bar: float = 1.0,
    timestep_fs: float = 0.5,
    seed: int = 31415,
    stride: int = 10,
    traj_stride: int = 0,
    prefix: str = "npt",
    thermostat_tau_fs: float = 50.0,
    barostat_tau_fs: float = 100.0,
    velocities_k: Optional[float] = None,
    barostat: bool = True,
    nbeads: int = 1,
    thermostat: str = "svr",
    threading: bool = False,
) -> str:
    """i-PI input for NPT MD (SVR thermostat, isotropic Bussi–Zykova–Parrinello barostat).

    ``forcefield`` is the ``<ffsocket>``/``<ffdirect>`` block named ``nnp`` (see
    :data:`FORCEFIELD_SOCKET`, :data:`FORCEFIELD_DIRECT`). Properties go to ``<prefix>.out``:
    step, time/ps, conserved/eV, temperature/K, potential/eV, kinetic_md/eV, pressure_md/bar,
    volume/Å³, density/(g/cm³), virial_md/bar (6). ``barostat=False`` gives NVT (same thermostat).
    ``nbeads`` > 1 gives path-integral MD (use ``thermostat='pile_g'``, the usual ring-polymer thermostat).
    ``threading``: i-PI's ``<simulation threading>``, which runs each step and each output write of its one system
    in a worker thread (i-PI's default, for several systems at once); off here, which saves those thread hand-offs
    (0.57 ms of a 33–36 ms step measured, docs/md.md). The beads' force requests are parallel either way.
    """
    traj = (f"    <trajectory filename='pos' stride='{traj_stride}' format='xyz' cell_units='angstrom'>"
            " positions{angstrom} </trajectory>\n") if traj_stride else ""
    vel = temperature if velocities_k is None else velocities_k
    baro = f"""
        <barostat mode='isotropic'>
          <tau units='femtosecond'> {barostat_tau_fs} </tau>
          <thermostat mode='langevin'> <tau units='femtosecond'> {barostat_tau_fs} </tau> </thermostat>
        </barostat>""" if barostat else ""
    return f"""<simulation verbosity='low' safe_stride='{max(stride, 10)}' threading='{threading}'>
  <output prefix='{prefix}'>
    <properties stride='{stride}' filename='out'> [ step, time{{picosecond}}, conserved{{electronvolt}},
      temperature{{kelvin}}, potential{{electronvolt}}, kinetic_md{{electronvolt}}, pressure_md{{bar}},
      volume{{angstrom3}}, density{{g/cm3}}, virial_md{{bar}} ] </properties>
{traj}    <checkpoint stride='{max(stride, 100)}'/>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>
{forcefield}
  <system>
    <initialize nbeads='{nbeads}'>
      <file mode='xyz'> {init} </file>
      <velocities mode='thermal' units='kelvin'> {vel} </velocities>
    </initialize>
    <forces> <force forcefield='nnp'/> </forces>
    <ensemble> <temperature units='kelvin'> {temperature} </temperature> <pressure units='bar'> {pressure_bar} </pressure> </ensemble>
    <motion mode='dynamics'>
      <dynamics mode='{"npt" if barostat else "nvt"}'>
        <timestep units='femtosecond'> {timestep_fs} </timestep>
        <thermostat mode='{thermostat}'> <tau units='femtosecond'> {thermostat_tau_fs} </tau> </thermostat>{baro}
      </dynamics>
    </motion>
  </system>
</simulation>
"""


def read_properties(path: PathLike) -> Dict[str, np.ndarray]:
    """Columns of an i-PI properties file by name (``virial_md`` → an (n, 6) array)."""
    names, cols = [], []
    for line in Path(path).read_text().splitlines():
        m = re.match(r"#\s*(column|cols\.)\s+(\d+)(?:-(\d+))?\s+-->\s+(\w+)", line)
        if m:
            lo = int(m.group(2)) - 1
            hi = int(m.group(3) or m.group(2))
            names.append(m.group(4))
            cols.append((lo, hi))
    data = np.loadtxt(path, ndmin=2)
    return {n: (data[:, lo] if hi - lo == 1 else data[:, lo:hi]) for n, (lo, hi) in zip(names, cols)}


class IPIServer:
    """An i-PI process run in ``workdir`` on ``input.xml``, for use as a context manager.

    ``socket_path`` (if given) is removed before start (a stale file blocks i-PI's bind) and
    waited for; on exit the process is stopped with SIGTERM (restartable), then SIGKILL.
    """

    def __init__(self, workdir: PathLike, xml: str, socket_path: Optional[str] = None, log: str = "ipi.log") -> None:
        self.workdir = Path(workdir)
        self.xml = xml
        self.socket_path = socket_path
        self.log = self.workdir / log
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> "IPIServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "input.xml").write_text(self.xml)
        if self.socket_path and os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([ipi_executable(), "input.xml"], cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT)
        if self.socket_path:
            self.wait_for_socket(timeout)
        return self

    def wait_for_socket(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"i-PI exited with {self.proc.returncode} before creating its socket:\n"
                                   + self.log.read_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"i-PI did not create {self.socket_path} within {timeout} s")
            time.sleep(0.05)

    def wait(self, timeout: Optional[float] = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (i-PI writes a restartable RESTART), SIGKILL after ``timeout`` s; then remove
        the socket file if i-PI left it behind (a stale file blocks the next bind)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.socket_path and os.path.exists(self.socket_path):
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass

    def __enter__(self) -> "IPIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
