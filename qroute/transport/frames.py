"""The TCP wire format and socket helpers shared by the TCP transport and NIXL's control channel.

Frame: 5-byte header (4-byte big-endian body length, 1-byte ``Kind``), then the body. After the handshake every
body starts with an 8-byte request id (``PREFIX`` = header + id = 13 bytes).
  REQUEST  id, payload                      REPLY  id, payload
  READ     id, u16 name length, name, u32 count, count x (u64 offset, u64 length)
  DATA     id, the ranges' bytes concatenated
  ERROR    id, u8 ``ErrorCode``, UTF-8 message (at most MAX_ERROR_BYTES)
  WAKE     id 0, no body: rouses an owner's poll thread from deep sleep (NIXL); never answered
Handshake (``qroute.core.handshake``): SERVER_HELLO (magic, version, nonce) -> CLIENT_AUTH (fields: nonce, proof,
hello, transport extra) -> WELCOME (fields: proof, hello reply, JSON info, transport extra) or ERROR(HANDSHAKE) with
id 0. Each proof covers both nonces and the other fields of its frame.
"""

from __future__ import annotations

import enum
import json
import math
import select
import socket
import struct
from collections.abc import Sequence

import numpy as np

from qroute.core.handshake import (
    PROTOCOL_VERSION,
    client_proof,
    new_nonce,
    pack_fields,
    server_proof,
    unpack_fields,
    verify_proof,
)
from qroute.errors import (
    ConfigError,
    ErrorCode,
    HandshakeMismatch,
    RemoteDisconnected,
    TransportError,
    TransportTimeout,
    WireError,
)
from qroute.transport.base import (
    Buffer,
    remaining,
)

FRAME = struct.Struct(">IB")  # body length, kind
REQ_ID = struct.Struct(">Q")
PREFIX = struct.Struct(">IBQ")  # header + request id
SERVER_HELLO = struct.Struct(">4sH32s")  # magic, protocol version, nonce
MAGIC = b"QRT\x01"
MAX_HANDSHAKE_BYTES = 4 << 20
MAX_READ_DESC_BYTES = 1 << 20
MAX_ERROR_BYTES = 1 << 16
IOV_MAX = 512
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


class Kind(enum.IntEnum):
    SERVER_HELLO = 1
    CLIENT_AUTH = 2
    WELCOME = 3
    REQUEST = 4
    REPLY = 5
    ERROR = 6
    READ = 7
    DATA = 8
    WAKE = 9


# ---- socket helpers: every wait has a deadline (None = forever) ---------------------------------------------


def wait_fd(sock: socket.socket, events: int, deadline: float | None, what: str) -> None:
    poller = select.poll()
    poller.register(sock, events)
    while True:
        if deadline is None:
            ms = None
        else:
            left = remaining(deadline)
            if left <= 0:
                raise TransportTimeout(f"{what}: deadline passed")
            ms = max(1, math.ceil(left * 1000))
        try:
            if poller.poll(ms):
                return
        except InterruptedError:
            continue


def send_all(sock: socket.socket, buffers: Sequence[Buffer], deadline: float | None, what: str) -> None:
    """Send ``buffers`` as one stream (gather I/O). MSG_DONTWAIT makes even a blocking socket wait in poll, so
    the deadline holds whatever the socket's own timeouts are."""
    if len(buffers) <= IOV_MAX:
        try:  # fast path: one syscall
            sent = sock.sendmsg(buffers, (), _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise RemoteDisconnected(f"{what}: {exc}") from None
        if sent == sum(memoryview(b).nbytes for b in buffers):
            return
    else:
        sent = 0
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
    i = 0
    while True:  # skip what the fast path sent, then loop on partial sends
        while i < len(views) and sent >= views[i].nbytes:
            sent -= views[i].nbytes
            i += 1
        if i == len(views):
            return
        if sent:
            views[i], sent = views[i][sent:], 0
        try:
            sent = sock.sendmsg(views[i:i + IOV_MAX], (), _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            wait_fd(sock, select.POLLOUT, deadline, what)
            sent = 0
        except OSError as exc:
            raise RemoteDisconnected(f"{what}: {exc}") from None


def recv_into(sock: socket.socket, view: memoryview, deadline: float | None, what: str) -> int:
    """Receive at least one byte into ``view`` (non-blocking socket); EOF raises RemoteDisconnected."""
    while True:
        try:
            n = sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            wait_fd(sock, select.POLLIN, deadline, what)
            continue
        except OSError as exc:
            raise RemoteDisconnected(f"{what}: {exc}") from None
        if n == 0:
            raise RemoteDisconnected(f"{what}: peer closed the connection")
        return n


def recv_bytes(sock: socket.socket, n: int, deadline: float | None, what: str) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        got += recv_into(sock, view[got:], deadline, what)
    return bytes(buf)


# ---- messages -----------------------------------------------------------------------------------------------


def error_frame(req_id: int, code: ErrorCode, message: str) -> bytes:
    body = REQ_ID.pack(req_id) + bytes([code]) + message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    return FRAME.pack(len(body), Kind.ERROR) + body


def error_from_frame(code: int, message: str) -> TransportError:
    if code == ErrorCode.HANDLER:
        return TransportError(f"owner handler failed: {message}")
    if code == ErrorCode.REFUSED:
        return TransportError(f"owner refused the request: {message}")
    return TransportError(f"owner reported a protocol error: {message}")


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"address {address!r}: expected HOST:PORT as returned by Server.start()")
    return host.strip("[]"), int(port)


def pack_read(region: str, ranges: Sequence[tuple[int, int]]) -> bytes:
    name = region.encode()
    flat = np.asarray(ranges, dtype=">u8").reshape(-1) if len(ranges) else np.zeros(0, ">u8")
    return struct.pack(">H", len(name)) + name + struct.pack(">I", len(ranges)) + flat.tobytes()


def unpack_read(body: bytes) -> tuple[str, list[tuple[int, int]]]:
    try:
        (name_len,) = struct.unpack_from(">H", body, 0)
        region = body[2:2 + name_len].decode()
        (count,) = struct.unpack_from(">I", body, 2 + name_len)
        start = 6 + name_len
        if len(body) != start + 16 * count:
            raise WireError(f"read descriptor: {len(body)} bytes for {count} ranges")
        flat = np.frombuffer(body, dtype=">u8", offset=start, count=2 * count)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"read descriptor malformed: {exc}") from None
    if count and int(flat.max()) >= 1 << 62:
        raise WireError("read descriptor: offset or length out of range")
    pairs = flat.astype(np.int64).tolist()
    return region, list(zip(pairs[0::2], pairs[1::2], strict=True))


# ---- requester's half of the handshake ----------------------------------------------------------------------


def _read_handshake_frame(sock: socket.socket, deadline: float, address: str) -> tuple[int, bytes]:
    header = recv_bytes(sock, FRAME.size, deadline, f"handshake with {address}")
    length, kind = FRAME.unpack(header)
    if length > MAX_HANDSHAKE_BYTES:
        raise HandshakeMismatch(f"{address} is not a qroute owner (handshake frame of {length} bytes)")
    return kind, recv_bytes(sock, length, deadline, f"handshake with {address}")


def client_handshake(sock: socket.socket, address: str, secret: bytes, hello: bytes, extra: bytes,
                     deadline: float) -> tuple[bytes, dict, bytes]:
    """Authenticate both ways; returns (hello reply, owner info, owner's transport extra)."""
    kind, body = _read_handshake_frame(sock, deadline, address)
    if kind != Kind.SERVER_HELLO or len(body) != SERVER_HELLO.size:
        raise HandshakeMismatch(f"{address} is not a qroute owner (first frame kind {kind})")
    magic, version, server_nonce = SERVER_HELLO.unpack(body)
    if magic != MAGIC or version != PROTOCOL_VERSION:
        raise HandshakeMismatch(f"{address} speaks transport protocol {magic!r} v{version}; "
                                f"this requester speaks {MAGIC!r} v{PROTOCOL_VERSION}")
    client_nonce = new_nonce()
    auth = pack_fields(client_nonce, client_proof(secret, server_nonce, client_nonce, hello, extra), hello, extra)
    send_all(sock, [FRAME.pack(len(auth), Kind.CLIENT_AUTH), auth], deadline, f"handshake with {address}")
    kind, body = _read_handshake_frame(sock, deadline, address)
    if kind == Kind.ERROR:
        message = body[REQ_ID.size + 1:].decode("utf-8", "replace")
        if len(body) > REQ_ID.size and body[REQ_ID.size] == ErrorCode.HANDSHAKE:
            raise HandshakeMismatch(message)
        raise TransportError(f"owner {address} refused the handshake: {message}")
    if kind != Kind.WELCOME:
        raise HandshakeMismatch(f"{address}: unexpected handshake frame kind {kind}")
    try:
        proof, hello_reply, info_json, extra_reply = unpack_fields(body, 4)
        info = json.loads(info_json)
    except (WireError, ValueError) as exc:
        raise HandshakeMismatch(f"{address}: malformed WELCOME: {exc}") from None
    verify_proof(server_proof(secret, server_nonce, client_nonce, hello_reply, info_json, extra_reply), proof, "owner")
    return hello_reply, info, extra_reply
