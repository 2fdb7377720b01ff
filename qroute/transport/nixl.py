"""NIXL transport (UCX backend), tuned for hosts without a GPU (shared/notes/nixl-cpu.md): ``NixlTransport``;
the requester side is ``nixl_connection.py``, the owner ``nixl_owner.py``, the binding ``nixl_agent.py``.

Control channel: a TCP connection (``tcp.py``) does the HMAC handshake and swaps partial agent metadata plus
descriptors: the requester sends its reply buffer; the owner answers with its regions and an inbox made for
this connection. Partial metadata means a requester learns only the regions and its own inbox, and NIXL
refuses transfers to anything else (the owner's outbox is registered, since a WRITE's source must be, but it
is never described to a peer). With UCX's CMA transport this is enforced by the initiator's NIXL, not by the
kernel: it keeps honest peers honest, it is no sandbox.

Messages. A connection has ``num_slots`` slots; slot ``i`` is bytes ``[i*S, i*S+S)`` of the owner's inbox and
of the requester's reply buffer (S = ``slot_bytes``, the smaller of both sides'). Every notification is
``NOTIF`` (22 bytes, little-endian ``<cIQIIB``): kind, connection id, request id, slot, length, status.
  call   the requester WRITEs the payload into its inbox slot with notif ``Q``; the owner's poll thread runs
         the batch handler on it where it landed (a plain handler on a copy), WRITEs the reply into the
         requester's reply slot with notif ``R`` and a ``ReplyStatus`` (OK; HANDLER_ERROR or REFUSED: the slot
         holds the message). Empty payloads travel as a bare notif. Writes up to 16 KiB round up to a power of
         two; each side keeps its prepared WRITE handles by slot and size (``PreparedTransfers``, the least
         recently used released beyond 64), so a repeated message size is reposted, not prepared again.
  big    a request over ``slot_bytes`` takes as many adjacent slots as it needs (``length`` says how many) and its
         reply may use the same slots. Only a request bigger than the whole inbox, or one that finds no run of
         free slots, goes over the control channel as a TCP call (counted: ``NixlConnection.control_calls``; the
         first too big for the inbox logs a WARNING); a reply over its slots comes back as a TCP frame, announced
         by ``R`` with VIA_CONTROL. Nothing below ``max_request_bytes`` is refused for its size.
  read   one-sided READ of the region into ``out`` through the connection's registered staging buffer, which
         grows (registered anew) to fit the largest read so far up to ``staging_max_bytes``; a larger read
         registers ``out`` for the call. The READ handle of a (region, ranges) pair read through the staging
         buffer is kept (256, least recently used released first), so the next decode step's read of the same
         blocks is reposted, not prepared again. The owner's CPU is not involved.
  ping   notif ``P``, answered by the owner's poll thread with ``p``: ``NixlConnection.raw_notif_rtt``.
  wake   a requester quiet for longer than the owner's ``wake_after_s`` first sends a WAKE frame on the control
         socket, because the owner's poll thread may be in deep sleep.
A slot is reused only after its reply notif arrived, so a late reply never lands on a newer call. A dead owner
is invisible to UCX in error mode none, so waits also watch the control socket for EOF (every ~1 ms).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping

import numpy as np

from qroute.core.handshake import pack_fields, unpack_fields
from qroute.errors import (
    ConfigError,
    HandshakeMismatch,
    WireError,
)
from qroute.transport.base import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_TIMEOUT_S,
    BatchHandler,
    Buffer,
    Handler,
    HelloCheck,
    Transport,
    deadline_after,
)
from qroute.transport.nixl_agent import (
    NOTIF,
    NixlAgent,
    RegHandle,
    require_nixl,
)
from qroute.transport.nixl_connection import NixlConnection
from qroute.transport.nixl_owner import NixlServer
from qroute.transport.tcp import TcpConnection, tcp_connect


class NixlTransport(Transport):
    """Options (all keyword):
    ``slot_bytes``, ``num_slots``  per-connection inbox geometry (1 MiB x 8); a payload over one slot takes
        adjacent slots, one over the whole inbox the control channel. An owner grants ``min(its slot_bytes, the
        requester's)`` and at most ``max_slots`` slots.
    ``staging_bytes``, ``staging_max_bytes``  a connection's registered staging buffer for reads starts at the
        first (64 KiB) and grows to fit the largest read, up to the second (16 MiB); a read over that registers
        ``out`` for its duration.
    ``spin_s``, ``idle_sleep_s``, ``deep_idle_s``  poll back-off (2 ms of sched_yield, then 50 us sleeps; an
        owner idle for 20 ms sleeps until woken).
    ``reply_timeout_s``  how long an owner tries to write one reply.
    ``host``, ``port``, ``max_connections``, ``handshake_timeout_s``, ``io_timeout_s``  the control socket
        (see ``TcpTransport``)."""

    name = "nixl"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, slot_bytes: int = 1 << 20, num_slots: int = 8,
                 max_slots: int = 64, staging_bytes: int = 1 << 16, staging_max_bytes: int = 16 << 20,
                 spin_s: float = 2e-3,
                 idle_sleep_s: float = 50e-6, deep_idle_s: float = 20e-3, reply_timeout_s: float = 5.0,
                 max_connections: int = 64, handshake_timeout_s: float = 5.0, io_timeout_s: float = 30.0):
        if slot_bytes < 1 or not 1 <= num_slots <= max_slots or not 1 <= staging_bytes <= staging_max_bytes:
            raise ConfigError(f"nixl: need slot_bytes >= 1, 1 <= num_slots <= max_slots, 1 <= staging_bytes <= "
                              f"staging_max_bytes; got slot_bytes={slot_bytes} num_slots={num_slots} "
                              f"max_slots={max_slots} staging_bytes={staging_bytes} "
                              f"staging_max_bytes={staging_max_bytes}")
        if not 0 <= spin_s <= deep_idle_s or idle_sleep_s <= 0:
            raise ConfigError(f"nixl: need 0 <= spin_s <= deep_idle_s and idle_sleep_s > 0; got spin_s={spin_s} "
                              f"idle_sleep_s={idle_sleep_s} deep_idle_s={deep_idle_s}")
        self.slot_bytes, self.num_slots, self.max_slots = slot_bytes, num_slots, max_slots
        self.staging_bytes, self.staging_max_bytes = staging_bytes, staging_max_bytes
        self.reply_timeout_s = reply_timeout_s
        self.spin_s, self.idle_sleep_s, self.deep_idle_s = spin_s, idle_sleep_s, deep_idle_s
        self._tcp_opts = dict(host=host, port=port, max_connections=max_connections,
                              handshake_timeout_s=handshake_timeout_s, io_timeout_s=io_timeout_s)
        self._agent: NixlAgent | None = None
        self._lock = threading.Lock()
        self._pump_lock = threading.Lock()
        self._conns: dict[tuple[str, int], NixlConnection] = {}

    def server(self, handler: Handler, *, regions: Mapping[str, Buffer] | None = None, secret: bytes,
               on_hello: HelloCheck | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               batch_handler: BatchHandler | None = None) -> NixlServer:
        require_nixl()  # fail now, with the install hint, rather than at start()
        return NixlServer(handler, regions=regions, secret=secret, on_hello=on_hello, batch_handler=batch_handler,
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
