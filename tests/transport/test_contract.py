"""The transport contract (qroute/transport/base.py), run over every transport by the ``transport_name`` fixture."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from qroute.core import handshake
from qroute.errors import (
    ConfigError,
    ErrorCode,
    HandshakeMismatch,
    RemoteDisconnected,
    TransportError,
    TransportTimeout,
)
from qroute.transport import SupportsRawPing, available_transports, get_transport
from qroute.transport.frames import (
    FRAME,
    PREFIX,
    REQ_ID,
    SERVER_HELLO,
    Kind,
    client_handshake,
    parse_address,
    recv_bytes,
    send_all,
)

from .conftest import Peer
from .peer_server import MAX_REQUEST_BYTES, SECRET, PeerHandler, make_regions, on_hello, pattern

pytestmark = pytest.mark.timeout(60)
GONE = (RemoteDisconnected, TransportTimeout)


# ---- calls --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 1000, 70_000, 1 << 20])
def test_call_round_trip(conn, size):
    body = os.urandom(size - 1)
    assert conn.call(b"e" + body, 10.0) == body
    assert conn.call(b"r" + body, 10.0) == body[::-1]


def test_big_reply(conn):
    assert conn.call(b"b2000000", 10.0) == pattern(2_000_000)


def test_hello_reply_and_region_sizes(conn):
    assert conn.hello_reply == b"welcome contract"
    assert dict(conn.region_sizes) == {name: a.nbytes for name, a in make_regions().items()}


def test_post_several_then_wait_in_reverse(conn):
    # more calls than NIXL has slots, and one bigger than a slot: the surplus takes the control channel
    payloads = [bytes([i]) * (10 + 3000 * i) for i in range(10)] + [os.urandom(200_000)]
    pendings = [conn.post(b"e" + p) for p in payloads]
    for pending, payload in reversed(list(zip(pendings, payloads, strict=True))):
        assert pending.wait(10.0) == payload
        assert pending.done()
        assert pending.wait(1.0) == payload  # repeats return the same reply


def test_nixl_messages_over_a_slot_take_adjacent_slots_not_tcp(conn, transport_name):
    """A call (and its reply) over one slot but within the inbox travels over NIXL in adjacent slots; only one
    over the whole inbox takes the control channel, and is counted."""
    if transport_name != "nixl":
        pytest.skip("slots are NIXL's")
    slot_bytes, num_slots = conn.slot_bytes, len(conn._busy)
    assert (slot_bytes, num_slots) == (64 << 10, 8)  # CLIENT_OPTS: small slots, so 200 KB spans four
    before = conn.control_calls
    for size in (slot_bytes + 1, 200_000, num_slots * slot_bytes - 64):
        body = os.urandom(size - 1)
        assert conn.call(b"r" + body, 10.0) == body[::-1]  # the reply spans the same slots
    pendings = [conn.post(b"e" + bytes([k]) * 150_000) for k in range(2)]  # 3 slots each, side by side
    assert [p.wait(10.0) for p in pendings] == [bytes([k]) * 150_000 for k in range(2)]
    assert conn.control_calls == before
    assert not any(conn._busy)  # every slot came back
    body = os.urandom(num_slots * slot_bytes + 1)
    assert conn.call(b"e" + body, 10.0) == body
    assert conn.control_calls == before + 1


def test_nixl_repeated_message_sizes_reuse_their_prepared_writes(conn, transport_name, monkeypatch):
    """A call over 16 KiB (every route at real model sizes) is written with a prepared handle kept by slot and
    size: repeating it prepares nothing new, and the handles kept stay bounded however many sizes go by."""
    if transport_name != "nixl":
        pytest.skip("prepared WRITEs are NIXL's")
    from qroute.transport.nixl_agent import HANDLES_KEPT, live_counts

    prepared = []
    prepare = conn._agent.xfer
    monkeypatch.setattr(conn._agent, "xfer", lambda *a: prepared.append(a[-1]) or prepare(*a))  # counts, then prepares
    body = os.urandom(40_000)
    assert conn.call(b"e" + body, 10.0) == body
    assert len(prepared) == 1
    held = live_counts()["xfer_handles"]
    for _ in range(20):
        assert conn.call(b"e" + body, 10.0) == body
    assert len(prepared) == 1 and live_counts()["xfer_handles"] == held  # reposted, not prepared again
    for size in range(20_000, 20_000 + 100 * (HANDLES_KEPT + 10), 100):  # more sizes than are kept
        assert conn.call(b"e" + bytes(size), 10.0) == bytes(size)
    assert len(conn._handles) == HANDLES_KEPT
    assert live_counts()["xfer_handles"] <= held + HANDLES_KEPT


def test_done_makes_progress_without_wait(conn):
    pending = conn.post(b"eabc")
    deadline = time.monotonic() + 5.0
    while not pending.done():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert pending.wait(0.001) == b"abc"


def test_two_connections_to_one_owner(transport, peer):
    a = transport.connect(peer.address, secret=SECRET, timeout_s=10.0)
    b = transport.connect(peer.address, secret=SECRET, timeout_s=10.0)
    try:
        assert a.call(b"ea", 5.0) == b"a" and b.call(b"eb", 5.0) == b"b"
        a.close()
        assert b.call(b"eb", 5.0) == b"b"
        out = np.zeros(16, np.uint8)
        b.read("corpus", [(0, 16)], out, 5.0)
        assert np.array_equal(out, make_regions()["corpus"][:16])
    finally:
        a.close()
        b.close()


def test_threads_share_one_connection(conn):
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(40):
                payload = f"{k}:{i}:".encode() * (1 + i)
                assert conn.call(b"r" + payload, 10.0) == payload[::-1]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


def test_handler_exception_is_reported_and_server_keeps_serving(conn):
    with pytest.raises(TransportError, match="ValueError: boom: bad input"):
        conn.call(b"xbad input", 5.0)
    with pytest.raises(TransportError, match="KeyError"):
        conn.call(b"?", 5.0)
    with pytest.raises(TransportError, match="unknown op b''"):  # an empty payload still reaches the handler
        conn.call(b"", 5.0)
    assert conn.call(b"estill here", 5.0) == b"still here"


def test_oversized_request_is_refused_and_server_keeps_serving(conn):
    with pytest.raises(TransportError, match="max_request_bytes"):
        conn.call(b"e" + bytes(MAX_REQUEST_BYTES), 10.0)
    assert conn.call(b"eok", 5.0) == b"ok"


def test_timeout_then_late_reply_is_matched(conn):
    with pytest.raises(TransportTimeout):
        conn.call(b"s0.4", 0.1)
    assert conn.call(b"enext", 5.0) == b"next"  # the late reply to the first call must not answer this one
    pending = conn.post(b"s0.2")
    with pytest.raises(TransportTimeout):
        pending.wait(0.02)
    assert pending.wait(5.0) == b"slept"


def test_first_call_after_a_quiet_spell_is_prompt(conn):
    # an idle NIXL owner sleeps until rung; a lost ring would cost its 50 ms fallback timer
    times = []
    for quiet_s in (0.1, 0.13, 0.17):  # varied, so the owner's timer phase differs between tries
        time.sleep(quiet_s)
        start = time.monotonic()
        assert conn.call(b"ehi", 5.0) == b"hi"
        times.append(time.monotonic() - start)
    assert sorted(times)[1] < 0.01, times


def test_bad_timeouts_are_refused(conn):
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="timeout_s"):
            conn.call(b"e", bad)


def test_close_is_safe_twice_and_later_use_raises(transport, peer):
    c = transport.connect(peer.address, secret=SECRET, timeout_s=10.0)
    assert c.call(b"e1", 5.0) == b"1"
    c.close()
    c.close()
    with pytest.raises(RemoteDisconnected):
        c.call(b"e1", 1.0)


# ---- reads --------------------------------------------------------------------------------------------------


def test_read_ranges(conn):
    corpus = make_regions()["corpus"]
    ranges = [(0, 1), (12_345, 4096), (corpus.nbytes - 10, 10), (500, 0), (600_000, 30_000), (7, 3)]
    out = np.full(40_000, 0xAB, np.uint8)
    conn.read("corpus", ranges, out, 5.0)
    expected = np.concatenate([corpus[o:o + n] for o, n in ranges])
    assert np.array_equal(out[:expected.nbytes], expected)
    assert (out[expected.nbytes:] == 0xAB).all()  # nothing past the ranges is written


def test_read_whole_region_into_large_buffer(conn):
    corpus = make_regions()["corpus"]
    out = np.zeros(corpus.nbytes, np.uint8)
    conn.read("corpus", [(0, corpus.nbytes)], out, 5.0)
    assert np.array_equal(out, corpus)


def test_read_into_torch_tensor(conn):
    torch = pytest.importorskip("torch")
    rows = make_regions()["rows"]
    out = torch.zeros(16, 64, dtype=torch.float32)
    row_bytes = rows.shape[1] * 4
    conn.read("rows", [(10 * row_bytes, 8 * row_bytes), (50 * row_bytes, 8 * row_bytes)], out, 5.0)
    assert torch.equal(out, torch.from_numpy(np.concatenate([rows[10:18], rows[50:58]])))


def test_nixl_repeated_reads_reuse_their_prepared_handle(conn, transport_name, monkeypatch):
    """A decode step reads the same blocks of a layer as the step before: the READ of a (region, ranges) pair is
    prepared once and reposted, every read still lands its own bytes, and the handles kept stay bounded."""
    if transport_name != "nixl":
        pytest.skip("prepared READs are NIXL's")
    from qroute.transport.nixl_agent import READS_KEPT, live_counts

    corpus = make_regions()["corpus"]
    prepared = []
    prepare = conn._agent.xfer
    monkeypatch.setattr(conn._agent, "xfer", lambda *a: prepared.append(a[-1]) or prepare(*a))  # counts, then prepares
    ranges = [(4096, 30_000), (200_000, 20_000)]
    expected = np.concatenate([corpus[o:o + n] for o, n in ranges])
    for _ in range(10):
        out = np.zeros(expected.nbytes, np.uint8)
        conn.read("corpus", ranges, out, 5.0)
        assert np.array_equal(out, expected)
    assert prepared == ["read corpus"]  # one preparation for ten reads
    held = live_counts()["xfer_handles"]
    for k in range(READS_KEPT + 20):  # more distinct reads than are kept
        out = np.zeros(100, np.uint8)
        conn.read("corpus", [(k * 100, 100)], out, 5.0)
        assert np.array_equal(out, corpus[k * 100:k * 100 + 100])
    assert len(conn._reads) == READS_KEPT
    assert live_counts()["xfer_handles"] <= held + READS_KEPT


def test_nixl_reads_grow_the_staging_buffer_up_to_its_bound(peer, transport_name):
    """A read over the staging buffer grows it (once, to a power of two) and is kept prepared like any other; one
    over ``staging_max_bytes`` registers the caller's buffer for the call and keeps nothing."""
    if transport_name != "nixl":
        pytest.skip("the staging buffer is NIXL's")
    from qroute.transport.nixl_agent import live_counts

    corpus = make_regions()["corpus"]
    transport = get_transport("nixl", staging_bytes=4096, staging_max_bytes=64 << 10)
    conn = transport.connect(peer.address, secret=SECRET, hello=b"contract", timeout_s=10.0)
    try:
        assert conn._buffers["staging"].nbytes == 4096
        out = np.zeros(40_000, np.uint8)
        conn.read("corpus", [(1000, 40_000)], out, 5.0)
        assert np.array_equal(out, corpus[1000:41_000])
        assert conn._buffers["staging"].nbytes == 64 << 10 and len(conn._reads) == 1  # grown to 2^16
        registrations = live_counts()["registrations"]
        big = np.zeros(100_000, np.uint8)
        for _ in range(3):
            conn.read("corpus", [(500_000, 100_000)], big, 5.0)
            assert np.array_equal(big, corpus[500_000:600_000])
        assert conn._buffers["staging"].nbytes == 64 << 10 and len(conn._reads) == 1  # over the bound: not kept
        assert live_counts()["registrations"] == registrations  # the caller's buffer was registered and released
    finally:
        conn.close()
        transport.close()
    with pytest.raises(ConfigError, match="staging_max_bytes"):
        get_transport("nixl", staging_bytes=1 << 20, staging_max_bytes=1 << 16)


def test_bad_reads_are_refused_before_any_transfer(conn):
    out = np.zeros(100, np.uint8)
    with pytest.raises(ConfigError, match="unknown region"):
        conn.read("secret", [(0, 10)], out, 5.0)
    with pytest.raises(ConfigError, match="outside region"):
        conn.read("corpus", [((1 << 20) - 5, 10)], out, 5.0)
    with pytest.raises(ConfigError, match="outside region"):
        conn.read("corpus", [(-1, 10)], out, 5.0)
    with pytest.raises(ConfigError, match="out holds only"):
        conn.read("corpus", [(0, 101)], out, 5.0)
    with pytest.raises(ConfigError, match="read-only"):
        conn.read("corpus", [(0, 10)], bytes(100), 5.0)
    assert conn.call(b"eok", 5.0) == b"ok"


# ---- handshake ----------------------------------------------------------------------------------------------


def test_wrong_secret_is_refused_and_server_keeps_serving(transport, peer):
    with pytest.raises(HandshakeMismatch, match="secret"):
        transport.connect(peer.address, secret=b"not the secret", timeout_s=5.0)
    with transport.connect(peer.address, secret=SECRET, timeout_s=10.0) as c:
        assert c.call(b"eok", 5.0) == b"ok"


def test_on_hello_rejection_reaches_the_requester(transport, peer):
    with pytest.raises(HandshakeMismatch, match="corpus fingerprint mismatch: owner serves corpus v1"):
        transport.connect(peer.address, secret=SECRET, hello=b"reject me", timeout_s=5.0)
    with transport.connect(peer.address, secret=SECRET, hello=b"fine", timeout_s=10.0) as c:
        assert c.hello_reply == b"welcome fine"


def test_garbage_on_the_socket_does_not_kill_the_server(transport, peer):
    if peer.socket_address is None:
        pytest.skip(f"{peer.name} has no socket to send garbage to")
    host, port = parse_address(peer.socket_address)
    garbage = [
        b"",
        os.urandom(1000),
        FRAME.pack(0xFFFFFFFF, Kind.CLIENT_AUTH) + b"x" * 100,  # absurd length: never allocated
        FRAME.pack(40, Kind.CLIENT_AUTH) + os.urandom(40),  # malformed fields
        FRAME.pack(10, 99)[:3],  # half a header
    ]
    for junk in garbage:
        with socket.create_connection((host, port), timeout=5.0) as s:
            recv_bytes(s, FRAME.size + 38, time.monotonic() + 5.0, "server hello")
            s.sendall(junk)
    if transport.name == "tcp":  # NIXL's control port runs the same code, but a raw session needs agent metadata
        _raw_session_abuse(peer.socket_address)
    with transport.connect(peer.address, secret=SECRET, timeout_s=10.0) as c:
        assert c.call(b"estill serving", 5.0) == b"still serving"


def _client_auth(sock: socket.socket, hello: bytes, deadline: float) -> tuple[bytes, bytes]:
    """Read the owner's SERVER_HELLO and build a valid CLIENT_AUTH frame for it: (frame, server nonce)."""
    length, kind = FRAME.unpack(recv_bytes(sock, FRAME.size, deadline, "server hello"))
    _, _, server_nonce = SERVER_HELLO.unpack(recv_bytes(sock, length, deadline, "server hello"))
    client_nonce = handshake.new_nonce()
    proof = handshake.client_proof(SECRET, server_nonce, client_nonce, hello, b"")
    body = handshake.pack_fields(client_nonce, proof, hello, b"")
    return FRAME.pack(len(body), Kind.CLIENT_AUTH) + body, server_nonce


def _handshake_answer(sock: socket.socket, frame: bytes, deadline: float) -> tuple[int, bytes]:
    sock.sendall(frame)
    length, kind = FRAME.unpack(recv_bytes(sock, FRAME.size, deadline, "answer"))
    return kind, recv_bytes(sock, length, deadline, "answer")


def test_a_recorded_client_auth_cannot_be_replayed_or_altered(transport, peer):
    """The proofs bind both nonces and the hello: a CLIENT_AUTH seen on the network opens no other connection,
    and its hello cannot be swapped for another one."""
    if transport.name != "tcp":
        pytest.skip("a raw handshake needs a TCP owner port (NIXL's control port adds agent metadata)")
    address = parse_address(peer.socket_address)
    deadline = time.monotonic() + 10.0
    with socket.create_connection(address, timeout=5.0) as s:
        recorded, _ = _client_auth(s, b"fine", deadline)
        assert _handshake_answer(s, recorded, deadline)[0] == Kind.WELCOME  # the genuine handshake passes
    with socket.create_connection(address, timeout=5.0) as s:
        recv_bytes(s, FRAME.size + SERVER_HELLO.size, deadline, "server hello")  # a fresh nonce
        kind, body = _handshake_answer(s, recorded, deadline)
        assert (kind, body[REQ_ID.size]) == (Kind.ERROR, ErrorCode.HANDSHAKE)
        assert b"failed to prove the shared secret" in body
    with socket.create_connection(address, timeout=5.0) as s:
        frame, _ = _client_auth(s, b"fine", deadline)
        spliced = frame.replace(b"fine", b"evil")  # same proof, other hello
        kind, body = _handshake_answer(s, spliced, deadline)
        assert (kind, body[REQ_ID.size]) == (Kind.ERROR, ErrorCode.HANDSHAKE)
    with transport.connect(peer.address, secret=SECRET, timeout_s=10.0) as c:
        assert c.call(b"estill serving", 5.0) == b"still serving"


def _raw_session_abuse(address: str) -> None:
    with socket.create_connection(parse_address(address), timeout=5.0) as s:
        s.setblocking(False)
        deadline = time.monotonic() + 10.0
        client_handshake(s, address, SECRET, b"", b"", deadline)
        # a malformed read descriptor is refused; the connection stays usable
        send_all(s, [PREFIX.pack(REQ_ID.size + 3, Kind.READ, 7), b"\xff\xff\xff"], deadline, "raw")
        kind, req_id, body = _read_frame(s, deadline)
        assert (kind, req_id, body[0]) == (Kind.ERROR, 7, ErrorCode.REFUSED)
        # an oversized request the client library would not send is drained and refused
        big = MAX_REQUEST_BYTES + 1
        send_all(s, [PREFIX.pack(REQ_ID.size + big, Kind.REQUEST, 8), bytes(big)], deadline, "raw")
        kind, req_id, body = _read_frame(s, deadline)
        assert (kind, req_id, body[0]) == (Kind.ERROR, 8, ErrorCode.REFUSED)
        send_all(s, [PREFIX.pack(REQ_ID.size + 3, Kind.REQUEST, 9), b"eok"], deadline, "raw")
        assert _read_frame(s, deadline) == (Kind.REPLY, 9, b"ok")
        send_all(s, [PREFIX.pack(REQ_ID.size, 99, 10)], deadline, "raw")  # unknown kind: this connection ends
        assert _read_frame(s, deadline)[0] == Kind.ERROR


def _read_frame(s: socket.socket, deadline: float) -> tuple[int, int, bytes]:
    length, kind, req_id = PREFIX.unpack(recv_bytes(s, PREFIX.size, deadline, "raw"))
    return kind, req_id, recv_bytes(s, length - REQ_ID.size, deadline, "raw")


# ---- failures -----------------------------------------------------------------------------------------------


def test_killed_owner_fails_fast(transport, fresh_peer: Peer):
    c = transport.connect(fresh_peer.address, secret=SECRET, timeout_s=10.0)
    try:
        assert c.call(b"eup", 5.0) == b"up"
        pending = c.post(b"s3")
        fresh_peer.kill()
        start = time.monotonic()
        with pytest.raises(GONE):
            pending.wait(2.0)
        with pytest.raises(GONE):
            c.call(b"eanyone?", 2.0)
        with pytest.raises(GONE):
            c.read("corpus", [(0, 10)], np.zeros(10, np.uint8), 2.0)
        assert time.monotonic() - start < 2.0 * 3 + 1.0  # each bounded by its deadline; no hang
    finally:
        c.close()


def test_killed_owner_is_detected_before_the_deadline(transport, fresh_peer: Peer):
    c = transport.connect(fresh_peer.address, secret=SECRET, timeout_s=10.0)
    try:
        pending = c.post(b"s3")
        fresh_peer.kill()
        start = time.monotonic()
        with pytest.raises(RemoteDisconnected):
            pending.wait(5.0)
        assert time.monotonic() - start < 2.0  # the owner's socket EOF, not the deadline
    finally:
        c.close()


def test_stopped_owner_times_out_then_recovers(transport, fresh_peer: Peer):
    c = transport.connect(fresh_peer.address, secret=SECRET, timeout_s=10.0)
    try:
        assert c.call(b"eup", 5.0) == b"up"
        fresh_peer.pause()
        start = time.monotonic()
        with pytest.raises(TransportTimeout):
            c.call(b"estalled", 1.0)
        assert 0.9 <= time.monotonic() - start < 2.0
        # a read needs no owner CPU on NIXL (it succeeds) but does on TCP (it times out): either way, `out`
        # must not be written once read() has raised
        out = np.zeros(4096, np.uint8)
        timed_out = False
        try:
            c.read("corpus", [(0, 4096)], out, 0.5)
            assert np.array_equal(out, make_regions()["corpus"][:4096])
        except TransportTimeout:
            timed_out = True
            out[:] = 7
        fresh_peer.resume()
        assert c.call(b"eback", 10.0) == b"back"
        assert not timed_out or (out == 7).all()
    finally:
        fresh_peer.resume()
        c.close()


def test_in_process_server_lifecycle_and_stats(transport):
    server = transport.server(PeerHandler(), regions=make_regions(), secret=SECRET, on_hello=on_hello,
                              max_request_bytes=1 << 16)
    address = server.start()
    try:
        c = transport.connect(address, secret=SECRET, timeout_s=10.0)
        assert c.call(b"eone", 5.0) == b"one"
        with pytest.raises(TransportError):
            c.call(b"xtwo", 5.0)
        with pytest.raises(HandshakeMismatch):
            transport.connect(address, secret=b"wrong", timeout_s=5.0)
        stats = server.stats().counters
        assert (stats["calls"], stats["handler_errors"], stats["connections"], stats["open_connections"]) == (
            2, 1, 1, 1)  # fmt: skip
        assert stats["handshake_failures"] == 1
    finally:
        server.stop()
        server.stop()
    start = time.monotonic()
    with pytest.raises(GONE):
        c.call(b"eafter stop", 2.0)
    assert time.monotonic() - start < 3.0
    c.close()


def test_connect_to_nobody_fails(transport):
    address = "loopback:999999" if transport.name == "loopback" else f"127.0.0.1:{_free_port()}"
    with pytest.raises(RemoteDisconnected):
        transport.connect(address, secret=SECRET, timeout_s=2.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- optional features and the registry ---------------------------------------------------------------------


def test_raw_notification_ping(conn):
    if not isinstance(conn, SupportsRawPing):
        pytest.skip(f"{type(conn).__name__} does not support raw pings")
    rtts = conn.raw_notif_rtt(100, 5.0)
    assert len(rtts) == 100 and all(0 < t < 1.0 for t in rtts)


def test_registry_lists_names_and_rejects_unknown():
    assert available_transports() == ["loopback", "nixl", "tcp"]
    with pytest.raises(ConfigError, match="loopback, nixl, tcp"):
        get_transport("carrier-pigeon")
    with pytest.raises(ConfigError, match="bad option"):
        get_transport("tcp", colour="blue")


def test_transport_modules_import_without_torch_nixl_or_engines():
    code = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'nixl', 'vllm', 'sglang'}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "for m in ['loopback', 'tcp', 'tcp_owner', 'frames', 'nixl', 'nixl_owner', 'nixl_agent']:\n"
        "    importlib.import_module('qroute.transport.' + m)\n"
        "from qroute.transport import get_transport\n"
        "t = get_transport('nixl')\n"
        "try:\n"
        "    t.server(lambda b: b, secret=b's')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ConfigError" in result.stdout and "pip install --no-deps nixl" in result.stdout
