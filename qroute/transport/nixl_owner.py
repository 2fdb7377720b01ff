"""NIXL owner: a poll thread answers calls written into per-connection inboxes (layout: ``nixl.py``).

The control channel is a ``TcpServer`` with this class as its session hooks: ``attach`` loads the requester's
partial metadata and registers an inbox for the connection, ``detach`` undoes it (on the poll thread, which owns
the connection's transfer handles), ``wake`` rouses the poll thread from deep sleep. Calls too big for a slot
arrive as TCP calls on the control channel and are answered there by the same handler.

Handlers of NIXL calls run on the poll thread (a slow handler delays every requester's NIXL calls, not their
reads); calls that came over the control channel run on that connection's thread. The calls one poll pass finds
go to the ``batch_handler`` together when there is one (the owner answers routes for the same blocks with one
attention), as views of the inbox (the slots stay untouched until their replies are written), else to the
handler one at a time, copied.

Polling on small machines: after work the thread spins with sched_yield for ``spin_s``, then sleeps
``idle_sleep_s`` at a time; after ``deep_idle_s`` it blocks until a requester rings (a WAKE frame, sent by a
requester that has been quiet for half that long) or 50 ms pass, so an idle owner costs next to no CPU.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from qroute.core.handshake import pack_fields, unpack_fields
from qroute.errors import ConfigError, HandshakeMismatch, TransportError, WireError
from qroute.metrics import MetricsSnapshot
from qroute.transport.base import (
    BatchHandler,
    Buffer,
    Handler,
    HelloCheck,
    Server,
    region_views,
)
from qroute.transport.frames import PREFIX, REQ_ID, Kind
from qroute.transport.nixl_agent import (
    CALL,
    NOTIF,
    PING,
    PONG,
    REPLY,
    Backoff,
    NixlAgent,
    PreparedTransfers,
    RegHandle,
    ReplyStatus,
    descs,
    size_class,
    slot_span,
)
from qroute.transport.tcp_owner import TcpServer


class _OwnerConn:
    __slots__ = ("sid", "peer", "inbox", "inbox_reg", "num_slots", "slot_bytes", "reply_addr", "reply_stride",
                 "handles", "dead")

    def __init__(self, sid: int, peer: str, inbox: np.ndarray, inbox_reg: RegHandle, num_slots: int,
                 slot_bytes: int, reply_addr: int, reply_stride: int):
        self.sid, self.peer, self.inbox, self.inbox_reg = sid, peer, inbox, inbox_reg
        self.num_slots, self.slot_bytes = num_slots, slot_bytes
        self.reply_addr, self.reply_stride = reply_addr, reply_stride
        self.handles = PreparedTransfers()
        self.dead = False

    def __repr__(self) -> str:
        return f"_OwnerConn({self.sid}, {self.peer}, slots={self.num_slots}x{self.slot_bytes})"


@dataclass(frozen=True)
class _Call:
    conn: _OwnerConn
    req_id: int
    slot: int
    span: int  # slots the call took (from ``slot``); its reply may use as many
    start: int  # where the payload lies in the connection's inbox
    length: int

    def payload(self) -> np.ndarray:
        """The call's bytes where they landed in the inbox (untouched until its reply is written)."""
        return self.conn.inbox[self.start:self.start + self.length]


class NixlServer(Server):
    def __init__(self, handler: Handler, *, regions: Mapping[str, Buffer] | None, secret: bytes,
                 on_hello: HelloCheck | None, max_request_bytes: int, slot_bytes: int, max_slots: int,
                 spin_s: float, idle_sleep_s: float, deep_idle_s: float, reply_timeout_s: float,
                 tcp_opts: Mapping[str, Any], batch_handler: BatchHandler | None = None):
        self._batch_handler = batch_handler
        self._tcp = TcpServer(handler, regions=regions, secret=secret, on_hello=on_hello,
                              max_request_bytes=max_request_bytes, hooks=self, **tcp_opts)
        self._regions = region_views(regions)
        self.max_request_bytes = max_request_bytes
        self._slot_bytes, self._max_slots = slot_bytes, max_slots
        self._reply_timeout_s = reply_timeout_s
        self._deep_idle_s = deep_idle_s
        self._wake = threading.Event()  # set by a WAKE frame on a control connection
        self._backoff = Backoff(spin_s, idle_sleep_s, deep_idle_s, wake=self._wake)
        self._agent: NixlAgent | None = None
        self._region_regs: dict[str, RegHandle] = {}
        self._outbox = np.zeros(0, np.uint8)
        self._outbox_reg: RegHandle | None = None
        self._conns: dict[int, _OwnerConn] = {}
        self._detached: deque[int] = deque()
        self._thread: threading.Thread | None = None
        self._running = False
        self.address = ""

    def start(self) -> str:
        if self._agent is not None:
            raise ConfigError("nixl server: start() called twice")
        agent = self._agent = NixlAgent("owner")
        self._region_regs = {name: agent.register(view) for name, view in self._regions.items() if view.nbytes}
        # As large as any connection's inbox (a reply may span its call's slots); untouched pages cost no memory.
        self._outbox = np.zeros(self._slot_bytes * self._max_slots, np.uint8)
        self._outbox_reg = agent.register(self._outbox)
        self._running = True
        self._thread = threading.Thread(target=self._poll_loop, name="qroute-nixl-owner", daemon=True)
        self._thread.start()
        try:
            self.address = self._tcp.start()
        except BaseException:
            self.stop()
            raise
        return self.address

    def stop(self) -> None:
        if not self._running:
            return
        self._tcp.stop()  # ends control connections: their detach() lands in the queue
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._drop_detached()
        for sid in list(self._conns):
            self._drop(sid)
        for reg in [*self._region_regs.values(), self._outbox_reg]:
            if reg is not None:
                reg.release()
        self._agent = None

    def stats(self) -> MetricsSnapshot:
        return self._tcp.stats()

    # -- SessionHooks, called by the control channel's connection threads --

    def attach(self, sid: int, extra: bytes) -> bytes:
        agent = self._agent
        assert agent is not None and self._outbox_reg is not None
        try:
            info_json, metadata = unpack_fields(extra, 2)
            info = json.loads(info_json)
            num_slots, slot_bytes = int(info["num_slots"]), int(info["slot_bytes"])
            reply_addr = int(info["reply_addr"])
        except (WireError, ValueError, KeyError, TypeError) as exc:
            raise HandshakeMismatch(f"nixl: malformed requester descriptor: {exc}") from None
        if not (1 <= num_slots <= self._max_slots and slot_bytes >= 1):
            raise HandshakeMismatch(f"nixl: requester asks for {num_slots} slots of {slot_bytes} bytes; this owner "
                                    f"allows 1..{self._max_slots} slots")
        slot = min(slot_bytes, self._slot_bytes)
        peer = agent.add_remote(metadata)
        inbox = np.zeros(num_slots * slot, np.uint8)
        inbox_reg = None
        try:
            inbox_reg = agent.register(inbox)
            descriptor = json.dumps({
                "agent": agent.name, "inbox_addr": inbox_reg.addr, "slot_bytes": slot,
                "wake_after_s": self._deep_idle_s / 2,  # requesters quiet this long ring before sending
                "regions": {name: [reg.addr, reg.nbytes] for name, reg in self._region_regs.items()},
            }).encode()
            md = agent.partial_metadata([*self._region_regs.values(), inbox_reg])
        except BaseException:
            if inbox_reg is not None:
                inbox_reg.release()
            agent.remove_remote(peer)
            raise
        self._conns[sid] = _OwnerConn(sid, peer, inbox, inbox_reg, num_slots, slot, reply_addr, slot_bytes)
        return pack_fields(descriptor, md)

    def wake(self) -> None:
        self._wake.set()

    def detach(self, sid: int) -> None:
        self._detached.append(sid)  # the poll thread owns the connection's handles
        if not self._running:
            self._drop_detached()

    # -- poll thread --

    def _poll_loop(self) -> None:
        agent = self._agent
        assert agent is not None
        backoff = self._backoff
        while self._running:
            try:
                if self._detached:
                    self._drop_detached()
                notifs = agent.notifs()
            except Exception:  # the owner must keep polling whatever one call did
                self._tcp.counters.add("protocol_errors")
                notifs = {}
            if not notifs:
                backoff.pause()
                continue
            calls: list[_Call] = []  # every call this pass found, answered together
            for peer, msgs in notifs.items():
                for msg in msgs:
                    try:
                        call = self._on_notif(peer, msg)
                    except Exception:  # one bad message must not stop the owner
                        self._tcp.counters.add("protocol_errors")
                        continue
                    if call is not None:
                        calls.append(call)
            if calls:
                self._answer(calls)
            backoff.busy()

    def _answer(self, calls: list[_Call]) -> None:
        if self._batch_handler is not None:  # it reads the calls where they landed: their slots stay put till the reply
            results = self._tcp.invoke_batch([call.payload().data for call in calls], self._batch_handler)
        else:
            results = [self._tcp.invoke(call.payload().tobytes()) for call in calls]
        for call, (ok, reply) in zip(calls, results, strict=True):
            try:
                self._reply(call.conn, call.req_id, call.slot, ReplyStatus.OK if ok else ReplyStatus.HANDLER_ERROR,
                            reply, span=call.span)  # fmt: skip
            except Exception:  # one failed reply must not cost the others theirs
                self._tcp.counters.add("protocol_errors")

    def _on_notif(self, peer: str, msg: bytes) -> _Call | None:
        """Answer what needs no handler (pings, refusals); a call to answer is returned."""
        if len(msg) != NOTIF.size:
            self._tcp.counters.add("protocol_errors")
            return
        kind, sid, req_id, slot, length, _ = NOTIF.unpack(msg)
        conn = self._conns.get(sid)
        if conn is None or conn.peer != peer:
            self._tcp.counters.add("protocol_errors")
            return
        if conn.dead:
            return
        agent = self._agent
        assert agent is not None
        if kind == PING:
            agent.send_notif(peer, NOTIF.pack(PONG, sid, req_id, 0, 0, 0))
            return
        span = slot_span(length, conn.slot_bytes)  # a call over one slot fills several adjacent ones
        if kind != CALL or slot + span > conn.num_slots:
            self._tcp.counters.add("protocol_errors")
            return
        if length > self.max_request_bytes:
            self._tcp.counters.add("refused")
            message = f"{length} bytes is over the owner's limit (max_request_bytes={self.max_request_bytes})"
            self._reply(conn, req_id, slot, ReplyStatus.REFUSED, message.encode())
            return
        return _Call(conn, req_id, slot, span, slot * conn.slot_bytes, length)

    def _reply(self, conn: _OwnerConn, req_id: int, slot: int, status: ReplyStatus, body: bytes, *,
               span: int = 1) -> None:
        """Write a reply into the requester's reply slots ``[slot, slot + span)``; longer ones (rare: a route's
        reply is smaller than its request) go over the control channel, announced by a VIA_CONTROL notif."""
        agent = self._agent
        assert agent is not None
        limit = min(span * conn.slot_bytes, self._outbox.nbytes)
        if len(body) > limit:
            if status is ReplyStatus.OK:
                try:
                    self._tcp.send_frame(conn.sid, [PREFIX.pack(REQ_ID.size + len(body), Kind.REPLY, req_id), body],
                                         self._reply_timeout_s)
                except TransportError:
                    conn.dead = True
                    return
                status, body = ReplyStatus.VIA_CONTROL, b""
            else:
                body = body[:limit]
        n = len(body)
        notif = NOTIF.pack(REPLY, conn.sid, req_id, slot, n, status)
        try:
            if n == 0:
                agent.send_notif(conn.peer, notif)
                return
            self._outbox[:n] = np.frombuffer(body, np.uint8)
            size = size_class(n, limit)
            dst = conn.reply_addr + slot * conn.reply_stride
            handle = conn.handles.get((slot, size), lambda: agent.xfer(
                "WRITE", descs([(self._outbox_reg.addr, size)]), descs([(dst, size)]), conn.peer,
                f"reply sid={conn.sid} slot={slot} {size}B"))
            agent.run(handle, notif, time.monotonic() + self._reply_timeout_s)
        except TransportError:
            conn.dead = True  # the requester vanished; its control socket's EOF cleans up

    def _drop_detached(self) -> None:
        while self._detached:
            self._drop(self._detached.popleft())

    def _drop(self, sid: int) -> None:
        conn = self._conns.pop(sid, None)
        if conn is None or self._agent is None:
            return
        conn.handles.release_all()
        conn.inbox_reg.release()
        self._agent.remove_remote(conn.peer)
