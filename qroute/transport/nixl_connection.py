"""NIXL transport, requester side: ``NixlConnection`` (one per owner) and its pending calls.

See ``nixl.py`` for the message protocol (slots, notifications, big messages, reads, pings, wakes).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from qroute.errors import RemoteDisconnected, TransportError, TransportTimeout
from qroute.transport.base import (
    DEFAULT_TIMEOUT_S,
    Buffer,
    Connection,
    PendingCall,
    SupportsOneSidedRead,
    SupportsRawPing,
    byte_view,
    check_read,
    deadline_after,
)
from qroute.transport.nixl_agent import (
    CALL,
    NOTIF,
    PING,
    PONG,
    READS_KEPT,
    REPLY,
    Backoff,
    NixlAgent,
    PreparedTransfers,
    RegHandle,
    ReplyStatus,
    XferHandle,
    descs,
    size_class,
    slot_span,
)
from qroute.transport.tcp import TcpConnection, TcpPending


class _Pump(Protocol):
    """What a connection needs of its ``NixlTransport`` (typed here so that this module need not import it)."""

    slot_bytes: int
    num_slots: int

    def _pump(self) -> None: ...

    def _forget(self, conn: NixlConnection) -> None: ...

logger = logging.getLogger(__name__)
_CTRL_CHECK_S = 1e-3  # how often a waiting requester looks for EOF on the control socket

class NixlPending(TcpPending):
    """A call sent through inbox slots ``[slot, slot + span)``; completed by the poll of notifications (or the
    control channel)."""

    __slots__ = ("owner", "slot", "span")

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


class NixlConnection(Connection, SupportsOneSidedRead, SupportsRawPing):
    def __init__(self, transport: _Pump, agent: NixlAgent, ctrl: TcpConnection, peer: str,
                 buffers: dict[str, np.ndarray], regs: dict[str, RegHandle], descriptor: dict):
        self._transport, self._agent, self._ctrl, self.peer = transport, agent, ctrl, peer
        self.sid = ctrl.session
        self.hello_reply = ctrl.hello_reply
        self._regions = {name: (int(a), int(n)) for name, (a, n) in descriptor["regions"].items()}
        self.region_sizes = dict(ctrl.region_sizes)  # regions of 0 bytes exist but are not registered
        self._inbox_addr, self.slot_bytes = int(descriptor["inbox_addr"]), int(descriptor["slot_bytes"])
        self._buffers, self._regs = buffers, regs
        self._stride = transport.slot_bytes
        self._busy = [False] * transport.num_slots
        self.control_calls = 0  # calls that took the control channel (bigger than the inbox, or no free slots)
        self._handles = PreparedTransfers()  # WRITEs of calls
        self._reads = PreparedTransfers(READS_KEPT)  # READs into the staging buffer
        self._lock = threading.Lock()
        self._ping_seen = 0
        self._wake_after_s = float(descriptor.get("wake_after_s", float("inf")))
        self._last_sent = time.monotonic()
        self._ping_next = 1
        self._closed = False
        self._warned = False

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
        span = slot_span(n, self.slot_bytes)  # a message over one slot takes several adjacent ones
        with self._lock:
            self._check_open()
            slot = self._take(span)
            if slot is None:
                self.control_calls += 1
                if span > len(self._busy) and not self._warned:
                    self._warned = True
                    logger.warning("nixl: a %d-byte call is over the %d-byte inbox of %s: it and others like it go "
                                   "over the control channel (TCP); raise num_slots or slot_bytes", n,
                                   len(self._busy) * self.slot_bytes, self._ctrl.address)  # fmt: skip
                return self._ctrl.send_request(payload, deadline)
            pending = self._ctrl.new_pending(cls=NixlPending)
            assert isinstance(pending, NixlPending)
            pending.via_control, pending.owner, pending.slot, pending.span = False, self, slot, span
            notif = NOTIF.pack(CALL, self.sid, pending.req_id, slot, n, 0)
            try:
                self._ring_if_quiet(deadline)
                if n == 0:
                    self._agent.send_notif(self.peer, notif)
                else:
                    self._write_slot(slot, payload, n, notif, deadline)
            except TransportError as exc:
                # the slots stay taken: whether the owner saw it is unknown
                self._ctrl.fail(exc if isinstance(exc, RemoteDisconnected) else
                                RemoteDisconnected(f"NIXL send to {self._ctrl.address} failed: {exc}"))
                raise
        return pending

    def _take(self, span: int) -> int | None:
        """The first of ``span`` adjacent free slots, now taken; None if there are none. Under ``_lock``."""
        run = 0
        for slot, busy in enumerate(self._busy):
            run = 0 if busy else run + 1
            if run == span:
                first = slot - span + 1
                self._busy[first:slot + 1] = [True] * span
                return first
        return None

    def _write_slot(self, slot: int, payload: bytes, n: int, notif: bytes, deadline: float) -> None:
        send = self._buffers["send"]
        base = slot * self._stride
        send[base:base + n] = np.frombuffer(payload, np.uint8)
        size = size_class(n, max(n, self.slot_bytes))
        handle = self._handles.get((slot, size), lambda: self._agent.xfer(
            "WRITE", descs([(self._regs["send"].addr + base, size)]),
            descs([(self._inbox_addr + slot * self.slot_bytes, size)]), self.peer, f"call slot={slot} {size}B"))
        try:
            self._agent.run(handle, notif, deadline)
        except TransportError:
            self._handles.drop((slot, size))
            raise

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
            staged = self._staging_for(total)
            temp = None if staged else self._agent.register(dst[:total])
            key = (region, tuple(map(tuple, ranges)))
            try:
                if staged:
                    handle = self._reads.get(key, lambda: self._prepare_read(region, ranges, self._regs["staging"]))
                else:
                    handle = self._prepare_read(region, ranges, temp)
                try:
                    self._agent.run(handle, b"", deadline)
                except TransportError:
                    self._reads.drop(key)
                    raise
                finally:
                    if not staged:
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
            if staged:
                dst[:total] = self._buffers["staging"][:total]

    def _staging_for(self, total: int) -> bool:
        """Whether a ``total``-byte read fits the staging buffer, grown (registered anew, the READs prepared into
        the old one released) when it does not and ``staging_max_bytes`` allows. Under ``_lock``."""
        if total <= self._buffers["staging"].nbytes:
            return True
        if total > self._transport.staging_max_bytes:
            return False
        size = min(1 << (total - 1).bit_length(), self._transport.staging_max_bytes)  # few growths, not one a read
        staging = np.zeros(size, np.uint8)
        reg = self._agent.register(staging)
        self._reads.release_all()
        self._regs["staging"].release()
        self._buffers["staging"], self._regs["staging"] = staging, reg
        return True

    def _prepare_read(self, region: str, ranges: Sequence[tuple[int, int]], into: RegHandle) -> XferHandle:
        base = self._regions[region][0]
        local, remote, pos = [], [], 0
        for offset, length in ranges:
            if length:
                local.append((into.addr + pos, length))
                remote.append((base + offset, length))
                pos += length
        return self._agent.xfer("READ", descs(local), descs(remote), self.peer, f"read {region}")

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
        self._handles.release_all()
        self._reads.release_all()
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
            self._release(slot, pending.span)
            return
        start = slot * self._stride
        body = self._buffers["reply"][start:start + min(length, pending.span * self.slot_bytes)].tobytes()
        self._release(slot, pending.span)
        if status == ReplyStatus.OK:
            self._ctrl.finish(pending, result=body)
        else:
            prefix = "owner handler failed" if status == ReplyStatus.HANDLER_ERROR else "owner refused the request"
            self._ctrl.finish(pending, error=TransportError(f"{prefix}: {body.decode('utf-8', 'replace')}"))

    def _release(self, slot: int, span: int) -> None:
        with self._lock:
            self._busy[slot:slot + span] = [False] * span


