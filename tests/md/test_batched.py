"""i-PI's batched requests (``batch_size:N`` in INIT) against a hand-written server on a real unix
socket: the message layout both ways, padding, per-structure extras, the atom-count check before
allocating, and the per-slot evaluators (one Verlet list per bead) of the BPNN PES. The real i-PI
server runs the batched path-integral test in ``test_ipi.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ekf_plugin.md import protocol as proto
from ekf_plugin.md.ipi_client import EXIT_MODEL, EXIT_OK, EXIT_PROTOCOL

from .test_protocol import NAT, Server, client, harmonic, run_with_peak_memory

B = 3


def cells_and_positions(batch=B, nat=NAT, seed=0):
    """(cells (batch, 3, 3) Bohr, columns; positions (batch, nat, 3) Bohr), all structures different."""
    rng = np.random.default_rng(seed)
    cells = np.stack([np.diag([10.0, 11.0, 12.0]) + np.triu(rng.normal(0, 0.5, (3, 3)), 1) for _ in range(batch)])
    return cells, rng.normal(size=(batch, nat, 3))


def init_message(pars: bytes) -> bytes:
    return proto.header("INIT") + np.int32(0).tobytes() + np.int32(len(pars)).tobytes() + pars


def batched_posdata(cells, positions) -> bytes:
    """What i-PI's ``dispatch_send_batch`` writes: header, i4 nat, (h, h⁻¹) per structure, positions block."""
    msg = proto.header("POSDATA") + np.int32(positions.shape[1]).tobytes()
    for h in cells:
        msg += h.tobytes() + np.linalg.inv(h).tobytes()
    return msg + positions.tobytes()


def read_batched_forceready(conn, batch=B):
    """Parse a batched FORCEREADY as i-PI's ``_recv_forces_bulk_batch`` does."""
    assert proto.recv_header_any(conn) == b"FORCEREADY"
    e = np.frombuffer(proto.recvall(conn, 8 * batch), np.float64)
    n = int(np.frombuffer(proto.recvall(conn, 4), np.int32)[0])
    f = np.frombuffer(proto.recvall(conn, 24 * n * batch), np.float64).reshape(batch, n, 3)
    w = np.frombuffer(proto.recvall(conn, 72 * batch), np.float64).reshape(batch, 3, 3)
    extras = []
    for _ in range(batch):
        k = int(np.frombuffer(proto.recvall(conn, 4), np.int32)[0])
        extras.append(proto.recvall(conn, k))
    return e, f, w, extras


def test_parse_batch_size():
    assert proto.parse_batch_size(b"") == 1
    assert proto.parse_batch_size(b"a : b") == 1
    assert proto.parse_batch_size(b"batch_size:4") == 4
    assert proto.parse_batch_size(b"a : b, batch_size:8") == 8  # i-PI appends after the user's parameters
    with pytest.raises(proto.ProtocolError, match="batch_size 0"):
        proto.parse_batch_size(b"batch_size:0")


def test_forceready_batch_message_layout():
    cells, pos = cells_and_positions()
    res = [harmonic(c, p) for c, p in zip(cells, pos)]
    msg = proto.forceready_batch_message([r[0] for r in res], [r[1] for r in res], [r[2] for r in res],
                                         [b"", b'{"a": 1}', b""])
    nat = NAT
    assert msg[:12] == proto.header("FORCEREADY")
    off = 12
    np.testing.assert_array_equal(np.frombuffer(msg, np.float64, B, off), [r[0] for r in res])
    off += 8 * B
    assert np.frombuffer(msg, np.int32, 1, off)[0] == nat
    off += 4
    np.testing.assert_array_equal(np.frombuffer(msg, np.float64, B * nat * 3, off).reshape(B, nat, 3), -pos)
    off += 24 * nat * B
    np.testing.assert_array_equal(np.frombuffer(msg, np.float64, 9 * B, off).reshape(B, 3, 3), [r[2] for r in res])
    off += 72 * B
    assert msg[off:] == np.int32(0).tobytes() + np.int32(8).tobytes() + b'{"a": 1}' + np.int32(0).tobytes()
    with pytest.raises(ValueError, match="same number"):
        proto.forceready_batch_message([1.0], [], [], [])


def test_batched_requests_are_served_with_padding_and_per_structure_extras():
    """INIT with batch_size 3, two batched steps (the second padded: 2 real + a copy of the last), then EXIT."""
    calls = []

    def model(cell_h, pos):
        calls.append(pos.copy())
        e, f, w, _ = harmonic(cell_h, pos)
        return e, f, w, (json.dumps({"e": e}) if len(calls) % 2 else "")  # empty extras are length 0

    cells, pos = cells_and_positions()
    padded_cells, padded_pos = cells.copy(), pos.copy()
    padded_cells[2], padded_pos[2] = cells[1], pos[1]

    def script(conn):
        conn.sendall(proto.header("STATUS"))
        assert proto.recvall(conn, 12) == proto.header("NEEDINIT")
        conn.sendall(init_message(b"a : b, batch_size:3") + proto.header("STATUS"))
        assert proto.recvall(conn, 12) == proto.header("READY")
        out = []
        for c, p in ((cells, pos), (padded_cells, padded_pos)):
            conn.sendall(batched_posdata(c, p) + proto.header("GETFORCE"))  # one write, as i-PI 3.3
            out.append(read_batched_forceready(conn))
            conn.sendall(proto.header("STATUS"))
            assert proto.recvall(conn, 12) == proto.header("READY")
        conn.sendall(proto.header("EXIT"))
        return out

    srv = Server(script)
    c = client(srv, compute=model)
    assert c.run() == EXIT_OK
    srv.close()
    assert c.batch_size == 3 and c.n_calls == 2 and c.n_structures == 6
    assert len(calls) == 5  # the padding copy is not evaluated again
    for (e, f, w, extras), (cs, ps) in zip(srv.results[0], ((cells, pos), (padded_cells, padded_pos))):
        for k in range(B):
            ref = harmonic(cs[k], ps[k])
            assert e[k] == pytest.approx(ref[0], rel=1e-15)
            np.testing.assert_array_equal(f[k], ref[1])
            np.testing.assert_allclose(w[k], 0.5 * (ref[2] + ref[2].T), rtol=1e-15)
    e0, _, _, x0 = srv.results[0][0]
    assert x0 == [json.dumps({"e": e0[0]}).encode(), b"", json.dumps({"e": e0[2]}).encode()]
    e1, f1, _, x1 = srv.results[0][1]
    assert x1[2] == x1[1] and e1[2] == e1[1]  # the padding copy gets its original's result


def test_compute_batch_is_used_when_the_model_has_one():
    seen = []

    class Batched:
        def __call__(self, cell_h, pos):
            raise AssertionError("the client should call compute_batch")

        def compute_batch(self, cells, positions):
            seen.append(positions.shape)
            return [harmonic(c, p) for c, p in zip(cells, positions)]

    cells, pos = cells_and_positions()

    def script(conn):
        conn.sendall(init_message(b"batch_size:3") + batched_posdata(cells, pos) + proto.header("GETFORCE"))
        out = read_batched_forceready(conn)
        conn.sendall(proto.header("EXIT"))
        return out

    srv = Server(script)
    assert client(srv, compute=Batched()).run() == EXIT_OK
    srv.close()
    assert seen == [(B, NAT, 3)]
    np.testing.assert_array_equal(srv.results[0][1], -pos)


def test_batched_wrong_atom_count_is_refused_before_allocating(capfd):
    def script(conn):
        conn.sendall(init_message(b"batch_size:8") + proto.header("POSDATA") + np.int32(9_000_000).tobytes())
        return conn.recv(100)  # EOF after the client drained: FIN, not RST

    srv = Server(script)
    rc, peak = run_with_peak_memory(client(srv))
    srv.close()
    assert rc == EXIT_MODEL
    assert srv.results == [b""]
    assert peak < 20e6
    assert "i-PI sent 9000000 atoms but the template has 4" in capfd.readouterr().err


def test_batched_posdata_cut_off_hits_the_read_timeout(capfd):
    cells, pos = cells_and_positions()

    def script(conn):
        conn.sendall(init_message(b"batch_size:3") + batched_posdata(cells, pos)[:-10])
        return conn.recv(100)

    srv = Server(script)
    assert client(srv, read_timeout=0.5).run() == EXIT_PROTOCOL
    srv.close()
    assert "read timeout" in capfd.readouterr().err


def test_bpnn_pes_keeps_one_verlet_list_per_slot_and_equals_unbatched(tmp_path, monkeypatch):
    """AtomicUnitsModel.compute_batch: a BPNNStep per slot (own Verlet list), results equal to one-by-one calls."""
    from ase import units

    from ekf_plugin.md.ipi_client import check_result
    from ekf_plugin.md.pes import AtomicUnitsModel
    from ekf_plugin.md.runner import write_ipi_xyz
    from ekf_plugin.models import water_bpnn

    from ._toy import water_box

    z, r, h = water_box(2, seed=1)  # 24 atoms, a 6.2 Å box: several images within the cutoff
    write_ipi_xyz(tmp_path / "init.xyz", ["O" if a == 8 else "H" for a in z], r, h)
    model = water_bpnn(seed=0, dtype=torch.float64)
    monkeypatch.setenv("EKF_PLUGIN_COMPILE", "0")  # eager kernels: no compile time in a unit test
    from ekf_plugin.bpnn import md_step

    one_call = []  # a request of several structures is one evaluate_batch call
    real = md_step.evaluate_batch
    monkeypatch.setattr(md_step, "evaluate_batch", lambda steps, *a, **k: (one_call.append(len(steps)), real(steps, *a, **k))[1])
    batched = AtomicUnitsModel(str(tmp_path / "init.xyz"), model, threads=1)
    single = AtomicUnitsModel(str(tmp_path / "init.xyz"), model, threads=1)
    assert batched.evaluator.fast is not None
    rng = np.random.default_rng(3)
    cell_h = h.T / units.Bohr  # (3, 3) Bohr, columns
    beads = r / units.Bohr + rng.normal(0, 0.05, (4, len(z), 3))  # (4, N, 3) Bohr
    # i-PI may split a step's beads over several requests, in any order (the batch is padded with copies)
    orders = [[[0, 1, 2, 3]], [[0, 1, 2, 3]], [[3, 2, 1, 0]], [[2, 3], [1, 0]], [[1], [3, 0, 2]]]
    for step, requests in enumerate(orders):
        beads = beads + rng.normal(0, 0.01, beads.shape)
        cells = np.repeat(cell_h[None], 4, 0) * (1 + 1e-3 * step)
        for req in requests:
            got = batched.compute_batch(cells[req], beads[req])
            for g, k in zip(got, req):
                ref = single(cells[k], beads[k])
                g, e = check_result(g, len(z)), check_result(ref, len(z))
                assert g[0] == pytest.approx(e[0], rel=1e-12)
                np.testing.assert_allclose(g[1], e[1], rtol=1e-10, atol=1e-12)
                np.testing.assert_allclose(g[2], e[2], rtol=1e-10, atol=1e-12)
    steps = [ev.fast for ev in batched.slot_evaluators]
    assert len(steps) == 4 and len({id(s) for s in steps}) == 4 and len({id(s.verlet) for s in steps}) == 4
    assert all(s.verlet.builds == 1 for s in steps)  # each bead kept its own list over the 5 steps
    assert all(s.calls == 5 for s in steps)
    assert "4 Verlet list builds in 20 evaluations" in batched.neighbor_list_summary()
    assert one_call == [4, 4, 4, 2, 2, 3]  # one call per request of more than one structure


def test_ffdirect_driver_evaluates_batches_in_slots(tmp_path):
    """i-PI's ``<ffdirect>`` with ``<batch_size>`` hands the PES lists of cells and positions."""
    from ase import units

    from ekf_plugin.md.pes import EkfPluginDriver
    from ekf_plugin.md.runner import write_ipi_xyz
    from ekf_plugin.models import water_bpnn

    from ._toy import water_box

    z, r, h = water_box(2, seed=2)
    write_ipi_xyz(tmp_path / "init.xyz", ["O" if a == 8 else "H" for a in z], r, h)
    torch.save(water_bpnn(seed=0, dtype=torch.float64), tmp_path / "m.pt")
    drv = EkfPluginDriver(template=str(tmp_path / "init.xyz"), model=str(tmp_path / "m.pt"), threads=1)
    cell_h = h.T / units.Bohr
    pos = [r / units.Bohr + np.random.default_rng(k).normal(0, 0.02, r.shape) for k in range(2)]
    got = drv([cell_h, cell_h], [p.reshape(-1) for p in pos])
    assert len(got) == 2 and len(drv.model.slot_evaluators) == 2
    for g, p in zip(got, pos):
        ref = drv(cell_h, p.reshape(-1))
        assert g[0] == pytest.approx(ref[0], rel=1e-12)
        np.testing.assert_allclose(g[1], ref[1], rtol=1e-10, atol=1e-12)
