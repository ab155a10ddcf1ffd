"""The hardened i-PI client loop: :func:`run_client` (console: ``ekf-plugin ipi``).

Behaviour (see ``docs/md.md``):

* connects over a unix socket (``<sockets_prefix><name>``, i-PI's default prefix ``/tmp/ipi_``)
  or TCP, waiting up to ``connect_timeout`` s for i-PI to create it;
* answers the first ``STATUS`` with ``NEEDINIT``, reads ``INIT``, then ``READY``/``HAVEDATA``; reads
  ``POSDATA`` and ``GETFORCE`` with exact reads, so i-PI's pipelined messages are handled;
* serves i-PI's batched requests (``batch_size:N`` in the INIT string, from ``<batch_size>`` in the
  ``<ffsocket>``: N structures per ``POSDATA``/``FORCEREADY``, e.g. the beads of a path integral); the N
  structures go to ``compute.compute_batch`` if the callable has one (:class:`ekf_plugin.md.pes.AtomicUnitsModel`:
  one evaluator, i.e. one Verlet list, per batch slot), else to ``compute`` one by one; i-PI's padding
  copies of the last structure are not evaluated again;
* ``EXIT`` → returns 0;
* connection lost → returns 2 with a clear message, unless ``reconnect`` > 0 s, in which case it
  retries with exponential backoff while the unix socket file exists (i-PI re-queues the step);
* a message that stops half-way for ``read_timeout`` s (default 60) → 3; no message at all for
  ``idle_timeout`` s (default: wait forever) → 2;
* garbage on the socket → 3; model error, wrong atom count (checked before the positions are read)
  or non-finite result → 4;
  SIGTERM → 143. In all three cases it first drains the bytes i-PI still sends and closes with a
  FIN, never an RST, so that i-PI drops this client and re-queues the step for another one.

The loop imports numpy only; the model is any callable
``compute(cell_h (3,3) Bohr, pos (nat,3) Bohr) -> (E Ha, F (nat,3) Ha/Bohr, W (3,3) Ha, extras str)``
(e.g. :class:`ekf_plugin.md.pes.AtomicUnitsModel`), optionally with a method
``compute_batch(cells (B,3,3) Bohr, positions (B,nat,3) Bohr) -> list of B such tuples``.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Optional, Tuple

import numpy as np

from . import protocol as proto

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_DISCONNECTED = 2
EXIT_PROTOCOL = 3
EXIT_MODEL = 4
EXIT_SIGTERM = 128 + signal.SIGTERM

Compute = Callable[[np.ndarray, np.ndarray], Tuple[float, np.ndarray, np.ndarray, Any]]


class Terminated(Exception):
    """Raised in the main thread by the SIGTERM handler."""


class ModelFailure(RuntimeError):
    """The model raised, returned non-finite values, or got the wrong number of atoms."""


def _log(msg: str) -> None:
    print(f"ekf-plugin ipi: {msg}", file=sys.stderr, flush=True)


class Address:
    """Where i-PI listens: a unix socket path or a TCP ``(host, port)``."""

    def __init__(self, unix: Optional[str] = None, host: Optional[str] = None, port: Optional[int] = None,
                 sockets_prefix: str = "/tmp/ipi_") -> None:
        if (unix is None) == (host is None and port is None):
            raise ValueError("give either a unix socket name, or host and port")
        if unix is not None:
            self.path: Optional[str] = sockets_prefix + unix
            if len(self.path.encode()) > 107:
                raise ValueError(f"unix socket path {self.path!r} is longer than Linux's 107-byte limit")
            self.inet = None
        else:
            if port is None or not 0 < int(port) < 65536:
                raise ValueError(f"a TCP connection needs a port in 1..65535, got {port!r}")
            self.path = None
            self.inet = (host or "localhost", int(port))

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"tcp:{self.inet[0]}:{self.inet[1]}"

    def exists(self) -> bool:
        """Whether reconnecting makes sense (the unix socket file is still there; always for TCP)."""
        return os.path.exists(self.path) if self.path else True

    def connect(self) -> socket.socket:
        if self.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = self.path
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = self.inet
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        return sock


def connect_with_retry(address: Address, timeout: float, require_file: bool = False) -> socket.socket:
    """Connect, retrying with backoff (0.05 s doubling to 2 s) for up to ``timeout`` s.

    With ``require_file`` (reconnecting), give up as soon as the unix socket file is gone.
    Raises ``ConnectionError`` with a clear message on failure.
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    last: Optional[BaseException] = None
    while True:
        if require_file and not address.exists():
            raise ConnectionError(f"socket {address} no longer exists: i-PI has gone")
        try:
            return address.connect()
        except OSError as exc:
            last = exc
        if time.monotonic() + delay > deadline:
            hint = " (is i-PI running, with the same address and sockets_prefix?)"
            raise ConnectionError(f"could not connect to i-PI at {address} within {timeout:g} s: {last}{hint}")
        time.sleep(delay)
        delay = min(2.0 * delay, 2.0)


def check_result(result: Any, natoms: int) -> Tuple[float, np.ndarray, np.ndarray, bytes]:
    """Validate a model result before it goes on the wire (Ha, Ha/Bohr, Ha)."""
    energy, forces, virial, extras = result
    energy = float(energy)
    forces = np.asarray(forces, dtype=np.float64).reshape(-1, 3)
    virial = np.asarray(virial, dtype=np.float64).reshape(3, 3)
    if forces.shape[0] != natoms:
        raise ModelFailure(f"the model returned forces for {forces.shape[0]} atoms, i-PI sent {natoms}")
    if not (math.isfinite(energy) and np.isfinite(forces).all() and np.isfinite(virial).all()):
        raise ModelFailure("the model returned non-finite energy, forces or virial; refusing to send them to i-PI")
    virial = 0.5 * (virial + virial.T)  # i-PI keeps only the upper triangle
    if isinstance(extras, (dict, list)):
        import json

        extras = json.dumps(extras)
    extra = (extras or "").encode() if not isinstance(extras, bytes) else extras
    return energy, forces, virial, extra


class IPIClient:
    """One client: serve i-PI's requests with ``compute`` until ``EXIT``.

    Args:
        compute: callable in atomic units (see module docstring).
        address: where i-PI listens.
        natoms: expected atom count (from the template); ``None`` skips the check.
        reconnect: seconds to keep trying to reconnect after a lost connection (0: never).
        connect_timeout: seconds to wait for i-PI at start.
        drain_timeout: seconds to wait for i-PI to close after we shut down our side.
        read_timeout: seconds a started message may take to arrive completely (``None``: no limit).
        idle_timeout: seconds to wait for the next message (``None``: no limit; i-PI may be busy).
        progress_every: seconds between progress lines on stderr (force calls, calls/s over the interval, time
            in the model; ``None``: none).
        expected_calls: force calls the run will take (e.g. steps + 1 for one bead), for "k of N" and the time
            left in the progress lines (``None``: unknown).
    """

    def __init__(self, compute: Compute, address: Address, natoms: Optional[int] = None, reconnect: float = 0.0,
                 connect_timeout: float = 30.0, drain_timeout: float = 1.0, read_timeout: Optional[float] = 60.0,
                 idle_timeout: Optional[float] = None, progress_every: Optional[float] = None,
                 expected_calls: Optional[int] = None) -> None:
        if progress_every is not None and not progress_every > 0:
            raise ValueError(f"progress_every must be > 0 seconds or None, got {progress_every!r}")
        if expected_calls is not None and expected_calls < 1:
            raise ValueError(f"expected_calls must be >= 1 or None, got {expected_calls!r}")
        self.progress_every = progress_every
        self.expected_calls = expected_calls
        self._progress_mark: Optional[Tuple[float, int]] = None  # (monotonic time, calls) of the last line
        for name, value in (("read_timeout", read_timeout), ("idle_timeout", idle_timeout)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds or None, got {value!r}")
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.compute = compute
        self.address = address
        self.natoms = natoms
        self.reconnect = float(reconnect)
        self.connect_timeout = float(connect_timeout)
        self.drain_timeout = float(drain_timeout)
        self.n_calls = 0
        self.n_structures = 0  # structures evaluated and sent (n_calls × batch size, padding included)
        self.init_string = b""
        self.batch_size = 1  # structures per request, from the INIT string (i-PI's <batch_size>)
        self.call_times: list = []  # monotonic time of each FORCEREADY sent (for steps/s)
        self.call_structures: list = []  # structures evaluated for each FORCEREADY (padding copies not counted)
        self.compute_seconds: list = []  # time in the model (the compute call alone) of each FORCEREADY
        self._compute_s = 0.0
        self._evaluated = 1
        # i-PI's turn, between each FORCEREADY of ours and its next POSDATA (seconds, summed over the calls):
        # the STATUS it sends on receiving the forces, then its integrator step until the next positions
        self.wait_status_s = 0.0
        self.wait_positions_s = 0.0
        self.n_waits = 0
        self._sent_at: Optional[float] = None
        self._status_at: Optional[float] = None

    # -- one connection -----------------------------------------------------------------
    def serve(self, sock: socket.socket) -> None:
        """Answer requests on ``sock`` until ``EXIT`` (returns) or an error (raises)."""
        initialized = False
        reply: Optional[bytes] = None
        while True:
            word = proto.recv_header(sock, self.read_timeout, self.idle_timeout)
            self._time_ipi(word)
            if word == b"STATUS":
                status = "HAVEDATA" if reply is not None else ("READY" if initialized else "NEEDINIT")
                proto.send(sock, proto.header(status))
            elif word == b"INIT":
                _, self.init_string = proto.recv_init(sock, self.read_timeout)
                self.batch_size = proto.parse_batch_size(self.init_string)
                if self.batch_size > 1:
                    _log(f"i-PI sends batches of {self.batch_size} structures per request")
                initialized = True
            elif word == b"POSDATA":
                try:
                    if self.batch_size > 1:
                        cells, positions = proto.recv_posdata_batch(sock, self.batch_size, self.natoms,
                                                                    self.read_timeout)
                    else:
                        cell_h, pos = proto.recv_posdata(sock, self.natoms, self.read_timeout)
                except proto.AtomCountError as exc:
                    raise ModelFailure(str(exc)) from None
                initialized = True
                if self.batch_size > 1:
                    reply = self._evaluate_batch(cells, positions)
                else:
                    reply = self._evaluate(cell_h, pos)
                    self._evaluated = 1
            elif word == b"GETFORCE":
                if reply is None:
                    raise proto.ProtocolError("GETFORCE before any POSDATA")
                with _no_sigterm():  # never leave half a message on the wire
                    proto.send(sock, reply)
                reply = None
                self._sent_at = time.perf_counter()
                self._status_at = None
                self.n_calls += 1
                self.n_structures += self.batch_size
                self.call_structures.append(self._evaluated)
                self.compute_seconds.append(self._compute_s)
                self.call_times.append(time.monotonic())
                if self.progress_every is not None:
                    self._progress()
            elif word == b"EXIT":
                return

    def _progress(self) -> None:
        """One progress line every ``progress_every`` seconds: calls so far, the rate since the last line, the time
        in the model, and with ``expected_calls`` the share done and the time left at that rate."""
        now, n = self.call_times[-1], self.n_calls
        if self._progress_mark is None:  # the first call (start-up, first model call) is not timed
            self._progress_mark = (now, n)
            return
        t0, n0 = self._progress_mark
        if now - t0 < self.progress_every:
            return
        rate = (n - n0) / (now - t0)
        model = sum(self.compute_seconds[-(n - n0):]) / (n - n0)
        line = f"{n} force calls"
        if self.expected_calls:
            line += f" of {self.expected_calls} ({100 * min(n / self.expected_calls, 1.0):.0f} %)"
        line += f", {rate:.1f} calls/s ({1e3 / rate:.1f} ms per call, model {model * 1e3:.1f} ms)"
        if self.expected_calls and n < self.expected_calls:
            left = (self.expected_calls - n) / rate
            line += f", about {int(left // 3600)}:{int(left % 3600 // 60):02d} h left"
        _log(line)
        self._progress_mark = (now, n)

    def _time_ipi(self, word: bytes) -> None:
        """Account i-PI's turn after a FORCEREADY: to its first STATUS, and from there to the next POSDATA."""
        if self._sent_at is None:
            return
        now = time.perf_counter()
        if word == b"STATUS" and self._status_at is None:
            self._status_at = now
        elif word == b"POSDATA":
            status = self._status_at if self._status_at is not None else now
            self.wait_status_s += status - self._sent_at
            self.wait_positions_s += now - status
            self.n_waits += 1
            self._sent_at = None

    def _evaluate(self, cell_h: np.ndarray, pos: np.ndarray) -> bytes:
        nat = pos.shape[0]
        if self.natoms is not None and nat != self.natoms:
            raise ModelFailure(
                f"i-PI sent {nat} atoms but the template has {self.natoms}: "
                "use the same structure file for i-PI and the client"
            )
        try:
            t0 = time.perf_counter()
            result = self.compute(cell_h, pos)
            self._compute_s = time.perf_counter() - t0  # the model alone: no checks, packing or socket
        except (Terminated, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise ModelFailure(f"model evaluation failed: {type(exc).__name__}: {exc}") from exc
        return proto.forceready_message(*check_result(result, nat))

    def _evaluate_batch(self, cells: np.ndarray, positions: np.ndarray) -> bytes:
        """The batched ``FORCEREADY`` for ``cells`` (B, 3, 3) Bohr (columns) and ``positions`` (B, nat, 3) Bohr.

        A structure identical to the one before it (i-PI pads a short batch with copies of the last
        structure; path-integral beads all start at the same place) takes that one's result.
        """
        b, nat = positions.shape[0], positions.shape[1]
        unique = [0] + [k for k in range(1, b) if not (np.array_equal(positions[k], positions[k - 1])
                                                       and np.array_equal(cells[k], cells[k - 1]))]
        try:
            t0 = time.perf_counter()
            batch_fn = getattr(self.compute, "compute_batch", None)
            if batch_fn is not None:
                results = list(batch_fn(cells[unique], positions[unique]))
            else:
                results = [self.compute(cells[k], positions[k]) for k in unique]
            self._compute_s = time.perf_counter() - t0
        except (Terminated, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise ModelFailure(f"model evaluation failed: {type(exc).__name__}: {exc}") from exc
        if len(results) != len(unique):
            raise ModelFailure(f"the model returned {len(results)} results for a batch of {len(unique)} structures")
        checked = [check_result(r, nat) for r in results]
        self._evaluated = len(unique)
        slot = np.cumsum([k in unique for k in range(b)]) - 1  # (B,) result index of each structure
        out = [checked[i] for i in slot]
        return proto.forceready_batch_message([o[0] for o in out], [o[1] for o in out], [o[2] for o in out],
                                              [o[3] for o in out])

    # -- the whole run ----------------------------------------------------------------------
    def run(self) -> int:
        """Connect, serve, handle failures; return the exit code (see module docstring)."""
        previous = _install_sigterm()
        try:
            return self._run()
        except Terminated:  # while connecting: nothing to drain
            _log("terminated by SIGTERM while connecting")
            return EXIT_SIGTERM
        finally:
            _restore_sigterm(previous)

    def _run(self) -> int:
        try:
            sock = connect_with_retry(self.address, self.connect_timeout)
        except ConnectionError as exc:
            _log(str(exc))
            return EXIT_DISCONNECTED
        _log(f"connected to i-PI at {self.address}")
        while True:
            code = self._serve_once(sock)
            if code != EXIT_DISCONNECTED or self.reconnect <= 0:
                return code
            try:
                sock = connect_with_retry(self.address, self.reconnect, require_file=True)
            except ConnectionError as exc:
                _log(f"{exc}; giving up")
                return EXIT_DISCONNECTED
            _log(f"reconnected to i-PI at {self.address}")

    def _serve_once(self, sock: socket.socket) -> int:
        try:
            self.serve(sock)
            _log(f"received EXIT from i-PI after {self.n_calls} force calls{self._rate()}; done")
            sock.close()
            return EXIT_OK
        except proto.Disconnected as exc:
            _log(f"connection to i-PI lost: {exc} (after {self.n_calls} force calls, no EXIT received)")
            sock.close()
            return EXIT_DISCONNECTED
        except proto.ProtocolError as exc:
            return self._abort(sock, f"protocol error: {exc}", EXIT_PROTOCOL)
        except ModelFailure as exc:
            return self._abort(sock, str(exc), EXIT_MODEL)
        except Terminated:
            return self._abort(sock, "terminated by SIGTERM", EXIT_SIGTERM)
        except KeyboardInterrupt:
            return self._abort(sock, "interrupted", 130)

    def _rate(self) -> str:
        t = self.call_times
        if len(t) < 3:
            return ""
        per = (t[-1] - t[0]) / (len(t) - 1)
        model = sum(self.compute_seconds[1:len(t)]) / (len(t) - 1)  # the same calls' time in the model
        split = (f"; model {model * 1e3:.2f} ms per call, socket and i-PI {(per - model) * 1e3:.2f} ms "
                 f"(+{100 * (per - model) / model:.1f} %)") if model > 0 else ""
        if self.n_waits:  # where the socket and i-PI share goes: i-PI's turn between our reply and its next request
            split += (f"; i-PI's turn {(self.wait_status_s + self.wait_positions_s) / self.n_waits * 1e3:.2f} ms "
                      f"(forces to its STATUS {self.wait_status_s / self.n_waits * 1e3:.2f} ms, then to the next "
                      f"positions {self.wait_positions_s / self.n_waits * 1e3:.2f} ms)")
        if self.batch_size > 1:
            n = sum(self.call_structures[1:len(t)])
            return (f" ({per * 1e3:.2f} ms per call of up to {self.batch_size} structures; "
                    f"{(t[-1] - t[0]) / n * 1e3:.2f} ms per evaluated structure, {n} after the first call, "
                    f"i-PI's padding copies not counted{split})")
        return f" ({per * 1e3:.2f} ms per call, {1 / per:.1f} calls/s after the first{split})"

    def _abort(self, sock: socket.socket, message: str, code: int) -> int:
        n = proto.drain(sock, self.drain_timeout)
        sock.close()
        _log(f"{message}; drained {n} bytes and closed the connection cleanly so that i-PI re-queues the step")
        return code


_STATE = {"critical": False, "pending": False}


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    if _STATE["critical"]:
        _STATE["pending"] = True
        return
    raise Terminated()


class _no_sigterm:
    """Defer SIGTERM until the block ends (used around a send)."""

    def __enter__(self):
        _STATE["critical"] = True

    def __exit__(self, *exc):
        _STATE["critical"] = False
        if _STATE["pending"]:
            _STATE["pending"] = False
            if exc[0] is None:
                raise Terminated()
        return False


def _install_sigterm():
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not in the main thread: leave signals alone
        return None


def _restore_sigterm(previous) -> None:
    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except ValueError:
            pass


def run_client(
    model: Any,
    template: str,
    unix: Optional[str] = None,
    host: Optional[str] = None,
    port: Optional[int] = None,
    *,
    device: Optional[str] = None,
    threads: Optional[int] = None,
    dtype: str = "float64",
    cutoff: Optional[float] = None,
    sockets_prefix: str = "/tmp/ipi_",
    reconnect: float = 0.0,
    connect_timeout: float = 30.0,
    read_timeout: Optional[float] = 60.0,
    idle_timeout: Optional[float] = None,
    trust_pickle: bool = False,
    uncertainty_every: int = 0,
    covariance: Optional[str] = None,
    uncertainty_forces: bool = False,
    uncertainty_threshold: Optional[float] = None,
    progress_every: Optional[float] = 60.0,
    expected_calls: Optional[int] = None,
) -> int:
    """Drive an i-PI simulation with a trained model until i-PI sends ``EXIT``.

    Args:
        model: model path (``spktrain`` ``best_model``, export, n2p2 directory: anything
            :func:`ekf_plugin.models.load_model` reads) or an ``AtomisticModel``.
        template: structure file with the species in i-PI's atom order.
        unix: unix socket name (i-PI ``<address>``; path ``sockets_prefix + unix``).
        host, port: TCP address instead.
        device: torch device; threads: torch threads (default: cores − 1, at most 8);
        dtype: ``"float64"``/``"float32"``; cutoff: Å (default: the model's).
        reconnect: seconds to keep reconnecting after a lost connection (0: exit at once).
        connect_timeout: seconds to wait for i-PI's socket at start.
        read_timeout: seconds a started message may take (``None``: no limit); idle_timeout: seconds
            to wait for the next message (``None``: no limit).
        trust_pickle: allow a full unpickle of a ``best_model`` outside the allow-list (trusted files only).
        uncertainty_every: put σ_E (eV) into the extras every N force calls (0: off), from ``covariance``
            (default ``<model>.cov.pt``); ``uncertainty_forces``: also the largest per-atom σ_F (eV/Å);
            ``uncertainty_threshold``: warn above this σ_E/N (meV/atom). See docs/uncertainty.md.
        progress_every: seconds between progress lines on stderr (``None``: none); expected_calls: the run's force
            calls (steps + 1 for one bead), for the share done and the time left in those lines.

    Returns:
        The process exit code: 0 after EXIT, 1 bad arguments, 2 connection lost,
        3 protocol error, 4 model error, 143 SIGTERM.
    """
    try:
        address = Address(unix, host, port, sockets_prefix)
        from .pes import AtomicUnitsModel

        pes = AtomicUnitsModel(template, model, device=device, threads=threads, dtype=dtype, cutoff=cutoff,
                               trust_pickle=trust_pickle)
        if uncertainty_every:
            from ..uncertainty import default_path
            from ..uncertainty.monitor import UncertaintyMonitor

            if covariance is None and not isinstance(model, (str, os.PathLike)):
                raise ValueError("uncertainty_every needs covariance=<file> for a model given in memory")
            pes.monitor = UncertaintyMonitor(pes.evaluator, covariance or default_path(model), every=uncertainty_every,
                                             forces=uncertainty_forces, threshold=uncertainty_threshold,
                                             log_fn=lambda m: _log(f"warning: {m}"))
            _log(f"EKF uncertainty into i-PI's extras every {uncertainty_every} force call(s) (eV, meV/atom, eV/Å)")
        client = IPIClient(pes, address, natoms=pes.natoms, reconnect=reconnect, connect_timeout=connect_timeout,
                           read_timeout=read_timeout, idle_timeout=idle_timeout, progress_every=progress_every,
                           expected_calls=expected_calls)
    except (ValueError, OSError) as exc:  # bad arguments, template or model file (ModelLoadError is a ValueError)
        _log(f"error: {exc}")
        return EXIT_USAGE
    code = client.run()
    summary = pes.neighbor_list_summary()
    if summary:
        _log(summary)
    return code
