"""NIXL transport (UCX backend), tuned for hosts without a GPU (shared/notes/nixl-cpu.md). Requester side and
``NixlTransport``; the owner is ``nixl_owner.py``, the binding ``nixl_agent.py``.

Control channel: a TCP connection (``tcp.py``) does the HMAC handshake and swaps partial agent metadata plus
descriptors: the requester sends its reply buffer; the owner answers with its regions and an inbox made for
this connection. Partial metadata means a requester learns only the regions and its own inbox, and NIXL
refuses transfers to anything else (the owner's outbox is registered, since a WRITE's source must be, but it
is never described to a peer). With UCX's CMA transport this is enforced by the initiator's NIXL, not by the
kernel: it keeps honest peers honest, it is no sandbox.

Messages. A connection has ``num_slots`` slots; slot ``i`` is bytes ``[i*S, i*S+S)`` of the owner's inbox and
of the requester's reply buffer (S = ``slot_bytes``, the smaller of both sides'). Every notification is
``NOTIF`` (22 bytes, little-endian ``<cIQIIB``): kind, connection id, request id, slot, length, status.
  call   the requester WRITEs the payload into its inbox slot with notif ``Q``; the owner's poll thread copies
         it out, runs the handler, WRITEs the reply into the requester's reply slot with notif ``R`` and a
         ``ReplyStatus`` (OK; HANDLER_ERROR or REFUSED: the slot holds the message). Empty payloads travel as
         a bare notif. Writes up to 16 KiB round up to a power of two so their handles are prepared once.
  big    a request over ``slot_bytes`` (or with every slot busy) goes over the control channel as a TCP call;
         a reply over the slot comes back as a TCP frame, announced by ``R`` with VIA_CONTROL. Nothing below
         ``max_request_bytes`` is refused for its size: large payloads run at TCP speed.
  read   one-sided READ of the region into ``out``: through a registered staging buffer up to
         ``staging_bytes``, else ``out`` is registered for the call. The owner's CPU is not involved.
  ping   notif ``P``, answered by the owner's poll thread with ``p``: ``NixlConnection.raw_notif_rtt``.
  wake   a requester quiet for longer than the owner's ``wake_after_s`` first sends a WAKE frame on the control
         socket, because the owner's poll thread may be in deep sleep.
A slot is reused only after its reply notif arrived, so a late reply never lands on a newer call. A dead owner
is invisible to UCX in error mode none, so waits also watch the control socket for EOF (every ~1 ms).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np

from qroute.errors import (
    ConfigError,
    HandshakeMismatch,
    RemoteDisconnected,
    TransportError,
    TransportTimeout,
    WireError,
)
from qroute.transport.base import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_TIMEOUT_S,
    Buffer,
    Connection,
    Handler,
    HelloCheck,
    PendingCall,
    SupportsRawPing,
    Transport,
    byte_view,
    check_read,
    deadline_after,
    pack_fields,
    unpack_fields,
)
from qroute.transport.nixl_agent import (
    CACHED_CLASS_MAX,
    CALL,
    NOTIF,
    PING,
    PONG,
    REPLY,
    Backoff,
    NixlAgent,
    RegHandle,
    ReplyStatus,
    XferHandle,
    descs,
    require_nixl,
    size_class,
)
from qroute.transport.nixl_owner import NixlServer
from qroute.transport.tcp import TcpConnection, TcpPending, tcp_connect

_CTRL_CHECK_S = 1e-3  # how often a waiting requester looks for EOF on the control socket

class NixlPending(TcpPending):
    """A call sent through an inbox slot; completed by the poll of notifications (or the control channel)."""

    __slots__ = ("owner", "slot")

    def wait(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
        deadline = deadline_after(timeout_s)
        self.owner._spin_wait(self, deadline)
        return self.outcome()

    def done(self) -> bool:
        if not self.finished:  # nobody may be polling: make progress without blocking
            if self.via_control:
                self.conn.poll_nowait()
            else:
                self.owner._transport._pump()
        return self.finished

    def __repr__(self) -> str:
        return f"NixlPending(req_id={self.req_id}, slot={self.slot}, finished={self.finished})"


class NixlConnection(Connection, SupportsRawPing):
    def __init__(self, transport: NixlTransport, agent: NixlAgent, ctrl: TcpConnection, peer: str,
                 buffers: dict[str, np.ndarray], regs: dict[str, RegHandle], descriptor: dict):
        self._transport, self._agent, self._ctrl, self.peer = transport, agent, ctrl, peer
        self.sid = ctrl.session
        self.hello_reply = ctrl.hello_reply
        self._regions = {name: (int(a), int(n)) for name, (a, n) in descriptor["regions"].items()}
        self.region_sizes = dict(ctrl.region_sizes)  # regions of 0 bytes exist but are not registered
        self._inbox_addr, self.slot_bytes = int(descriptor["inbox_addr"]), int(descriptor["slot_bytes"])
        self._buffers, self._regs = buffers, regs
        self._stride = transport.slot_bytes
        self._free = list(range(transport.num_slots))[::-1]
        self._handles: dict[tuple[int, int], XferHandle] = {}
        self._lock = threading.Lock()
        self._ping_seen = 0
        self._wake_after_s = float(descriptor.get("wake_after_s", float("inf")))
        self._last_sent = time.monotonic()
        self._ping_next = 1
        self._closed = False

    def call(self, payload: bytes, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
        deadline = deadline_after(timeout_s)
        pending = self._post(payload, deadline)
        if isinstance(pending, NixlPending):
            self._spin_wait(pending, deadline)
        else:
            self._ctrl.wait_frame(pending, deadline)
        return pending.outcome()

    def post(self, payload: bytes, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> PendingCall:
        return self._post(payload, deadline_after(timeout_s))

    def _post(self, payload: bytes, deadline: float) -> TcpPending:
        n = memoryview(payload).nbytes
        self._ctrl.check_size(n)
        with self._lock:
            self._check_open()
            use_control = n > self.slot_bytes or not self._free
        if use_control:
            return self._ctrl.send_request(payload, deadline)  # big, or every slot busy
        with self._lock:
            self._check_open()
            if not self._free:
                return self._ctrl.send_request(payload, deadline)
            pending = self._ctrl.new_pending(cls=NixlPending)
            assert isinstance(pending, NixlPending)
            pending.via_control, pending.owner, pending.slot = False, self, self._free.pop()
            notif = NOTIF.pack(CALL, self.sid, pending.req_id, pending.slot, n, 0)
            try:
                self._ring_if_quiet(deadline)
                if n == 0:
                    self._agent.send_notif(self.peer, notif)
                else:
                    self._write_slot(pending.slot, payload, n, notif, deadline)
            except TransportError as exc:
                # the slot stays taken: whether the owner saw it is unknown
                self._ctrl.fail(exc if isinstance(exc, RemoteDisconnected) else
                                RemoteDisconnected(f"NIXL send to {self._ctrl.address} failed: {exc}"))
                raise
        return pending

    def _write_slot(self, slot: int, payload: bytes, n: int, notif: bytes, deadline: float) -> None:
        send = self._buffers["send"]
        base = slot * self._stride
        send[base:base + n] = np.frombuffer(payload, np.uint8)
        size = size_class(n, self.slot_bytes)
        handle = self._handles.get((slot, size))
        if handle is None:
            handle = self._agent.xfer(
                "WRITE", descs([(self._regs["send"].addr + base, size)]),
                descs([(self._inbox_addr + slot * self.slot_bytes, size)]), self.peer, f"call slot={slot} {size}B")
            if size <= CACHED_CLASS_MAX:
                self._handles[(slot, size)] = handle
        try:
            self._agent.run(handle, notif, deadline)
        except TransportError:
            self._handles.pop((slot, size), None)
            raise
        finally:
            if size > CACHED_CLASS_MAX:
                handle.release()

    def read(self, region: str, ranges: Sequence[tuple[int, int]], out: Buffer,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        deadline = deadline_after(timeout_s)
        dst = byte_view(out, writable=True, what="read out")
        total = check_read(self.region_sizes, region, ranges, dst.nbytes)
        if total == 0:
            return
        self._ctrl.poll_nowait()  # a dead owner shows as EOF here, before NIXL complains
        with self._lock:
            self._check_open()
            staging = self._buffers["staging"]
            temp = None if total <= staging.nbytes else self._agent.register(dst[:total])
            local_base = self._regs["staging"].addr if temp is None else temp.addr
            base = self._regions[region][0]
            local, remote, pos = [], [], 0
            for offset, length in ranges:
                if length:
                    local.append((local_base + pos, length))
                    remote.append((base + offset, length))
                    pos += length
            try:
                handle = self._agent.xfer("READ", descs(local), descs(remote), self.peer, f"read {region}")
                try:
                    self._agent.run(handle, b"", deadline)
                finally:
                    handle.release()
            except TransportTimeout:
                # NIXL may still write into the staging buffer: nothing may use this connection any more
                self._ctrl.fail(RemoteDisconnected(f"a read from {self._ctrl.address} timed out; connection dropped"))
                raise
            except RemoteDisconnected as exc:
                self._ctrl.fail(exc)
                raise
            finally:
                if temp is not None:
                    temp.release()
            if temp is None:
                dst[:total] = staging[:total]

    def raw_notif_rtt(self, n: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[float]:
        deadline = deadline_after(timeout_s)
        times = []
        for _ in range(n):
            with self._lock:
                self._check_open()
                seq, self._ping_next = self._ping_next, self._ping_next + 1
            self._ring_if_quiet(deadline)
            start = time.perf_counter()
            self._agent.send_notif(self.peer, NOTIF.pack(PING, self.sid, seq, 0, 0, 0))
            while self._ping_seen < seq:
                self._transport._pump()
                if time.monotonic() > deadline:
                    raise TransportTimeout(f"ping {seq} to {self._ctrl.address}: no answer before the deadline")
                os.sched_yield()
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._ctrl.close()
        self._transport._forget(self)
        for handle in self._handles.values():
            try:
                handle.release()
            except TransportError:
                pass
        for reg in self._regs.values():
            reg.release()
        self._agent.remove_remote(self.peer)

    def __repr__(self) -> str:
        return f"NixlConnection({self._ctrl.address}, sid={self.sid}, peer={self.peer}, closed={self._closed})"

    # -- internals --

    def _check_open(self) -> None:
        if self._closed:
            raise RemoteDisconnected(f"connection to {self._ctrl.address} is closed")
        self._ctrl.raise_if_dead()

    def _ring_if_quiet(self, deadline: float) -> None:
        """The owner may be in deep sleep if we were quiet for a while: ring its control socket first."""
        now = time.monotonic()
        if now - self._last_sent > self._wake_after_s:
            self._ctrl.send_wake(deadline)
        self._last_sent = now

    def _spin_wait(self, pending: NixlPending, deadline: float) -> None:
        ctrl, transport = self._ctrl, self._transport
        backoff = Backoff(transport.spin_s, transport.idle_sleep_s)
        next_check = time.monotonic() + _CTRL_CHECK_S
        while not pending.finished:
            if pending.via_control:
                ctrl.wait_frame(pending, deadline)
                return
            transport._pump()
            if pending.finished:
                return
            now = time.monotonic()
            if now >= next_check:
                ctrl.poll_nowait()  # EOF from a dead owner fails every pending call, this one included
                next_check = now + _CTRL_CHECK_S
            if now > deadline:
                raise TransportTimeout(f"no reply from {ctrl.address} before the deadline")
            backoff.pause()

    def _on_notif(self, kind: bytes, req_id: int, slot: int, length: int, status: int) -> None:
        """Called by whichever thread polls the agent's notifications."""
        if kind == PONG:
            self._ping_seen = max(self._ping_seen, req_id)
            return
        pending = self._ctrl.lookup(req_id)
        if kind != REPLY or not isinstance(pending, NixlPending) or pending.slot != slot:
            return
        if status == ReplyStatus.VIA_CONTROL:
            pending.via_control = True  # the reply is a frame on the control socket
            self._release_slot(slot)
            return
        start = slot * self._stride
        body = self._buffers["reply"][start:start + min(length, self.slot_bytes)].tobytes()
        self._release_slot(slot)
        if status == ReplyStatus.OK:
            self._ctrl.finish(pending, result=body)
        else:
            prefix = "owner handler failed" if status == ReplyStatus.HANDLER_ERROR else "owner refused the request"
            self._ctrl.finish(pending, error=TransportError(f"{prefix}: {body.decode('utf-8', 'replace')}"))

    def _release_slot(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)


class NixlTransport(Transport):
    """Options (all keyword):
    ``slot_bytes``, ``num_slots``  per-connection inbox geometry (1 MiB x 8); larger payloads use the control
        channel. An owner grants ``min(its slot_bytes, the requester's)`` and at most ``max_slots`` slots.
    ``staging_bytes``  reads up to this size go through a registered staging buffer (64 KiB), larger ones
        register ``out`` for the duration of the read.
    ``spin_s``, ``idle_sleep_s``, ``deep_idle_s``  poll back-off (2 ms of sched_yield, then 50 us sleeps; an
        owner idle for 20 ms sleeps until woken).
    ``reply_timeout_s``  how long an owner tries to write one reply.
    ``host``, ``port``, ``max_connections``, ``handshake_timeout_s``, ``io_timeout_s``  the control socket
        (see ``TcpTransport``)."""

    name = "nixl"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, slot_bytes: int = 1 << 20, num_slots: int = 8,
                 max_slots: int = 64, staging_bytes: int = 1 << 16, spin_s: float = 2e-3,
                 idle_sleep_s: float = 50e-6, deep_idle_s: float = 20e-3, reply_timeout_s: float = 5.0,
                 max_connections: int = 64, handshake_timeout_s: float = 5.0, io_timeout_s: float = 30.0):
        if slot_bytes < 1 or not 1 <= num_slots <= max_slots or staging_bytes < 1:
            raise ConfigError(f"nixl: need slot_bytes >= 1, 1 <= num_slots <= max_slots, staging_bytes >= 1; got "
                              f"slot_bytes={slot_bytes} num_slots={num_slots} max_slots={max_slots} "
                              f"staging_bytes={staging_bytes}")
        if not 0 <= spin_s <= deep_idle_s or idle_sleep_s <= 0:
            raise ConfigError(f"nixl: need 0 <= spin_s <= deep_idle_s and idle_sleep_s > 0; got spin_s={spin_s} "
                              f"idle_sleep_s={idle_sleep_s} deep_idle_s={deep_idle_s}")
        self.slot_bytes, self.num_slots, self.max_slots = slot_bytes, num_slots, max_slots
        self.staging_bytes, self.reply_timeout_s = staging_bytes, reply_timeout_s
        self.spin_s, self.idle_sleep_s, self.deep_idle_s = spin_s, idle_sleep_s, deep_idle_s
        self._tcp_opts = dict(host=host, port=port, max_connections=max_connections,
                              handshake_timeout_s=handshake_timeout_s, io_timeout_s=io_timeout_s)
        self._agent: NixlAgent | None = None
        self._lock = threading.Lock()
        self._pump_lock = threading.Lock()
        self._conns: dict[tuple[str, int], NixlConnection] = {}

    def server(self, handler: Handler, *, regions: Mapping[str, Buffer] | None = None, secret: bytes,
               on_hello: HelloCheck | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> NixlServer:
        require_nixl()  # fail now, with the install hint, rather than at start()
        return NixlServer(handler, regions=regions, secret=secret, on_hello=on_hello,
                          max_request_bytes=max_request_bytes, slot_bytes=self.slot_bytes,
                          max_slots=self.max_slots, spin_s=self.spin_s, idle_sleep_s=self.idle_sleep_s,
                          deep_idle_s=self.deep_idle_s, reply_timeout_s=self.reply_timeout_s,
                          tcp_opts=self._tcp_opts)

    def connect(self, address: str, *, secret: bytes, hello: bytes = b"",
                timeout_s: float = DEFAULT_TIMEOUT_S) -> NixlConnection:
        deadline = deadline_after(timeout_s)
        agent = self._requester_agent()
        size = self.num_slots * self.slot_bytes
        buffers = {"send": np.zeros(size, np.uint8), "reply": np.zeros(size, np.uint8),
                   "staging": np.zeros(self.staging_bytes, np.uint8)}
        regs: dict[str, RegHandle] = {}
        ctrl: TcpConnection | None = None
        peer = None
        try:
            for key, buf in buffers.items():
                regs[key] = agent.register(buf)
            mine = json.dumps({"num_slots": self.num_slots, "slot_bytes": self.slot_bytes,
                               "reply_addr": regs["reply"].addr}).encode()
            extra = pack_fields(mine, agent.partial_metadata([regs["reply"]]))  # the owner may only write replies
            ctrl, extra_reply = tcp_connect(address, secret=secret, hello=hello,
                                            timeout_s=max(deadline - time.monotonic(), 1e-3), extra=extra)
            try:
                descriptor_json, metadata = unpack_fields(extra_reply, 2)
                descriptor = json.loads(descriptor_json)
                granted = int(descriptor["slot_bytes"])
            except (WireError, ValueError, KeyError, TypeError) as exc:
                raise HandshakeMismatch(f"{address}: malformed NIXL descriptor: {exc}") from None
            if not 1 <= granted <= self.slot_bytes:
                raise HandshakeMismatch(f"{address} granted slots of {granted} bytes; asked for {self.slot_bytes}")
            peer = agent.add_remote(metadata)
            try:
                conn = NixlConnection(self, agent, ctrl, peer, buffers, regs, descriptor)
            except (ValueError, KeyError, TypeError) as exc:
                raise HandshakeMismatch(f"{address}: malformed NIXL descriptor: {exc}") from None
        except BaseException:
            if ctrl is not None:
                ctrl.close()
            if peer is not None:
                agent.remove_remote(peer)
            for reg in regs.values():
                reg.release()
            raise
        with self._lock:
            self._conns[(peer, conn.sid)] = conn
        return conn

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()
        self._agent = None

    def _requester_agent(self) -> NixlAgent:
        with self._lock:
            if self._agent is None:
                self._agent = NixlAgent("requester")
            return self._agent

    def _forget(self, conn: NixlConnection) -> None:
        with self._lock:
            self._conns.pop((conn.peer, conn.sid), None)

    def _pump(self) -> None:
        """Poll the agent once and hand each notification to its connection; one poller at a time."""
        if not self._pump_lock.acquire(blocking=False):
            return  # another thread is polling and will deliver ours
        try:
            agent = self._agent
            if agent is None:
                return
            for peer, msgs in agent.notifs().items():
                for msg in msgs:
                    if len(msg) != NOTIF.size:
                        continue
                    kind, sid, req_id, slot, length, status = NOTIF.unpack(msg)
                    conn = self._conns.get((peer, sid))
                    if conn is not None:
                        conn._on_notif(kind, req_id, slot, length, status)
        finally:
            self._pump_lock.release()
