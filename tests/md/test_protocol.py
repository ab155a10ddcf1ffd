"""The client loop against a hand-written protocol server on a real unix socket (no i-PI):
handshake, pipelined messages, EXIT, lost connection, garbage, wrong sizes, non-finite results,
clean draining (FIN, never RST), reconnect."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import uuid

import numpy as np
import pytest

from ekf_plugin.md import protocol as proto
from ekf_plugin.md.ipi_client import (
    EXIT_DISCONNECTED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_PROTOCOL,
    Address,
    IPIClient,
)

NAT = 4
H = np.diag([10.0, 11.0, 12.0])  # Bohr, columns


def harmonic(cell_h, pos):
    """E = ½ Σ r² (Ha, Bohr), F = −r, W = Σ r⊗F: a tiny numpy potential for protocol tests."""
    f = -pos
    return 0.5 * float((pos**2).sum()), f, pos.T @ f, '{"ok": 1}'


def posdata(nat=NAT, seed=0):
    pos = np.random.default_rng(seed).normal(size=(nat, 3))
    msg = proto.header("POSDATA") + H.tobytes() + np.linalg.inv(H).tobytes() + np.int32(nat).tobytes() + pos.tobytes()
    return msg, pos


def read_forceready(conn, nat=NAT):
    assert proto.recv_header_any(conn) == b"FORCEREADY"
    e = np.frombuffer(proto.recvall(conn, 8), np.float64)[0]
    n = np.frombuffer(proto.recvall(conn, 4), np.int32)[0]
    f = np.frombuffer(proto.recvall(conn, 24 * n), np.float64).reshape(n, 3)
    w = np.frombuffer(proto.recvall(conn, 72), np.float64).reshape(3, 3)
    k = np.frombuffer(proto.recvall(conn, 4), np.int32)[0]
    extra = proto.recvall(conn, k)
    return e, f, w, extra


class Server:
    """Listens on a fresh unix socket; ``script(conn)`` runs in a thread per accepted connection."""

    def __init__(self, *scripts):
        self.name = f"ekft_{uuid.uuid4().hex[:10]}"
        self.path = "/tmp/ipi_" + self.name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(2)
        self.sock.settimeout(10)
        self.results, self.errors = [], []
        self.thread = threading.Thread(target=self._serve, args=(scripts,), daemon=True)
        self.thread.start()

    def _serve(self, scripts):
        try:
            for script in scripts:
                conn, _ = self.sock.accept()
                conn.settimeout(10)
                with conn:
                    self.results.append(script(conn))
        except Exception as exc:  # reported by the test
            self.errors.append(exc)

    def close(self):
        self.thread.join(15)
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        assert not self.errors, self.errors


def run_with_peak_memory(c):
    """(exit code, peak bytes traced by tracemalloc) of ``c.run()``: what a client allocated on the way."""
    import tracemalloc

    tracemalloc.start()
    try:
        rc = c.run()
        return rc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def client(server, compute=harmonic, natoms=NAT, **kw):
    return IPIClient(compute, Address(unix=server.name), natoms=natoms, connect_timeout=5, **kw)



def test_handshake_pipelined_steps_and_exit():
    def script(conn):
        conn.sendall(proto.header("STATUS"))
        assert proto.recvall(conn, 12) == proto.header("NEEDINIT")
        conn.sendall(proto.header("INIT") + np.int32(0).tobytes() + np.int32(5).tobytes() + b"a : b")
        conn.sendall(proto.header("STATUS"))
        assert proto.recvall(conn, 12) == proto.header("READY")
        out = []
        for step in range(3):
            msg, pos = posdata(seed=step)
            conn.sendall(msg + proto.header("GETFORCE"))  # i-PI >= 3.2: one write, no STATUS between
            out.append((pos, read_forceready(conn)))
            conn.sendall(proto.header("STATUS"))
            assert proto.recvall(conn, 12) == proto.header("READY")
        # the older, unconsolidated sequence: POSDATA, STATUS → HAVEDATA, GETFORCE
        msg, pos = posdata(seed=9)
        conn.sendall(msg + proto.header("STATUS"))
        assert proto.recvall(conn, 12) == proto.header("HAVEDATA")
        conn.sendall(proto.header("GETFORCE"))
        out.append((pos, read_forceready(conn)))
        conn.sendall(proto.header("EXIT"))
        return out

    srv = Server(script)
    c = client(srv)
    assert c.run() == EXIT_OK
    srv.close()
    assert c.init_string == b"a : b"
    assert len(srv.results[0]) == 4
    for pos, (e, f, w, extra) in srv.results[0]:
        assert e == pytest.approx(0.5 * (pos**2).sum())
        np.testing.assert_allclose(f, -pos)
        np.testing.assert_allclose(w, w.T)
        np.testing.assert_allclose(w, -(pos.T @ pos))
        assert extra == b'{"ok": 1}'


def test_the_closing_log_splits_each_call_into_model_time_and_socket_and_ipi_time(capfd):
    """The cycle per force call, and of it the time inside the model (the same calls), so the socket and
    i-PI share is measured on the calls themselves (benchmarks/bench_ipi.py --round-trip reads it)."""
    def slow(cell_h, pos):
        time.sleep(0.02)
        return harmonic(cell_h, pos)

    def script(conn):
        conn.sendall(proto.header("STATUS"))
        proto.recvall(conn, 12)
        conn.sendall(proto.header("INIT") + np.int32(0).tobytes() + np.int32(0).tobytes())
        for step in range(5):
            msg, _ = posdata(seed=step)
            conn.sendall(msg + proto.header("GETFORCE"))
            read_forceready(conn)
            time.sleep(0.004)  # i-PI receives the forces, then asks for the status (as i-PI 3.x does)
            conn.sendall(proto.header("STATUS"))
            assert proto.recvall(conn, 12).strip() == b"READY"
            time.sleep(0.01)  # "i-PI's step"
        conn.sendall(proto.header("EXIT"))

    srv = Server(script)
    c = client(srv, compute=slow)
    assert c.run() == EXIT_OK
    srv.close()
    assert len(c.compute_seconds) == 5 and min(c.compute_seconds) >= 0.02
    log = capfd.readouterr().err
    m = re.search(r"([0-9.]+) ms per call.*model ([0-9.]+) ms per call, socket and i-PI ([0-9.]+) ms", log)
    assert m, log
    cycle, model, rest = map(float, m.groups())
    assert 20 <= model < cycle and rest >= 14 and abs(cycle - model - rest) < 0.02
    # i-PI's turn, split: forces → its STATUS (the 4 ms), STATUS → next positions (the 10 ms); 4 of 5 calls
    m = re.search(r"i-PI's turn ([0-9.]+) ms \(forces to its STATUS ([0-9.]+) ms, then to the next positions "
                  r"([0-9.]+) ms\)", log)
    assert m, log
    turn, to_status, to_positions = map(float, m.groups())
    assert c.n_waits == 4
    assert 4 <= to_status < 9 and 10 <= to_positions < 15 and abs(turn - to_status - to_positions) < 0.02
    assert turn <= rest + 0.5


def test_lost_connection_exits_nonzero_fast(capfd):
    def script(conn):
        conn.sendall(proto.header("STATUS"))
        proto.recvall(conn, 12)
        msg, _ = posdata()
        conn.sendall(msg[:50])  # dies in the middle of a message

    srv = Server(script)
    t0 = time.monotonic()
    assert client(srv).run() == EXIT_DISCONNECTED
    assert time.monotonic() - t0 < 5
    srv.close()
    assert "connection to i-PI lost" in capfd.readouterr().err


def test_garbage_is_a_clear_error(capfd):
    def script(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        return conn.recv(100)  # the client closes cleanly: EOF, no reset

    srv = Server(script)
    assert client(srv).run() == EXIT_PROTOCOL
    srv.close()
    assert srv.results == [b""]
    err = capfd.readouterr().err
    assert "protocol error: unexpected header 'HTTP/1.1 200'" in err and "is the other end i-PI?" in err


def test_absurd_atom_count_is_a_protocol_error(capfd):
    def script(conn):
        conn.sendall(proto.header("POSDATA") + H.tobytes() + H.tobytes() + np.int32(-7).tobytes())

    srv = Server(script)
    assert client(srv).run() == EXIT_PROTOCOL
    srv.close()
    assert "POSDATA announces -7 atoms" in capfd.readouterr().err


def test_wrong_atom_count_is_refused_and_connection_drained(capfd):
    def script(conn):
        msg, _ = posdata(nat=NAT + 2)
        conn.sendall(msg + proto.header("GETFORCE"))
        return conn.recv(100)  # EOF after the client drained: FIN, not RST

    srv = Server(script)
    assert client(srv).run() == EXIT_MODEL
    srv.close()
    assert srv.results == [b""]
    assert "i-PI sent 6 atoms but the template has 4" in capfd.readouterr().err


def test_non_finite_results_are_never_sent(capfd):
    def nan_model(cell_h, pos):
        e, f, w, x = harmonic(cell_h, pos)
        f[1, 2] = np.inf
        return e, f, w, x

    def script(conn):
        msg, _ = posdata()
        conn.sendall(msg + proto.header("GETFORCE"))
        return conn.recv(100)

    srv = Server(script)
    assert client(srv, compute=nan_model).run() == EXIT_MODEL
    srv.close()
    assert srv.results == [b""]  # no FORCEREADY, clean EOF
    assert "non-finite" in capfd.readouterr().err


def test_model_exception_drains_pending_bytes(capfd):
    """Pipelined bytes still unread when the model fails are read before closing (no RST)."""

    def failing(cell_h, pos):
        time.sleep(0.2)  # the server's extra bytes arrive meanwhile
        raise RuntimeError("CUDA out of memory")

    def script(conn):
        msg, _ = posdata()
        conn.sendall(msg + proto.header("GETFORCE") + proto.header("STATUS") * 3)
        return conn.recv(100)

    srv = Server(script)
    assert client(srv, compute=failing).run() == EXIT_MODEL
    srv.close()
    assert srv.results == [b""]
    err = capfd.readouterr().err
    assert "model evaluation failed: RuntimeError: CUDA out of memory" in err
    assert "drained 48 bytes" in err  # GETFORCE + 3 STATUS, unread while the model ran


def test_reconnect_after_lost_connection():
    def dies(conn):
        conn.sendall(proto.header("STATUS"))
        proto.recvall(conn, 12)

    def finishes(conn):
        msg, _ = posdata()
        conn.sendall(msg + proto.header("GETFORCE"))
        read_forceready(conn)
        conn.sendall(proto.header("EXIT"))

    srv = Server(dies, finishes)
    c = client(srv, reconnect=5.0)
    assert c.run() == EXIT_OK
    srv.close()
    assert c.n_calls == 1


def test_no_server_is_a_clear_error(capfd):
    c = IPIClient(harmonic, Address(unix=f"ekft_missing_{uuid.uuid4().hex[:8]}"), connect_timeout=0.3)
    assert c.run() == EXIT_DISCONNECTED
    assert "could not connect to i-PI" in capfd.readouterr().err


def test_address_validation():
    with pytest.raises(ValueError, match="either a unix socket name, or host and port"):
        Address()
    with pytest.raises(ValueError, match="port"):
        Address(host="localhost", port=0)
    with pytest.raises(ValueError, match="107-byte"):
        Address(unix="x" * 120)


def test_half_a_header_then_silence_hits_the_read_timeout(capfd):
    """A server that sends 5 bytes of a header and then nothing: exit 3 after read_timeout, never a hang."""

    def script(conn):
        conn.sendall(b"STATU")
        return conn.recv(100)  # the client gives up and closes: EOF

    srv = Server(script)
    t0 = time.monotonic()
    assert client(srv, read_timeout=0.5).run() == EXIT_PROTOCOL
    elapsed = time.monotonic() - t0
    srv.close()
    assert 0.4 < elapsed < 5
    assert "5 of 12 bytes" in capfd.readouterr().err


def test_half_a_posdata_payload_hits_the_read_timeout(capfd):
    def script(conn):
        msg, _ = posdata()
        conn.sendall(msg[:-10])  # the last position never comes
        return conn.recv(100)

    srv = Server(script)
    assert client(srv, read_timeout=0.5).run() == EXIT_PROTOCOL
    srv.close()
    assert "read timeout" in capfd.readouterr().err


def test_idle_timeout_is_optional(capfd):
    def script(conn):
        time.sleep(1.0)  # no message at all
        return b""

    srv = Server(script)
    assert client(srv, idle_timeout=0.3).run() == EXIT_DISCONNECTED
    srv.close()
    assert "no message from i-PI for 0.3 s" in capfd.readouterr().err
    with pytest.raises(ValueError, match="read_timeout"):
        client(srv, read_timeout=0)


def test_absurd_atom_count_is_checked_against_the_template_before_allocating(capfd):
    """POSDATA announcing 9e6 atoms (216 MB of positions) is refused from its header, with no allocation."""
    def script(conn):
        conn.sendall(proto.header("POSDATA") + H.tobytes() + H.tobytes() + np.int32(9_000_000).tobytes())
        return conn.recv(100)

    srv = Server(script)
    rc, peak = run_with_peak_memory(client(srv))
    srv.close()
    assert rc == EXIT_MODEL
    assert peak < 20e6, f"allocated {peak / 1e6:.0f} MB"
    assert "i-PI sent 9000000 atoms but the template has 4" in capfd.readouterr().err
