"""TCP transport: the fallback that works everywhere (wire format: ``frames.py``; owner: ``tcp_owner.py``).

Requester: non-blocking socket and no reader thread. Whichever waiting thread finds the socket readable reads
frames for everyone (leader/follower), so a single-threaded call costs one wake-up; a partly read frame
survives a timeout, and read data goes straight into the caller's ``out``.
"""

from __future__ import annotations

import itertools
import math
import select
import socket
import threading
from collections.abc import Mapping, Sequence

from qroute.core.handshake import check_secret
from qroute.errors import ConfigError, RemoteDisconnected, TransportError, TransportTimeout
from qroute.transport.base import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_TIMEOUT_S,
    BatchHandler,
    Buffer,
    Connection,
    Handler,
    HelloCheck,
    PendingCall,
    Transport,
    byte_view,
    check_read,
    deadline_after,
    remaining,
)
from qroute.transport.frames import (
    MAX_ERROR_BYTES,
    MAX_READ_DESC_BYTES,
    PREFIX,
    REQ_ID,
    Kind,
    client_handshake,
    error_from_frame,
    pack_read,
    parse_address,
    send_all,
)
from qroute.transport.tcp_owner import TcpServer

_SCRATCH = 1 << 16


class TcpPending(PendingCall):
    """One outstanding call or read. Fields change under the connection's lock; ``finished`` is set last."""

    __slots__ = ("req_id", "conn", "sink", "abandoned", "via_control", "result", "error", "finished")

    def __init__(self, conn: TcpConnection, req_id: int, sink: memoryview | None = None):
        self.req_id, self.conn, self.sink = req_id, conn, sink
        self.abandoned = False
        self.via_control = True  # the reply comes as a frame on this socket (NIXL clears it)
        self.result: bytes | None = None
        self.error: BaseException | None = None
        self.finished = False

    def done(self) -> bool:
        if not self.finished:
            self.conn.poll_nowait()  # nobody may be reading: take in what arrived, without blocking
        return self.finished

    def wait(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
        self.conn._wait(self, deadline_after(timeout_s))
        return self.outcome()

    def outcome(self) -> bytes:
        if self.error is not None:
            raise type(self.error)(*self.error.args)  # a fresh instance: repeats must not chain tracebacks
        assert self.result is not None
        return self.result

    def __repr__(self) -> str:
        return f"{type(self).__name__}(req_id={self.req_id}, finished={self.finished})"


class _RxFrame:
    """A frame being received: its body goes to the pending's sink (reads), to chunks (replies) or nowhere."""

    __slots__ = ("kind", "size", "got", "pending", "chunks")

    def __init__(self, kind: int, size: int, pending: TcpPending | None):
        self.kind, self.size, self.got, self.pending, self.chunks = kind, size, 0, pending, []

    def direct(self) -> bool:
        """True when the rest of the body can be received straight into a read's ``out``."""
        p = self.pending
        return self.kind == Kind.DATA and p is not None and not p.abandoned and self.got < self.size

    def take(self, data: memoryview) -> None:
        p = self.pending
        if p is not None and not p.abandoned:
            if self.kind == Kind.DATA:
                p.sink[self.got:self.got + len(data)] = data
            else:
                self.chunks.append(bytes(data))
        self.got += len(data)


class TcpConnection(Connection):
    def __init__(self, sock: socket.socket, address: str, hello_reply: bytes, info: dict):
        self._sock, self.address, self.hello_reply = sock, address, hello_reply
        self.region_sizes: dict[str, int] = dict(info["regions"])
        self.max_request_bytes = int(info["max_request_bytes"])
        self.session = int(info["session"])
        self._cond = threading.Condition(threading.Lock())
        self._send_lock = threading.Lock()
        self._reading = False  # a thread is the reader (leader); others wait on _cond
        self._pending: dict[int, TcpPending] = {}
        self._ids = itertools.count(1)
        self._dead: TransportError | None = None
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._scratch = bytearray(_SCRATCH)
        self._partial = b""  # an incomplete frame prefix
        self._frame: _RxFrame | None = None

    # -- public API --

    def call(self, payload: bytes, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
        deadline = deadline_after(timeout_s)
        pending = self.send_request(payload, deadline)
        self._wait(pending, deadline)
        return pending.outcome()

    def post(self, payload: bytes, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> TcpPending:
        return self.send_request(payload, deadline_after(timeout_s))

    def read(self, region: str, ranges: Sequence[tuple[int, int]], out: Buffer,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        deadline = deadline_after(timeout_s)
        dst = byte_view(out, writable=True, what="read out")
        total = check_read(self.region_sizes, region, ranges, dst.nbytes)
        if total == 0:
            return
        desc = pack_read(region, ranges)
        if len(desc) > MAX_READ_DESC_BYTES:
            raise ConfigError(f"read: {len(ranges)} ranges is too many for one read; split it")
        pending = self.new_pending(memoryview(dst[:total]))
        self._send([PREFIX.pack(REQ_ID.size + len(desc), Kind.READ, pending.req_id), desc], deadline)
        try:
            self._wait(pending, deadline)
        except TransportTimeout:
            with self._cond:
                pending.abandoned = True  # under the lock: nothing lands in `out` after we raise
            raise
        pending.outcome()

    def close(self) -> None:
        self.fail(RemoteDisconnected(f"connection to {self.address} is closed"))

    def __repr__(self) -> str:
        return f"TcpConnection({self.address}, session={self.session}, dead={self._dead is not None})"

    # -- also used by NIXL, whose control channel this is --

    def send_request(self, payload: bytes, deadline: float) -> TcpPending:
        n = memoryview(payload).nbytes
        self.check_size(n)
        pending = self.new_pending()
        self._send([PREFIX.pack(REQ_ID.size + n, Kind.REQUEST, pending.req_id), payload], deadline)
        return pending

    def send_wake(self, deadline: float) -> None:
        self._send([PREFIX.pack(REQ_ID.size, Kind.WAKE, 0)], deadline)

    def check_size(self, n: int) -> None:
        if n > self.max_request_bytes:
            raise TransportError(f"request of {n} bytes not sent: over the owner's "
                                 f"max_request_bytes={self.max_request_bytes}")

    def new_pending(self, sink: memoryview | None = None, cls: type[TcpPending] = TcpPending) -> TcpPending:
        with self._cond:
            self.raise_if_dead()
            pending = cls(self, next(self._ids), sink)
            self._pending[pending.req_id] = pending
        return pending

    def lookup(self, req_id: int) -> TcpPending | None:
        return self._pending.get(req_id)

    def finish(self, pending: TcpPending, result: bytes | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self._pending.pop(pending.req_id, None) is not None:
                pending.result, pending.error = result, error
                pending.finished = True
                self._cond.notify_all()

    def fail(self, exc: TransportError) -> None:
        """Mark the connection dead: every pending call fails with ``exc``, later calls raise it."""
        with self._cond:
            self._mark_dead(exc)
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in poll
            except OSError:
                pass
            if not self._reading:
                self._sock.close()  # else the reader closes it when it wakes

    @property
    def dead(self) -> TransportError | None:
        return self._dead

    def raise_if_dead(self) -> None:
        if self._dead is not None:
            raise type(self._dead)(*self._dead.args)

    def poll_nowait(self) -> None:
        """Take in whatever already arrived (EOF marks the connection dead); never blocks."""
        with self._cond:
            if self._reading or self._dead is not None:
                return
            self._reading = True
            try:
                self._drain(None)
            except TransportError as exc:
                self._mark_dead(exc)
            finally:
                self._done_reading()

    def wait_frame(self, pending: TcpPending, deadline: float) -> None:
        self._wait(pending, deadline)

    # -- internals --

    def _send(self, parts: Sequence[Buffer], deadline: float) -> None:
        try:
            with self._send_lock:
                self.raise_if_dead()
                send_all(self._sock, parts, deadline, f"send to {self.address}")
        except TransportTimeout as exc:
            # part of a frame may be on the wire: the stream cannot be resynchronised
            self.fail(RemoteDisconnected(f"connection to {self.address} dropped after a send timeout"))
            raise TransportTimeout(f"{exc} (owner not reading)") from None
        except TransportError as exc:
            self.fail(exc)
            raise

    def _wait(self, pending: TcpPending, deadline: float) -> None:
        with self._cond:
            while not pending.finished:
                left = remaining(deadline)
                if left <= 0:
                    raise TransportTimeout(f"no reply from {self.address} before the deadline")
                if self._reading:
                    self._cond.wait(left)
                    continue
                self._reading = True
                try:
                    self._drain(pending)  # on one core the reply is often already here
                    if not pending.finished:
                        self._cond.release()
                        try:
                            ready = self._poller.poll(max(1, math.ceil(left * 1000)))
                        finally:
                            self._cond.acquire()
                        if ready:
                            self._drain(pending)
                except TransportError as exc:
                    self._mark_dead(exc)
                finally:
                    self._done_reading()

    def _done_reading(self) -> None:
        self._reading = False
        if self._dead is not None:
            self._sock.close()
        self._cond.notify_all()

    def _mark_dead(self, exc: TransportError) -> None:
        if self._dead is None:
            self._dead = exc
        for p in self._pending.values():
            p.error, p.finished = exc, True
        self._pending.clear()
        self._cond.notify_all()

    def _recv_some(self, view: memoryview | bytearray) -> int:
        """Non-blocking receive; 0 when nothing is waiting."""
        try:
            n = self._sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise RemoteDisconnected(f"connection to {self.address}: {exc}") from None
        if n == 0:
            raise RemoteDisconnected(f"owner {self.address} closed the connection")
        return n

    def _drain(self, until: TcpPending | None) -> None:
        """Receive without blocking until nothing is waiting or ``until`` finished. Caller is the reader."""
        while self._dead is None:
            frame = self._frame
            if frame is not None and frame.direct():
                n = self._recv_some(frame.pending.sink[frame.got:])
                if not n:
                    return
                frame.got += n
                if frame.got == frame.size:
                    self._frame = None
                    self._complete(frame)
            else:
                n = self._recv_some(self._scratch)
                if not n:
                    return
                self._feed(memoryview(self._scratch)[:n])
            if until is not None and until.finished:
                return

    def _feed(self, data: memoryview) -> None:
        if self._partial:
            data = memoryview(self._partial + bytes(data))
            self._partial = b""
        pos, end = 0, len(data)
        while True:
            frame = self._frame
            if frame is None:
                if end - pos < PREFIX.size:
                    self._partial = bytes(data[pos:end])
                    return
                length, kind, req_id = PREFIX.unpack_from(data, pos)
                pos += PREFIX.size
                frame = self._frame = self._start_frame(length, kind, req_id)
            take = min(end - pos, frame.size - frame.got)
            if take:
                frame.take(data[pos:pos + take])
                pos += take
            if frame.got < frame.size:
                return
            self._frame = None
            self._complete(frame)

    def _start_frame(self, length: int, kind: int, req_id: int) -> _RxFrame:
        size = length - REQ_ID.size
        if size < 0 or kind not in (Kind.REPLY, Kind.DATA, Kind.ERROR):
            raise TransportError(f"owner {self.address} sent a bad frame (kind {kind}, {length} bytes)")
        if kind == Kind.ERROR and size > MAX_ERROR_BYTES + 1:
            raise TransportError(f"owner {self.address} sent an error frame of {size} bytes")
        pending = self._pending.get(req_id)
        if kind == Kind.DATA and pending is not None and (pending.sink is None or pending.sink.nbytes != size):
            raise TransportError(f"owner {self.address} answered a read with {size} bytes")
        return _RxFrame(kind, size, pending)

    def _complete(self, frame: _RxFrame) -> None:
        pending = frame.pending
        if pending is None or pending.finished:
            return
        body = frame.chunks[0] if len(frame.chunks) == 1 else b"".join(frame.chunks)
        if frame.kind == Kind.ERROR:
            pending.error = error_from_frame(body[0] if body else 0, body[1:].decode("utf-8", "replace"))
        else:
            pending.result = body if frame.kind == Kind.REPLY else b""
        self._pending.pop(pending.req_id, None)
        pending.finished = True


def tcp_connect(address: str, *, secret: bytes, hello: bytes, timeout_s: float,
                extra: bytes = b"") -> tuple[TcpConnection, bytes]:
    """Connect and run the handshake; returns the connection and the owner's transport extra."""
    deadline = deadline_after(timeout_s)
    secret = check_secret(secret)
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=max(remaining(deadline), 1e-3))
    except TimeoutError:
        raise TransportTimeout(f"connect to {address}: timed out") from None
    except OSError as exc:
        raise RemoteDisconnected(f"connect to {address}: {exc}") from None
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello_reply, info, extra_reply = client_handshake(sock, address, secret, bytes(hello), extra, deadline)
        return TcpConnection(sock, address, hello_reply, info), extra_reply
    except BaseException:
        sock.close()
        raise


class TcpTransport(Transport):
    """Options: ``host`` and ``port`` the server binds (127.0.0.1, 0 = ephemeral), ``max_connections``,
    ``handshake_timeout_s`` and ``io_timeout_s`` (how long an owner waits on a stalled peer)."""

    name = "tcp"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, max_connections: int = 64,
                 handshake_timeout_s: float = 5.0, io_timeout_s: float = 30.0):
        self._server_opts = dict(host=host, port=port, max_connections=max_connections,
                                 handshake_timeout_s=handshake_timeout_s, io_timeout_s=io_timeout_s)

    def server(self, handler: Handler, *, regions: Mapping[str, Buffer] | None = None, secret: bytes,
               on_hello: HelloCheck | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               batch_handler: BatchHandler | None = None) -> TcpServer:  # calls come one at a time: handler only
        return TcpServer(handler, regions=regions, secret=secret, on_hello=on_hello,
                         max_request_bytes=max_request_bytes, **self._server_opts)

    def connect(self, address: str, *, secret: bytes, hello: bytes = b"",
                timeout_s: float = DEFAULT_TIMEOUT_S) -> TcpConnection:
        return tcp_connect(address, secret=secret, hello=hello, timeout_s=timeout_s)[0]
