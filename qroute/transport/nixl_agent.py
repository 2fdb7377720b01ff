"""The thin NIXL binding (one agent class, opaque handles) and the message layout both NIXL sides share.

Settings for hosts without a GPU (shared/notes/nixl-cpu.md): ``UCX_TLS=sm,self`` (setdefault, before NIXL is
imported), progress thread off (it spins a core), UCX error mode ``none`` (allows the shared-memory
transports; UCX then cannot see a dead peer). Initiators poll ``check_xfer_state`` until DONE: the polling is
what completes a transfer and sends its notification. ``nixl`` is imported on first use only.
"""

from __future__ import annotations

import enum
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from qroute.errors import ConfigError, RemoteDisconnected, TransportError, TransportTimeout
from qroute.transport.base import buffer_address

# ---- message layout (see nixl.py) ---------------------------------------------------------------------------

NOTIF = struct.Struct("<cIQIIB")  # kind, connection id, request id, slot, length, status
CALL, REPLY, PING, PONG = b"Q", b"R", b"P", b"p"
CACHED_CLASS_MAX = 16 << 10  # writes up to this size round their length up to a power of 2 (see size_class)
HANDLES_KEPT = 64  # prepared WRITE handles one connection keeps (PreparedTransfers)
READS_KEPT = 256  # prepared READ handles one connection keeps: a decode step reads each layer's parts again


# What this process holds in NIXL right now (agents: created so far): read by the soak and by /metrics, so that a
# leaked registration, transfer handle or remote agent shows as a count that keeps growing.
_LIVE_LOCK = threading.Lock()
_LIVE = {"agents": 0, "registrations": 0, "registered_bytes": 0, "xfer_handles": 0, "remote_agents": 0}


def _count_live(name: str, n: int) -> None:
    with _LIVE_LOCK:
        _LIVE[name] += n


def live_counts() -> dict[str, int]:
    """This process's NIXL agents created, and its registrations (and bytes), transfer handles and remote agents
    held now."""
    with _LIVE_LOCK:
        return dict(_LIVE)


class ReplyStatus(enum.IntEnum):
    OK = 0
    HANDLER_ERROR = 1  # the reply slot holds the error message
    REFUSED = 2  # the reply slot holds the reason
    VIA_CONTROL = 3  # the reply is a REPLY frame on the control socket


def slot_span(n: int, slot_bytes: int) -> int:
    """Adjacent slots an n-byte message takes (at least one: an empty call still holds its slot)."""
    return max(1, -(-n // slot_bytes))


def size_class(n: int, cap: int) -> int:
    """Bytes written for an n-byte message: small ones round up to a power of two, so that few sizes (and prepared
    handles) serve them all; larger ones are written as they are (rounding would move up to twice the bytes)."""
    if n > CACHED_CLASS_MAX:
        return n
    c = 256
    while c < n:
        c <<= 1
    return min(c, cap)


# ---- binding --------------------------------------------------------------------------------------------------


class XferState(enum.Enum):
    DONE = "DONE"
    IN_PROGRESS = "PROC"
    ERROR = "ERR"


_API: Any = None


def _nixl() -> Any:
    """Import NIXL on first use (heavy), after setting what UCX reads at start-up."""
    global _API
    if _API is None:
        os.environ.setdefault("UCX_TLS", "sm,self")  # CMA for data, shared memory for notifications
        os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs INFO lines to stdout otherwise
        try:
            import nixl  # noqa: F401 - picks the installed nixl_cu12/nixl_cu13 build
            from nixl import _api, _bindings
        except ImportError as exc:
            raise ConfigError("transport 'nixl' needs NIXL: pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1 "
                              f"(or choose transport 'tcp'); import failed: {exc}") from exc
        _API = (_api, _bindings)
    return _API


def require_nixl() -> None:
    """Raise ConfigError with the install command when NIXL is missing."""
    _nixl()


class XferHandle:
    """One NIXL transfer request; repostable once DONE."""

    __slots__ = ("_agent", "_nixl", "label", "_released")

    def __init__(self, agent: NixlAgent, handle: Any, label: str):
        self._agent, self._nixl, self.label, self._released = agent, handle, label, False
        _count_live("xfer_handles", 1)

    def post(self, notif: bytes = b"") -> XferState:
        return XferState(self._agent.guard(f"post {self.label}", self._agent.raw.transfer, self._nixl, notif))

    def state(self) -> XferState:
        return XferState(self._agent.guard(f"check {self.label}", self._agent.raw.check_xfer_state, self._nixl))

    def release(self) -> None:
        if not self._released:
            self._released = True
            _count_live("xfer_handles", -1)
            with self._agent.lock:
                self._agent.guard(f"release {self.label}", self._nixl.release)

    def __repr__(self) -> str:
        return f"XferHandle({self.label}, released={self._released})"


class RegHandle:
    """Memory registered with the agent; ``release`` deregisters it."""

    __slots__ = ("_agent", "descs", "addr", "nbytes", "_released")

    def __init__(self, agent: NixlAgent, descs: Any, addr: int, nbytes: int):
        self._agent, self.descs, self.addr, self.nbytes, self._released = agent, descs, addr, nbytes, False
        _count_live("registrations", 1)
        _count_live("registered_bytes", nbytes)

    def release(self) -> None:
        if not self._released:
            self._released = True
            _count_live("registrations", -1)
            _count_live("registered_bytes", -self.nbytes)
            with self._agent.lock:
                self._agent.guard("deregister", self._agent.raw.deregister_memory, self.descs)

    def __repr__(self) -> str:
        return f"RegHandle(0x{self.addr:x}, {self.nbytes} B, released={self._released})"


class NixlAgent:
    """A NIXL agent with UCX set up for CPU hosts. Every call into NIXL holds ``lock`` (the agent is created
    without NIXL's own thread safety, and several threads share it)."""

    def __init__(self, role: str):
        api, self._bindings = _nixl()
        self.name = f"qroute-{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        cfg = api.nixl_agent_config(enable_prog_thread=False, backends=[])
        self.raw = api.nixl_agent(self.name, cfg)
        self.raw.create_backend("UCX", {"ucx_error_handling_mode": "none"})
        self.lock = threading.RLock()
        self._remotes: dict[str, int] = {}
        _count_live("agents", 1)

    def guard(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call into NIXL, turning its exceptions into qroute's."""
        try:
            return fn(*args)
        except self._bindings.nixlRemoteDisconnectError:
            raise RemoteDisconnected(f"NIXL {what}: the peer is gone") from None
        except self._bindings.nixlNotFoundError as exc:
            raise TransportError(f"NIXL {what}: memory not registered or not exposed by the peer ({exc})") from None
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise TransportError(f"NIXL {what}: {type(exc).__name__}: {exc}") from None

    def register(self, view: np.ndarray) -> RegHandle:
        addr = buffer_address(view)
        with self.lock:
            descs = self.guard("register", self.raw.register_memory, [(addr, view.nbytes, 0, "")], "DRAM")
        return RegHandle(self, descs, addr, view.nbytes)

    def partial_metadata(self, regs: Sequence[RegHandle]) -> bytes:
        """Connection info plus these registrations only: all a peer will ever be able to touch."""
        with self.lock:
            descs = self.raw.get_reg_descs([(r.addr, r.nbytes, 0, "") for r in regs], "DRAM")
            return self.guard("metadata", self.raw.get_partial_agent_metadata, descs, True)

    def add_remote(self, metadata: bytes) -> str:
        with self.lock:
            name = self.guard("add remote agent", self.raw.add_remote_agent, metadata)
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name not in self._remotes:
                _count_live("remote_agents", 1)
            self._remotes[name] = self._remotes.get(name, 0) + 1  # several connections may share a peer
        return name

    def remove_remote(self, name: str) -> None:
        with self.lock:
            count = self._remotes.get(name, 0) - 1
            if count > 0:
                self._remotes[name] = count
                return
            if self._remotes.pop(name, None) is not None:
                _count_live("remote_agents", -1)
            try:
                self.guard("remove remote agent", self.raw.remove_remote_agent, name)
            except TransportError:
                pass  # already gone

    def xfer(self, op: str, local: np.ndarray, remote: np.ndarray, peer: str, label: str) -> XferHandle:
        """A transfer between Nx3 uint64 descriptor arrays of (address, length, 0)."""
        with self.lock:
            loc = self.raw.get_xfer_descs(local, "DRAM")
            rem = self.raw.get_xfer_descs(remote, "DRAM")
            handle = self.guard(f"prepare {label}", self.raw.initialize_xfer, op, loc, rem, peer)
        return XferHandle(self, handle, label)

    def run(self, handle: XferHandle, notif: bytes, deadline: float) -> None:
        """Post and poll to DONE."""
        with self.lock:
            state = handle.post(notif)
        while state is XferState.IN_PROGRESS:
            if time.monotonic() > deadline:
                handle.release()  # cancels; raises if NIXL cannot, and then the memory must not be reused
                raise TransportTimeout(f"NIXL {handle.label}: not done before the deadline")
            os.sched_yield()
            with self.lock:
                state = handle.state()
        if state is XferState.ERROR:
            raise TransportError(f"NIXL {handle.label}: transfer failed")

    def notifs(self) -> dict[str, list[bytes]]:
        with self.lock:
            return self.guard("get notifications", self.raw.get_new_notifs)

    def send_notif(self, peer: str, msg: bytes) -> None:
        with self.lock:
            self.guard("send notification", self.raw.send_notif, peer, msg)

    def __repr__(self) -> str:
        return f"NixlAgent({self.name}, remotes={sorted(self._remotes)})"


class PreparedTransfers:
    """Prepared NIXL transfers kept by key (a WRITE by ``(slot, bytes written)``, a READ by region and ranges), the
    least recently used released beyond ``limit``. Preparing one costs tens of microseconds (more at real model
    sizes: a 128-head query row is 295 KB), and a decode step's messages and reads repeat the last step's, so they
    are prepared once and reposted. Used by one thread at a time (the requester under its connection lock, the
    owner on its poll thread)."""

    def __init__(self, limit: int = HANDLES_KEPT):
        self.limit = limit
        self._kept: dict[Hashable, XferHandle] = {}  # insertion order: least recently used first

    def get(self, key: Hashable, prepare: Callable[[], XferHandle]) -> XferHandle:
        handle = self._kept.pop(key, None)
        if handle is None:
            handle = prepare()
        self._kept[key] = handle
        if len(self._kept) > self.limit:
            self._kept.pop(next(iter(self._kept))).release()
        return handle

    def drop(self, key: Hashable) -> None:
        """Forget (and release) the handle of a transfer that failed: it is not reposted."""
        handle = self._kept.pop(key, None)
        if handle is not None:
            handle.release()

    def release_all(self) -> None:
        for handle in self._kept.values():
            try:
                handle.release()
            except TransportError:
                pass
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)


def descs(pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Nx3 descriptor array from (address, length) pairs."""
    arr = np.zeros((len(pairs), 3), dtype=np.uint64)
    if pairs:
        arr[:, :2] = np.asarray(pairs, dtype=np.uint64)
    return arr


class Backoff:
    """How a poller waits while idle: sched_yield (other threads and processes still run) for ``spin_s``, then
    sleeps of ``sleep_s``; after ``deep_after_s`` it blocks on ``wake`` (if given) for up to ``deep_sleep_s``."""

    __slots__ = ("_since", "spin_s", "sleep_s", "deep_after_s", "deep_sleep_s", "wake")

    def __init__(self, spin_s: float, sleep_s: float, deep_after_s: float = float("inf"),
                 deep_sleep_s: float = 0.05, wake: threading.Event | None = None):
        self.spin_s, self.sleep_s, self.deep_after_s, self.deep_sleep_s = spin_s, sleep_s, deep_after_s, deep_sleep_s
        self.wake = wake
        self._since = time.monotonic()

    def busy(self) -> None:
        """Work arrived: spin again."""
        self._since = time.monotonic()

    def pause(self) -> None:
        idle = time.monotonic() - self._since
        if idle < self.spin_s:
            os.sched_yield()
        elif idle < self.deep_after_s or self.wake is None:
            time.sleep(self.sleep_s)
        elif self.wake.wait(self.deep_sleep_s):
            self.wake.clear()  # a requester rang: its notification is on the way, spin for it
            self.busy()
