"""In-process transport: real code, no sockets. Used by unit tests of the layers above.

The server runs its handler on one worker thread (like a real owner, the requester's thread only waits), so
deadlines, handler errors, size limits and ``stop()`` behave as on the wire. Reads copy from the region in the
requester's thread, as a one-sided read would. Addresses are ``loopback:<n>`` and are valid in this process.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Mapping, Sequence

from qroute.core.handshake import check_secret, client_proof, new_nonce, server_proof, verify_proof
from qroute.errors import ConfigError, HandshakeMismatch, RemoteDisconnected, TransportError, TransportTimeout
from qroute.metrics import SERVER, Metrics, MetricsSnapshot
from qroute.transport.base import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_TIMEOUT_S,
    BatchHandler,
    Buffer,
    Connection,
    Handler,
    HelloCheck,
    PendingCall,
    Server,
    Transport,
    byte_view,
    check_read,
    deadline_after,
    region_views,
)

_SERVERS: dict[str, LoopbackServer] = {}
_SERVERS_LOCK = threading.Lock()
_NEXT_ADDRESS = itertools.count(1)


class LoopbackPending(PendingCall):
    __slots__ = ("_event", "_result", "_error")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._result: bytes | None = None
        self._error: BaseException | None = None

    def _finish(self, result: bytes | None = None, error: BaseException | None = None) -> None:
        if not self._event.is_set():
            self._result, self._error = result, error
            self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
        deadline_after(timeout_s)  # validates timeout_s
        if not self._event.wait(timeout_s):
            raise TransportTimeout(f"loopback call: no reply within {timeout_s:.3g} s")
        if self._error is not None:
            raise type(self._error)(*self._error.args)  # a fresh instance: repeats must not chain tracebacks
        assert self._result is not None
        return self._result

    def __repr__(self) -> str:
        return f"LoopbackPending(done={self.done()})"


class LoopbackServer(Server):
    def __init__(self, handler: Handler, *, regions: Mapping[str, Buffer] | None, secret: bytes,
                 on_hello: HelloCheck | None, max_request_bytes: int):
        if max_request_bytes <= 0:
            raise ConfigError(f"max_request_bytes must be positive, got {max_request_bytes}")
        self._handler = handler
        self._regions = region_views(regions)
        self._secret = check_secret(secret)
        self._on_hello = on_hello
        self.max_request_bytes = max_request_bytes
        self.address = ""
        self._queue: queue.SimpleQueue[tuple[bytes, LoopbackPending] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._running = False
        self._lock = threading.Lock()
        self._inflight: set[LoopbackPending] = set()
        self._counters = Metrics(SERVER)

    def start(self) -> str:
        with self._lock:
            if self._running or self.address:
                raise ConfigError("loopback server: start() called twice")
            self._running = True
            self.address = f"loopback:{next(_NEXT_ADDRESS)}"
            self._worker = threading.Thread(target=self._serve, name=f"qroute-{self.address}", daemon=True)
            self._worker.start()
        with _SERVERS_LOCK:
            _SERVERS[self.address] = self
        return self.address

    def stop(self) -> None:
        with _SERVERS_LOCK:
            _SERVERS.pop(self.address, None)
        with self._lock:
            if not self._running:
                return
            self._running = False
            doomed = list(self._inflight)
            self._inflight.clear()
        self._queue.put(None)
        for pending in doomed:
            pending._finish(error=RemoteDisconnected(f"{self.address} stopped"))
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=1.0)  # a handler stuck forever must not hang stop()

    def stats(self) -> MetricsSnapshot:
        return self._counters.snapshot()

    # -- called by LoopbackConnection --

    def _accept(self, server_nonce: bytes, client_nonce: bytes, proof: bytes, hello: bytes) -> tuple[bytes, bytes]:
        try:
            verify_proof(client_proof(self._secret, server_nonce, client_nonce, hello), proof, "requester")
            reply = self._on_hello(hello) if self._on_hello is not None else b""
        except HandshakeMismatch:
            self._counters.add("handshake_failures")
            raise
        except Exception as exc:  # the application check failed: the requester must hear why
            self._counters.add("handshake_failures")
            raise HandshakeMismatch(f"on_hello failed: {type(exc).__name__}: {exc}") from None
        self._counters.add("connections")
        self._counters.add("open_connections")
        reply = bytes(reply)
        return server_proof(self._secret, server_nonce, client_nonce, reply), reply

    def _submit(self, payload: bytes) -> LoopbackPending:
        pending = LoopbackPending()
        with self._lock:
            if not self._running:
                raise RemoteDisconnected(f"{self.address} is stopped")
            if len(payload) > self.max_request_bytes:
                self._counters.add("refused")
                raise TransportError(f"request of {len(payload)} bytes refused: over the owner's "
                                     f"max_request_bytes={self.max_request_bytes}")
            self._inflight.add(pending)
        self._queue.put((bytes(payload), pending))  # a copy: the handler must not see later edits
        return pending

    def _read(self, region: str, ranges: Sequence[tuple[int, int]], out: Buffer) -> None:
        if not self._running:
            raise RemoteDisconnected(f"{self.address} is stopped")
        dst = byte_view(out, writable=True, what="read out")
        check_read({k: v.nbytes for k, v in self._regions.items()}, region, ranges, dst.nbytes)
        src = self._regions[region]
        pos = 0
        for offset, length in ranges:
            dst[pos:pos + length] = src[offset:offset + length]
            pos += length
        self._counters.add("reads")
        self._counters.add("read_bytes", pos)

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            payload, pending = item
            if pending.done():  # failed by stop()
                continue
            self._counters.add("calls")
            try:
                reply = self._handler(payload)
                if not isinstance(reply, bytes | bytearray | memoryview):
                    raise TypeError(f"handler returned {type(reply).__name__}, expected bytes")
                pending._finish(result=bytes(reply))
            except Exception as exc:  # a failing handler must not kill the owner
                self._counters.add("handler_errors")
                pending._finish(error=TransportError(f"owner handler failed: {type(exc).__name__}: {exc}"))
            with self._lock:
                self._inflight.discard(pending)


class LoopbackConnection(Connection):
    def __init__(self, server: LoopbackServer, hello_reply: bytes):
        self._server = server
        self.hello_reply = hello_reply
        self.region_sizes = {k: v.nbytes for k, v in server._regions.items()}
        self._closed = False

    def _live_server(self) -> LoopbackServer:
        if self._closed:
            raise RemoteDisconnected(f"connection to {self._server.address} is closed")
        return self._server

    def post(self, payload: bytes, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> PendingCall:
        deadline_after(timeout_s)
        return self._live_server()._submit(payload)

    def read(self, region: str, ranges: Sequence[tuple[int, int]], out: Buffer,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        deadline_after(timeout_s)
        self._live_server()._read(region, ranges, out)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._server._counters.add("open_connections", -1)

    def __repr__(self) -> str:
        return f"LoopbackConnection({self._server.address}, closed={self._closed})"


class LoopbackTransport(Transport):
    name = "loopback"

    def server(self, handler: Handler, *, regions: Mapping[str, Buffer] | None = None, secret: bytes,
               on_hello: HelloCheck | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               batch_handler: BatchHandler | None = None) -> LoopbackServer:  # calls come one at a time: handler only
        return LoopbackServer(handler, regions=regions, secret=secret, on_hello=on_hello,
                              max_request_bytes=max_request_bytes)

    def connect(self, address: str, *, secret: bytes, hello: bytes = b"",
                timeout_s: float = DEFAULT_TIMEOUT_S) -> LoopbackConnection:
        deadline_after(timeout_s)
        secret = check_secret(secret)
        with _SERVERS_LOCK:
            server = _SERVERS.get(address)
        if server is None:
            raise RemoteDisconnected(f"no loopback server at {address!r} in this process")
        server_nonce, client_nonce = new_nonce(), new_nonce()
        hello = bytes(hello)
        proof, hello_reply = server._accept(server_nonce, client_nonce,
                                            client_proof(secret, server_nonce, client_nonce, hello), hello)
        verify_proof(server_proof(secret, server_nonce, client_nonce, hello_reply), proof, "owner")
        return LoopbackConnection(server, hello_reply)
