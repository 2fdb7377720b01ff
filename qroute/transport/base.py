"""The transport contract: move opaque bytes between a requester and an owner.

Index (side that calls it, how often, whether a repeat is safe, who owns buffers):

Transport (one per process and kind; ``qroute.transport.get_transport(name, **opts)``)
  ``server(handler, *, regions, secret, on_hello, max_request_bytes, batch_handler)``  owner, once per service.
      Returns a ``Server`` that is not started. The transport keeps no reference to ``regions``; the server does.
  ``connect(address, *, secret, hello, timeout_s)``  requester, once per owner. The one handshake
      (``qroute.core.handshake``): both sides prove the shared secret over both nonces and what they carry,
      and ``hello`` goes to the owner's ``on_hello``. Raises HandshakeMismatch (wrong secret, rejected
      hello), RemoteDisconnected (nobody listens), TransportTimeout.
  ``close()``  once at shutdown; safe twice. Connections and servers must be closed first.

Server (owner side)
  ``start() -> address``  once. ``address`` is what requesters pass to ``connect``.
  ``stop()``  once; safe twice. Open connections then fail with RemoteDisconnected.
  ``stats() -> MetricsSnapshot``  any time, any thread; the ``qroute.metrics.SERVER`` counters.
  ``handler(payload) -> reply`` is called by the transport, possibly from several threads at once (TCP: one
      thread per connection; NIXL: its poll thread, and connection threads for payloads over a slot;
      loopback: one worker). An exception in it becomes a TransportError on the requester; the server keeps
      serving. ``payload`` is a fresh ``bytes`` the handler may keep; the reply is bytes-like.
  ``batch_handler(payloads) -> replies`` (optional) answers calls that arrived together, one reply each in order,
      so that the owner can answer them with one computation. NIXL's poll thread passes it every call one poll
      pass found (one or more); TCP and loopback serve calls one at a time and use ``handler`` only. An exception
      in it fails every call of the batch. Its payloads are bytes-like views valid only until it returns (NIXL:
      of the inbox slots the calls landed in, not copied): copy what it keeps.
  ``regions`` (name -> contiguous numpy array or torch CPU tensor) are the ONLY memory peers may read. The
      caller owns them and must keep them alive and unmoved until ``stop()`` returns; peers may read them at
      any time (a NIXL read does not involve the owner's CPU), so writes race with reads.

Connection (requester side; thread-safe, share one per owner between threads)
  ``call(payload, timeout_s) -> bytes``  per request; = ``post(payload).wait(timeout_s)``.
  ``post(payload, *, timeout_s) -> PendingCall``  per request; returns once the request is sent (``timeout_s``
      bounds the send). Post to several owners, compute locally, then wait on each.
  ``read(region, ranges, out, timeout_s)``  per fetch; one-sided read of ``ranges`` (byte offset, length) of
      the owner's region, concatenated into the first bytes of ``out`` (a writable contiguous buffer the
      caller owns; it is written only until ``read`` returns or raises). Unknown regions, out-of-bounds ranges
      or a too small ``out`` raise ConfigError before anything is sent.
  ``region_sizes``  name -> nbytes, fixed at handshake. ``hello_reply``  bytes ``on_hello`` returned.
  ``close()``  once; safe twice. Pending calls then fail with RemoteDisconnected.

PendingCall
  ``wait(timeout_s) -> bytes``  once, or again after a TransportTimeout (the call stays registered and a late
      reply still completes it). After a result or error, repeats return or raise the same thing.
  ``done() -> bool``  non-blocking (it takes in replies that already arrived); True once ``wait`` would not block.

Every wait has a deadline: expiry raises TransportTimeout; a peer known to be gone raises RemoteDisconnected.
A payload over the owner's ``max_request_bytes`` raises TransportError without being sent (the owner also
refuses it without allocating it). Optional features are declared by mixins (``SupportsRawPing``,
``SupportsOneSidedRead``).
"""

from __future__ import annotations

import abc
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qroute.errors import ConfigError
from qroute.metrics import MetricsSnapshot

Handler = Callable[[bytes], bytes]
BatchHandler = Callable[[Sequence[bytes | memoryview]], list[bytes]]
HelloCheck = Callable[[bytes], bytes]
Buffer = Any  # numpy array, torch CPU tensor, bytearray, memoryview: anything byte_view accepts

DEFAULT_MAX_REQUEST_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 10.0


class PendingCall(abc.ABC):
    """A request that was sent; its reply is collected with ``wait``."""

    __slots__ = ()

    @abc.abstractmethod
    def wait(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes: ...

    @abc.abstractmethod
    def done(self) -> bool: ...


class Connection(abc.ABC):
    """Requester side of one owner. Thread-safe."""

    hello_reply: bytes
    region_sizes: Mapping[str, int]

    def call(self, payload: bytes, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
        deadline = deadline_after(timeout_s)
        return self.post(payload, timeout_s=timeout_s).wait(max(remaining(deadline), 1e-6))

    @abc.abstractmethod
    def post(self, payload: bytes, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> PendingCall: ...

    @abc.abstractmethod
    def read(self, region: str, ranges: Sequence[tuple[int, int]], out: Buffer,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Server(abc.ABC):
    """Owner side: answers calls with ``handler`` and exposes ``regions`` to reads."""

    @abc.abstractmethod
    def start(self) -> str: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def stats(self) -> MetricsSnapshot: ...


class Transport(abc.ABC):
    """Factory for servers and connections of one kind."""

    name: str = ""

    @abc.abstractmethod
    def server(self, handler: Handler, *, regions: Mapping[str, Buffer] | None = None, secret: bytes,
               on_hello: HelloCheck | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               batch_handler: BatchHandler | None = None) -> Server: ...

    @abc.abstractmethod
    def connect(self, address: str, *, secret: bytes, hello: bytes = b"",
                timeout_s: float = DEFAULT_TIMEOUT_S) -> Connection: ...

    def close(self) -> None:  # noqa: B027 - optional: only transports with process-wide state override it
        """Release transport-wide resources; safe twice."""


class SupportsOneSidedRead(abc.ABC):  # noqa: B024 - a declaration: it adds no method
    """Connections whose ``read`` needs no CPU on the owner (NIXL READ): a read may still succeed from an owner
    whose calls time out (stalled, overloaded), so a requester should try it before giving up on that owner."""


class SupportsRawPing(abc.ABC):
    """Connections that can measure the fabric's bare notification round trip (for ``qroute bench``)."""

    @abc.abstractmethod
    def raw_notif_rtt(self, n: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[float]:
        """Round-trip times in seconds of ``n`` sequential pings answered by the owner's poll thread."""


# ---- buffers -------------------------------------------------------------------------------------------


def byte_view(buf: Buffer, *, writable: bool, what: str) -> np.ndarray:
    """A flat uint8 numpy view sharing ``buf``'s memory (numpy array, torch CPU tensor or buffer object)."""
    torch = sys.modules.get("torch")  # only a tensor if torch is already imported: never import it here
    if torch is not None and isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ConfigError(f"{what}: need a contiguous CPU tensor, got device={buf.device} "
                              f"contiguous={buf.is_contiguous()}")
        flat = buf.detach().reshape(-1)
        # view(uint8) also works for dtypes numpy lacks (bfloat16, float8)
        view = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
    elif isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ConfigError(f"{what}: need a C-contiguous array, got strides {buf.strides}")
        view = buf.reshape(-1).view(np.uint8)
    else:
        try:
            view = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what}: need a numpy array, torch CPU tensor or contiguous buffer, "
                              f"got {type(buf).__name__}") from exc
    if writable and not view.flags.writeable:
        raise ConfigError(f"{what}: buffer is read-only")
    return view


def buffer_address(view: np.ndarray) -> int:
    """Address of the first byte of a view from ``byte_view``."""
    return int(view.ctypes.data)


def region_views(regions: Mapping[str, Buffer] | None) -> dict[str, np.ndarray]:
    """Validate a server's regions and return read-only byte views of them."""
    out: dict[str, np.ndarray] = {}
    for name, buf in (regions or {}).items():
        if not isinstance(name, str) or not name or len(name.encode()) > 255:
            raise ConfigError(f"regions: names must be non-empty str of at most 255 bytes, got {name!r}")
        view = byte_view(buf, writable=False, what=f"regions[{name!r}]")
        out[name] = view
    return out


def check_read(region_sizes: Mapping[str, int], region: str, ranges: Sequence[tuple[int, int]],
               out_nbytes: int) -> int:
    """Validate a read before any transfer; return the total number of bytes."""
    if region not in region_sizes:
        raise ConfigError(f"read: unknown region {region!r}; the owner registered {sorted(region_sizes)}")
    size = region_sizes[region]
    total = 0
    for offset, length in ranges:
        if offset < 0 or length < 0 or offset + length > size:
            raise ConfigError(f"read: range (offset={offset}, length={length}) is outside region {region!r} "
                              f"of {size} bytes")
        total += length
    if total > out_nbytes:
        raise ConfigError(f"read: ranges total {total} bytes but out holds only {out_nbytes}")
    return total


# ---- deadlines -----------------------------------------------------------------------------------------


def deadline_after(timeout_s: float) -> float:
    if not (isinstance(timeout_s, int | float) and timeout_s > 0 and math.isfinite(timeout_s)):
        raise ConfigError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    return time.monotonic() + timeout_s


def remaining(deadline: float) -> float:
    return deadline - time.monotonic()
