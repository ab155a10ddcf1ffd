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
    checkpoint_stride: Optional[int] = None,
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
    ``checkpoint_stride``: steps between i-PI's checkpoints (default max(stride, 100)), each a new file
    ``<prefix>.restart_<k>`` (i-PI truncates an overwritten checkpoint before it writes it, so a kill in that window
    would leave none); a killed run resumes from the newest complete one (:func:`resume_checkpoint`).
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
{traj}    <checkpoint stride='{checkpoint_stride or max(stride, 100)}' overwrite='False'/>
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


def checkpoint_step(path: PathLike) -> int:
    """The step an i-PI checkpoint (``RESTART``, ``<prefix>.restart[_k]``) was written at (its ``<step>``); a file
    that is not a complete checkpoint (e.g. cut short by a kill while i-PI wrote it) raises ValueError."""
    text = Path(path).read_text()
    m = re.search(r"<step>\s*(\d+)\s*</step>", text)
    if not m or not text.rstrip().endswith("</simulation>"):
        raise ValueError(f"{path} is not a complete i-PI checkpoint (no <step> or no closing </simulation>)")
    return int(m.group(1))


def resume_checkpoint(run_dir: PathLike, total_steps: int, prefix: str = "npt") -> Optional[Path]:
    """The checkpoint a stopped i-PI run in ``run_dir`` continues from, or None when there is nothing to resume.

    Candidates: ``RESTART`` (written when i-PI exits cleanly: SIGTERM, a dropped client, the end), and the periodic
    ``<prefix>.restart`` / ``<prefix>.restart_<k>`` (``overwrite='False'``, as :func:`npt_xml` and the examples
    write them). The complete one with the highest ``<step>`` below ``total_steps`` is taken; files cut short are
    skipped, so a kill while i-PI writes a checkpoint falls back to the one before.
    """
    run_dir = Path(run_dir)
    best: Optional[Path] = None
    step = -1
    for path in [run_dir / "RESTART", *sorted(run_dir.glob(f"{prefix}.restart*"))]:
        try:
            k = checkpoint_step(path)
        except (OSError, ValueError):
            continue
        if step < k < total_steps:
            best, step = path, k
    return best


def drop_replayed_steps(path: PathLike) -> int:
    """Make an i-PI output continued by a restarted run have each step once, in order; returns the rows dropped.

    i-PI appends to its outputs when it starts from a checkpoint, so the steps between that checkpoint and the
    moment the earlier run stopped appear twice. The later copy (the run that went on) is kept. Works on
    properties files (step in the column named ``step``, else the first) and xyz trajectories (``Step: N`` in
    each frame's comment line). The file is replaced atomically.
    """
    path = Path(path)
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[0].startswith("#") and lines[0].strip().isdigit():  # xyz: frames of n + 2 lines
        blocks, k = [], 0
        while k < len(lines):
            n = int(lines[k])
            m = re.search(r"Step:\s*(\d+)", lines[k + 1])
            if not m:
                raise ValueError(f"{path}: frame at line {k + 2} has no 'Step:' in its comment")
            blocks.append((int(m.group(1)), lines[k:k + n + 2]))
            k += n + 2
        header: list = []
    else:
        column = 0
        for line in lines:
            m = re.match(r"#\s*(column|cols\.)\s+(\d+)(?:-\d+)?\s+-->\s+step\b", line)
            if m:
                column = int(m.group(2)) - 1
                break
        first = next((k for k, ln in enumerate(lines) if ln.strip() and not ln.startswith("#")), len(lines))
        header = lines[:first]  # the header at the top; a header repeated further down is dropped
        blocks = [(int(round(float(ln.split()[column]))), [ln]) for ln in lines if ln.strip() and not ln.startswith("#")]
    kept: list = []
    for step, block in blocks:
        while kept and kept[-1][0] >= step:
            kept.pop()
        kept.append((step, block))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(header) + "".join("".join(b) for _, b in kept))
    os.replace(tmp, path)
    return len(blocks) - len(kept)


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
