"""The i-PI socket wire protocol, separated from any client loop (numpy only, no i-PI import).

Messages are 12-byte space-padded ASCII headers followed by raw native-endian payloads
(``ipi/interfaces/sockets.py``; ASE ``socketio.IPIProtocol``):

server → client: ``STATUS`` · ``INIT`` + i4 bead + i4 len + bytes · ``POSDATA`` + 9 f8 h + 9 f8 h⁻¹
+ i4 nat + 3·nat f8 positions · ``GETFORCE`` · ``EXIT``

client → server: ``NEEDINIT`` / ``READY`` / ``HAVEDATA`` (answers to STATUS) ·
``FORCEREADY`` + f8 energy + i4 nat + 3·nat f8 forces + 9 f8 virial + i4 len + extra bytes.

All values are atomic units (Bohr, Hartree, Hartree/Bohr; the virial in Hartree). ``h`` is the
cell with lattice vectors as **columns**; it is sent row-major, so ``h.T`` gives ASE's rows.
Since i-PI 3.2 the server pipelines ``POSDATA`` and ``GETFORCE`` in one write, so every read here
is an exact ``recvall``; a read of 0 bytes means the peer closed the connection.
"""

from __future__ import annotations

import socket
from typing import Tuple

import numpy as np

HDRLEN = 12
SERVER_HEADERS = (b"STATUS", b"INIT", b"POSDATA", b"GETFORCE", b"EXIT")
MAX_ATOMS = 10_000_000
MAX_INIT_BYTES = 1 << 20


class ProtocolError(RuntimeError):
    """The peer sent something that is not the i-PI protocol (garbage, bad sizes)."""


class Disconnected(ConnectionError):
    """The peer closed the connection (0-byte read) or reset it."""


def recvall(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes; raise :class:`Disconnected` if the peer closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise Disconnected(f"connection reset by i-PI ({exc})") from exc
        if k == 0:
            raise Disconnected(f"i-PI closed the connection ({got} of {n} bytes of a message read)")
        got += k
    return bytes(buf)


def send(sock: socket.socket, data: bytes) -> None:
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


def recv_header(sock: socket.socket) -> bytes:
    """Next header word (stripped). Raises :class:`ProtocolError` on anything unknown."""
    raw = recvall(sock, HDRLEN)
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


def _i4(sock: socket.socket) -> int:
    return int(np.frombuffer(recvall(sock, 4), dtype=np.int32)[0])


def recv_init(sock: socket.socket) -> Tuple[int, bytes]:
    """Payload of ``INIT`` (after the header): ``(bead index, init string bytes)``."""
    bead = _i4(sock)
    n = _i4(sock)
    if not 0 <= n <= MAX_INIT_BYTES:
        raise ProtocolError(f"INIT string length {n} is out of range")
    return bead, recvall(sock, n)


def recv_posdata(sock: socket.socket) -> Tuple[np.ndarray, np.ndarray]:
    """Payload of ``POSDATA`` (after the header).

    Returns:
        ``(cell_h (3, 3) Bohr, lattice vectors as columns; positions (nat, 3) Bohr)``.
    """
    h = np.frombuffer(recvall(sock, 72), dtype=np.float64).reshape(3, 3).copy()
    recvall(sock, 72)  # h^-1: legacy, unused
    nat = _i4(sock)
    if not 0 < nat <= MAX_ATOMS:
        raise ProtocolError(f"POSDATA announces {nat} atoms: not the i-PI protocol")
    pos = np.frombuffer(recvall(sock, 24 * nat), dtype=np.float64).reshape(nat, 3).copy()
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
