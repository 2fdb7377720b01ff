"""TCP owner: serves calls and reads for ``tcp.py``'s requesters, and is NIXL's control channel.

One accept thread plus one thread per connection, so handlers of different connections run concurrently and
calls on one connection run in order. After the handshake a connection's socket is blocking with SO_RCVTIMEO =
``io_timeout_s`` (one recv per small request); a peer that stalls mid-frame, or does not take a reply within
``io_timeout_s``, is dropped. Sizes are checked before anything is allocated: an oversized request is drained in
fixed-size chunks and refused with an ERROR frame; garbage ends only its own connection.
"""

from __future__ import annotations

import itertools
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from qroute.core.handshake import (
    NONCE_BYTES,
    PROTOCOL_VERSION,
    check_secret,
    client_proof,
    new_nonce,
    pack_fields,
    server_proof,
    unpack_fields,
    verify_proof,
)
from qroute.errors import ConfigError, ErrorCode, HandshakeMismatch, RemoteDisconnected, TransportError, WireError
from qroute.metrics import SERVER, Metrics, MetricsSnapshot
from qroute.transport.base import (
    BatchHandler,
    Buffer,
    Handler,
    HelloCheck,
    Server,
    check_read,
    region_views,
)
from qroute.transport.frames import (
    FRAME,
    MAGIC,
    MAX_ERROR_BYTES,
    MAX_HANDSHAKE_BYTES,
    MAX_READ_DESC_BYTES,
    PREFIX,
    REQ_ID,
    SERVER_HELLO,
    Kind,
    error_frame,
    recv_bytes,
    send_all,
    unpack_read,
)

_SCRATCH = 1 << 16


class SessionHooks(Protocol):
    """Lets a transport built on this control channel (NIXL) add state to each authenticated connection."""

    def attach(self, sid: int, extra: bytes) -> bytes:
        """Called once per connection after authentication; may raise HandshakeMismatch or WireError."""

    def detach(self, sid: int) -> None:
        """Called once when a connection that was attached ends."""

    def wake(self) -> None:
        """A WAKE frame arrived: the requester is about to send after a quiet spell."""


class _Session:
    """One authenticated connection on the owner: buffered blocking reads, locked sends."""

    __slots__ = ("sid", "sock", "peer", "send_lock", "_buf", "_scratch")

    def __init__(self, sid: int, sock: socket.socket, peer: str):
        self.sid, self.sock, self.peer = sid, sock, peer
        self.send_lock = threading.Lock()
        self._buf = bytearray()
        self._scratch = bytearray(_SCRATCH)

    def _recv(self, view: memoryview | bytearray, idle: bool) -> int:
        while True:
            try:
                n = self.sock.recv_into(view)
            except BlockingIOError:  # SO_RCVTIMEO expired
                if idle:
                    continue  # an idle connection may wait forever
                raise RemoteDisconnected(f"{self.peer} stalled in the middle of a frame") from None
            except InterruptedError:
                continue
            except OSError as exc:
                raise RemoteDisconnected(f"{self.peer}: {exc}") from None
            if n == 0:
                raise RemoteDisconnected(f"{self.peer} closed the connection")
            return n

    def read(self, n: int, idle: bool = False) -> bytes:
        buf = self._buf
        if n - len(buf) > _SCRATCH:  # large body: straight into its own buffer
            out = bytearray(n)
            have = len(buf)
            out[:have] = buf
            buf.clear()
            view = memoryview(out)
            while have < n:
                have += self._recv(view[have:], False)
            return bytes(out)
        while len(buf) < n:
            k = self._recv(self._scratch, idle and not buf)
            buf += memoryview(self._scratch)[:k]
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def discard(self, n: int) -> None:
        while n > 0:
            take = min(n, len(self._buf))
            if take:
                del self._buf[:take]
            else:
                take = self._recv(memoryview(self._scratch)[:min(n, _SCRATCH)], False)
            n -= take

    def send(self, parts: Sequence[Buffer], deadline: float) -> None:
        with self.send_lock:
            send_all(self.sock, parts, deadline, f"send to {self.peer}")

    def __repr__(self) -> str:
        return f"_Session({self.sid}, {self.peer})"


class TcpServer(Server):
    def __init__(self, handler: Handler, *, regions: Mapping[str, Buffer] | None, secret: bytes,
                 on_hello: HelloCheck | None, max_request_bytes: int, host: str = "127.0.0.1", port: int = 0,
                 max_connections: int = 64, handshake_timeout_s: float = 5.0, io_timeout_s: float = 30.0,
                 hooks: SessionHooks | None = None):
        if max_request_bytes <= 0:
            raise ConfigError(f"max_request_bytes must be positive, got {max_request_bytes}")
        self._handler, self._on_hello, self._hooks = handler, on_hello, hooks
        self._regions = region_views(regions)
        self._region_sizes = {k: v.nbytes for k, v in self._regions.items()}
        self._secret = check_secret(secret)
        self.max_request_bytes = max_request_bytes
        self._host, self._port, self._max_connections = host, port, max_connections
        self._handshake_timeout_s, self._io_timeout_s = handshake_timeout_s, io_timeout_s
        self._listener: socket.socket | None = None
        self._threads: set[threading.Thread] = set()
        self._socks: set[socket.socket] = set()
        self._sessions: dict[int, _Session] = {}
        self._lock = threading.Lock()
        self._running = False
        self._sids = itertools.count(1)
        self.counters = Metrics(SERVER)
        self.address = ""

    def start(self) -> str:
        if self._listener is not None:
            raise ConfigError("tcp server: start() called twice")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self._host, self._port))
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise ConfigError(f"tcp server: cannot listen on {self._host}:{self._port} ({exc}); "
                              "change the transport's host/port") from None
        listener.settimeout(0.5)  # stop() also shuts it down; the timeout is the portable fallback
        self._listener, self._running = listener, True
        self.address = f"{self._host}:{listener.getsockname()[1]}"
        self._spawn(self._accept_loop, "accept")
        return self.address

    def stop(self) -> None:
        with self._lock:
            if not self._running:
                return
            self._running = False
            socks, threads = list(self._socks), list(self._threads)
        for sock in [self._listener, *socks]:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked on it
            except OSError:
                pass
        deadline = time.monotonic() + 2.0  # a handler stuck forever must not hang stop()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=max(deadline - time.monotonic(), 0.01))
        self._listener.close()

    def stats(self) -> MetricsSnapshot:
        return self.counters.snapshot()

    def send_frame(self, sid: int, parts: Sequence[Buffer], timeout_s: float) -> None:
        """Send one frame on an attached connection from another thread (NIXL's poll thread)."""
        session = self._sessions.get(sid)
        if session is None:
            raise RemoteDisconnected(f"control connection {sid} is gone")
        session.send(parts, time.monotonic() + timeout_s)

    def invoke_batch(self, payloads: Sequence[bytes | memoryview],
                     batch_handler: BatchHandler) -> list[tuple[bool, bytes]]:
        """Run ``batch_handler`` over calls that arrived together: one ``invoke`` result per call, in order."""
        self.counters.add("calls", len(payloads))
        try:
            replies = batch_handler(payloads)
            if len(replies) != len(payloads):
                raise TypeError(f"batch handler returned {len(replies)} replies for {len(payloads)} calls")
            for reply in replies:
                if not isinstance(reply, bytes | bytearray | memoryview):
                    raise TypeError(f"handler returned {type(reply).__name__}, expected bytes")
        except Exception as exc:  # a failing handler must not kill the owner
            self.counters.add("handler_errors", len(payloads))
            error = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:MAX_ERROR_BYTES]
            return [(False, error)] * len(payloads)
        return [(True, r if isinstance(r, bytes) else bytes(r)) for r in replies]

    def invoke(self, payload: bytes) -> tuple[bool, bytes]:
        """Run the handler: (True, reply) or (False, error message). Its exceptions never escape."""
        return self.invoke_batch([payload], lambda payloads: [self._handler(payloads[0])])[0]

    # -- threads --

    def _spawn(self, target: Callable[..., None], what: str, *args: object) -> None:
        thread = threading.Thread(target=self._run_thread, args=(target, *args), daemon=True,
                                  name=f"qroute-tcp-{what}")
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run_thread(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self) -> None:
        while self._running:
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                admit = self._running and len(self._socks) < self._max_connections
                if admit:
                    self._socks.add(sock)
            if not admit:
                self.counters.add("refused")
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._serve, "conn", sock, f"{peer[0]}:{peer[1]}")

    def _serve(self, sock: socket.socket, peer: str) -> None:
        session = None
        try:
            session = self._handshake(sock, peer)
            if session is not None:
                self.counters.add("open_connections")
                # blocking receives (one syscall per small request), bounded by SO_RCVTIMEO; sends use
                # MSG_DONTWAIT and poll, so each has its own deadline
                sock.setblocking(True)
                timeval = struct.pack("ll", int(self._io_timeout_s), int(self._io_timeout_s % 1 * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                self._frames(session)
        except (TransportError, OSError):
            pass  # the peer went away, stalled or sent garbage: only this connection ends
        finally:
            if session is not None:
                self.counters.add("open_connections", -1)
                self._sessions.pop(session.sid, None)
                if self._hooks is not None:
                    self._hooks.detach(session.sid)
            with self._lock:
                self._socks.discard(sock)
            sock.close()

    def _refuse(self, sock: socket.socket, code: ErrorCode, message: str, deadline: float) -> None:
        self.counters.add("handshake_failures" if code == ErrorCode.HANDSHAKE else "protocol_errors")
        try:
            send_all(sock, [error_frame(0, code, message)], deadline, "refusal")
        except TransportError:
            pass

    def _handshake(self, sock: socket.socket, peer: str) -> _Session | None:
        deadline = time.monotonic() + self._handshake_timeout_s
        nonce = new_nonce()
        send_all(sock, [FRAME.pack(SERVER_HELLO.size, Kind.SERVER_HELLO),
                        SERVER_HELLO.pack(MAGIC, PROTOCOL_VERSION, nonce)], deadline, "handshake")
        length, kind = FRAME.unpack(recv_bytes(sock, FRAME.size, deadline, "handshake"))
        if kind != Kind.CLIENT_AUTH or length > MAX_HANDSHAKE_BYTES:
            self._refuse(sock, ErrorCode.PROTOCOL, f"expected a CLIENT_AUTH frame, got kind {kind} "
                         f"of {length} bytes", deadline)
            return None
        body = recv_bytes(sock, length, deadline, "handshake")
        sid = None
        try:
            client_nonce, proof, hello, extra = unpack_fields(body, 4)
            if len(client_nonce) != NONCE_BYTES:
                raise WireError(f"requester nonce has {len(client_nonce)} bytes")
            verify_proof(client_proof(self._secret, nonce, client_nonce, hello, extra), proof, "requester")
            reply = self._on_hello(hello) if self._on_hello is not None else b""
            sid = next(self._sids)
            extra_reply = self._hooks.attach(sid, extra) if self._hooks is not None else b""
        except (HandshakeMismatch, WireError) as exc:
            self._refuse(sock, ErrorCode.HANDSHAKE, str(exc), deadline)
            return None
        except Exception as exc:  # on_hello or the transport's setup failed: the requester must hear why
            where = "on_hello" if sid is None else "transport setup"
            self._refuse(sock, ErrorCode.HANDSHAKE, f"{where} failed: {type(exc).__name__}: {exc}", deadline)
            return None
        info = json.dumps({"regions": self._region_sizes, "max_request_bytes": self.max_request_bytes,
                           "session": sid}).encode()
        reply, extra_reply = bytes(reply), bytes(extra_reply)
        proof = server_proof(self._secret, nonce, client_nonce, reply, info, extra_reply)
        welcome = pack_fields(proof, reply, info, extra_reply)
        session = self._sessions[sid] = _Session(sid, sock, peer)
        try:
            send_all(sock, [FRAME.pack(len(welcome), Kind.WELCOME), welcome], deadline, "handshake")
        except TransportError:
            self._sessions.pop(sid, None)
            if self._hooks is not None:
                self._hooks.detach(sid)
            raise
        self.counters.add("connections")
        return session

    def _frames(self, session: _Session) -> None:
        while self._running:
            length, kind, req_id = PREFIX.unpack(session.read(PREFIX.size, idle=True))
            deadline = time.monotonic() + self._io_timeout_s
            if kind == Kind.WAKE and length == REQ_ID.size:
                if self._hooks is not None:
                    self._hooks.wake()
                continue
            if length < REQ_ID.size or kind not in (Kind.REQUEST, Kind.READ):
                self.counters.add("protocol_errors")
                session.send([error_frame(req_id, ErrorCode.PROTOCOL, f"unexpected frame kind {kind} of "
                                          f"{length} bytes")], deadline)
                return
            rest = length - REQ_ID.size
            limit = self.max_request_bytes if kind == Kind.REQUEST else MAX_READ_DESC_BYTES
            if rest > limit:
                session.discard(rest)  # keeps the stream in sync without allocating the body
                self.counters.add("refused")
                session.send([error_frame(req_id, ErrorCode.REFUSED, f"{rest} bytes is over the owner's limit of "
                                          f"{limit} bytes (max_request_bytes)")], deadline)
                continue
            body = session.read(rest)
            if kind == Kind.REQUEST:
                ok, reply = self.invoke(body)
                if ok:
                    session.send([PREFIX.pack(REQ_ID.size + len(reply), Kind.REPLY, req_id), reply], deadline)
                else:
                    session.send([error_frame(req_id, ErrorCode.HANDLER, reply.decode("utf-8", "replace"))],
                                 deadline)
            else:
                session.send(self._read_reply(req_id, body), deadline)

    def _read_reply(self, req_id: int, body: bytes) -> list[Buffer]:
        try:
            region, ranges = unpack_read(body)
            total = check_read(self._region_sizes, region, ranges, 1 << 62)
        except (ConfigError, WireError) as exc:
            self.counters.add("refused")
            return [error_frame(req_id, ErrorCode.REFUSED, str(exc))]
        self.counters.add("reads")
        self.counters.add("read_bytes", total)
        src = self._regions[region]
        # region slices go to the socket without a copy
        return [PREFIX.pack(REQ_ID.size + total, Kind.DATA, req_id), *(src[off:off + n] for off, n in ranges if n)]
