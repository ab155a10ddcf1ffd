"""The i-PI socket wire protocol, separated from any client loop (numpy only, no i-PI import).

Messages are 12-byte space-padded ASCII headers followed by raw native-endian payloads
(``ipi/interfaces/sockets.py``; ASE ``socketio.IPIProtocol``):

server → client: ``STATUS`` · ``INIT`` + i4 bead + i4 len + bytes · ``POSDATA`` + 9 f8 h + 9 f8 h⁻¹
+ i4 nat + 3·nat f8 positions · ``GETFORCE`` · ``EXIT``

client → server: ``NEEDINIT`` / ``READY`` / ``HAVEDATA`` (answers to STATUS) ·
``FORCEREADY`` + f8 energy + i4 nat + 3·nat f8 forces + 9 f8 virial + i4 len + extra bytes.

Batched requests (i-PI ≥ 3.3, ``<batch_size>`` N in the ``<ffsocket>``: INIT ends in ``batch_size:N``):
``POSDATA`` + i4 nat + N × (9 f8 h + 9 f8 h⁻¹) + N × 3·nat f8 positions, and ``FORCEREADY`` + N f8 energies
+ i4 nat + N × 3·nat f8 forces + N × 9 f8 virials + N × (i4 len + extra bytes); see
:func:`recv_posdata_batch`, :func:`forceready_batch_message`.

All values are atomic units (Bohr, Hartree, Hartree/Bohr; the virial in Hartree). ``h`` is the
cell with lattice vectors as **columns**; it is sent row-major, so ``h.T`` gives ASE's rows.
Since i-PI 3.2 the server pipelines ``POSDATA`` and ``GETFORCE`` in one write, so every read here
is an exact ``recvall``; a read of 0 bytes means the peer closed the connection.

Timeouts (seconds, ``None`` = wait forever): ``read_timeout`` bounds how long the rest of a message may
take once its first byte has arrived (a server that sends 5 bytes of a header and then nothing is a
:class:`ProtocolError`, not a hang); ``idle_timeout`` bounds the wait for the next message to start
(:class:`Disconnected`; off by default, since i-PI may legitimately wait for other clients).
"""

from __future__ import annotations

import re
import socket
import time
from typing import Optional, Sequence, Tuple

import numpy as np

HDRLEN = 12
SERVER_HEADERS = (b"STATUS", b"INIT", b"POSDATA", b"GETFORCE", b"EXIT")
MAX_ATOMS = 10_000_000
MAX_INIT_BYTES = 1 << 20


class ProtocolError(RuntimeError):
    """The peer sent something that is not the i-PI protocol (garbage, bad sizes)."""


class Disconnected(ConnectionError):
    """The peer closed the connection (0-byte read) or reset it, or sent nothing for ``idle_timeout`` s."""


class AtomCountError(ProtocolError):
    """``POSDATA`` announces a different atom count than the template (checked before reading positions)."""


def recvall(sock: socket.socket, n: int, timeout: Optional[float] = None, idle_timeout: Optional[float] = None,
            started: bool = True) -> bytes:
    """Read exactly ``n`` bytes; raise :class:`Disconnected` if the peer closes first.

    Args:
        timeout: seconds for the read (``None``: no limit), counted from the call if ``started`` (a payload
            that follows its header), else from the first byte; :class:`ProtocolError` when it passes.
        idle_timeout: with ``started=False`` (a new message), seconds to wait for its first byte
            (``None``: no limit); :class:`Disconnected` when it passes.
    """
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    deadline = time.monotonic() + timeout if (started and timeout is not None) else None
    while got < n:
        if got == 0 and not started:
            sock.settimeout(idle_timeout)
        else:
            if deadline is None and timeout is not None:
                deadline = time.monotonic() + timeout
            sock.settimeout(None if deadline is None else max(deadline - time.monotonic(), 1e-3))
        try:
            k = sock.recv_into(view[got:], n - got)
        except socket.timeout:
            if got == 0 and not started:
                raise Disconnected(f"no message from i-PI for {idle_timeout:g} s (idle timeout)") from None
            raise ProtocolError(
                f"i-PI sent {got} of {n} bytes of a message part and then nothing for {timeout:g} s (read timeout)"
            ) from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise Disconnected(f"connection reset by i-PI ({exc})") from exc
        if k == 0:
            raise Disconnected(f"i-PI closed the connection ({got} of {n} bytes of a message read)")
        got += k
    return bytes(buf)


def send(sock: socket.socket, data: bytes) -> None:
    """Send all of ``data`` (blocking); :class:`Disconnected` if the peer has gone."""
    sock.settimeout(None)
    try:
        sock.sendall(data)
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise Disconnected(f"connection lost while sending ({exc})") from exc


def header(word: str) -> bytes:
    """A 12-byte header: ``word`` upper-case, space padded."""
    b = word.upper().encode("ascii")
    if len(b) > HDRLEN:
        raise ValueError(f"header {word!r} longer than {HDRLEN} bytes")
    return b.ljust(HDRLEN)


def recv_header(sock: socket.socket, read_timeout: Optional[float] = None,
                idle_timeout: Optional[float] = None) -> bytes:
    """Next header word (stripped). Raises :class:`ProtocolError` on anything unknown (or a header
    that stops for ``read_timeout`` s), :class:`Disconnected` after ``idle_timeout`` s without a message."""
    raw = recvall(sock, HDRLEN, read_timeout, idle_timeout, started=False)
    word = raw.strip()
    if word not in SERVER_HEADERS:
        shown = raw[:HDRLEN].decode("ascii", "backslashreplace")
        raise ProtocolError(
            f"unexpected header {shown!r} from the server: is the other end i-PI? "
            f"(expected one of {[h.decode() for h in SERVER_HEADERS]})"
        )
    return word


def recv_header_any(sock: socket.socket) -> bytes:
    """Next header word (stripped), whatever it is (for servers and tests)."""
    return recvall(sock, HDRLEN).strip()


def _i4(sock: socket.socket, timeout: Optional[float] = None) -> int:
    return int(np.frombuffer(recvall(sock, 4, timeout), dtype=np.int32)[0])


def recv_init(sock: socket.socket, timeout: Optional[float] = None) -> Tuple[int, bytes]:
    """Payload of ``INIT`` (after the header): ``(bead index, init string bytes)``; ``timeout`` s per part."""
    bead = _i4(sock, timeout)
    n = _i4(sock, timeout)
    if not 0 <= n <= MAX_INIT_BYTES:
        raise ProtocolError(f"INIT string length {n} is out of range")
    return bead, recvall(sock, n, timeout)


def _checked_atom_count(nat: int, natoms: Optional[int], what: str) -> int:
    """``nat`` as read from the wire, refused before anything is allocated for it: outside (0, MAX_ATOMS]
    (:class:`ProtocolError`) or different from the template's ``natoms`` (:class:`AtomCountError`)."""
    if not 0 < nat <= MAX_ATOMS:
        raise ProtocolError(f"{what} announces {nat} atoms: not the i-PI protocol")
    if natoms is not None and nat != natoms:
        raise AtomCountError(
            f"i-PI sent {nat} atoms but the template has {natoms}: use the same structure file for i-PI and the client"
        )
    return nat


def recv_posdata(sock: socket.socket, natoms: Optional[int] = None,
                 timeout: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Payload of ``POSDATA`` (after the header).

    Args:
        natoms: the expected atom count (the template's); checked *before* the positions are read, so an
            absurd count never allocates (:class:`AtomCountError`).
        timeout: seconds allowed for each part of the payload (``None``: no limit).

    Returns:
        ``(cell_h (3, 3) Bohr, lattice vectors as columns; positions (nat, 3) Bohr)``.
    """
    h = np.frombuffer(recvall(sock, 72, timeout), dtype=np.float64).reshape(3, 3).copy()
    recvall(sock, 72, timeout)  # h^-1: legacy, unused
    nat = _checked_atom_count(_i4(sock, timeout), natoms, "POSDATA")
    pos = np.frombuffer(recvall(sock, 24 * nat, timeout), dtype=np.float64).reshape(nat, 3).copy()
    return h, pos


def forceready_message(energy: float, forces: np.ndarray, virial: np.ndarray, extra: bytes = b"") -> bytes:
    """The complete ``FORCEREADY`` message.

    Args:
        energy: Hartree.
        forces: (nat, 3) Hartree/Bohr.
        virial: (3, 3) Hartree, W = −∂E/∂ε (symmetric; i-PI keeps only the upper triangle).
        extra: optional bytes (JSON by convention).
    """
    forces = np.ascontiguousarray(forces, dtype=np.float64).reshape(-1, 3)
    virial = np.ascontiguousarray(virial, dtype=np.float64).reshape(3, 3)
    return b"".join(
        (
            header("FORCEREADY"),
            np.float64(energy).tobytes(),
            np.int32(forces.shape[0]).tobytes(),
            forces.tobytes(),
            virial.tobytes(),
            np.int32(len(extra)).tobytes(),
            extra,
        )
    )


# ----------------------------------------------------------------------------- batched requests
# i-PI >= 3.3 with ``<ffsocket><batch_size>N</batch_size>`` (needs ``consolidate_messages``) appends
# ``batch_size:N`` to the INIT string and then sends N structures per request (``ipi/interfaces/sockets.py``:
# ``initialize``, ``dispatch_send_batch``, ``_recv_forces_bulk_batch``). Batches are padded to N by
# repeating the last structure; all structures share one atom count.

MAX_BATCH = 65536
_BATCH_RE = re.compile(rb"batch_size\s*:\s*(-?\d+)")


def parse_batch_size(init: bytes) -> int:
    """The batch size i-PI announced in its INIT string (``…, batch_size:N``), 1 if none.

    i-PI appends the entry after the user's parameters, so the last occurrence counts. Raises
    :class:`ProtocolError` for a size outside 1..:data:`MAX_BATCH`.
    """
    found = _BATCH_RE.findall(init)
    if not found:
        return 1
    n = int(found[-1])
    if not 1 <= n <= MAX_BATCH:
        raise ProtocolError(f"INIT announces batch_size {n}: expected 1..{MAX_BATCH}")
    return n


def recv_posdata_batch(sock: socket.socket, batch: int, natoms: Optional[int] = None,
                       timeout: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Payload of a batched ``POSDATA`` (after the header) for ``batch`` structures.

    Wire layout: i4 nat (once) · ``batch`` × (9 f8 h, 9 f8 h⁻¹) · ``batch`` × 3·nat f8 positions.

    Args:
        batch: the batch size announced at INIT (i-PI always sends this many, padding with copies).
        natoms: the expected atom count (the template's); checked right after the count is read, before
            anything else is allocated (:class:`AtomCountError`).
        timeout: seconds allowed for each part of the payload (``None``: no limit).

    Returns:
        ``(cells (batch, 3, 3) Bohr, lattice vectors as columns; positions (batch, nat, 3) Bohr)``.
    """
    nat = _checked_atom_count(_i4(sock, timeout), natoms, "batched POSDATA")
    if batch * nat > MAX_ATOMS:
        raise ProtocolError(f"batched POSDATA of {batch} × {nat} atoms exceeds {MAX_ATOMS} atoms")
    hs = np.frombuffer(recvall(sock, 144 * batch, timeout), dtype=np.float64).reshape(batch, 2, 3, 3)
    cells = hs[:, 0].copy()  # (batch, 3, 3); hs[:, 1] is h^-1: legacy, unused
    pos = np.frombuffer(recvall(sock, 24 * nat * batch, timeout), dtype=np.float64).reshape(batch, nat, 3).copy()
    return cells, pos


def forceready_batch_message(energies: Sequence[float], forces: Sequence[np.ndarray], virials: Sequence[np.ndarray],
                             extras: Sequence[bytes]) -> bytes:
    """The complete batched ``FORCEREADY`` message for B structures.

    Wire layout: header · B f8 energies · i4 nat · B × 3·nat f8 forces · B × 9 f8 virials ·
    B × (i4 len + len bytes extra) (an empty extra is length 0).

    Args:
        energies: B values, Hartree.
        forces: B arrays (nat, 3), Hartree/Bohr.
        virials: B arrays (3, 3), Hartree (W = −∂E/∂ε, symmetric).
        extras: B byte strings (JSON by convention, may be empty).
    """
    b = len(energies)
    if not (len(forces) == len(virials) == len(extras) == b) or b == 0:
        raise ValueError(f"a batched reply needs the same number (> 0) of energies, forces, virials and extras, "
                         f"got {b}, {len(forces)}, {len(virials)}, {len(extras)}")
    f = np.ascontiguousarray(np.stack([np.asarray(x, dtype=np.float64).reshape(-1, 3) for x in forces]))  # (B, nat, 3)
    w = np.ascontiguousarray(np.stack([np.asarray(x, dtype=np.float64).reshape(3, 3) for x in virials]))  # (B, 3, 3)
    parts = [header("FORCEREADY"), np.asarray(energies, dtype=np.float64).tobytes(), np.int32(f.shape[1]).tobytes(),
             f.tobytes(), w.tobytes()]
    for x in extras:
        parts += [np.int32(len(x)).tobytes(), x]
    return b"".join(parts)


def drain(sock: socket.socket, timeout: float = 1.0) -> int:
    """Close our sending side, read everything the server still sends until it closes or
    ``timeout`` s pass, and return the number of bytes discarded.

    A socket closed with unread data sends RST, and i-PI 3.3 (consolidated messages) then hangs
    forever; a FIN after draining makes it drop the client and re-queue the step.
    """
    discarded = 0
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    try:
        sock.settimeout(timeout)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            discarded += len(chunk)
    except OSError:  # timeout, reset: nothing more to read
        pass
    return discarded
