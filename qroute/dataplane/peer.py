"""A requester's view of one owner: its connection, its health (``Peer``) and the fabric measured to it.

``Peer``: calls (routes) and reads (fetches) fail separately, and a failed peer is skipped for a while.
``probe_fabric``: the configured fabric profile prices every peer alike; this replaces its probe latencies with
the ones measured on a peer's connection at connect (and again every so often, ``Router.refresh_probes``), so that
a near peer and a far one (NVLink inside a node, RDMA or TCP between nodes) are decided apart
(``Router.fabric_for``). ``fastest_link``: where several transports reach one owner, the one with the lower probed
round trip is kept, as the seed paper prescribes.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Mapping, Sequence

import numpy as np

from qroute.core.costmodel import FabricProfile
from qroute.dataplane.shard import BlockRows, ready_region_name
from qroute.errors import ConfigError, ErrorCode, RemoteError, TransportError
from qroute.transport import Connection, SupportsOneSidedRead, SupportsRawPing

logger = logging.getLogger(__name__)

DEAD_PEER_BACKOFF_S = 5.0  # skip a peer that just failed for this long before trying it again
PROBES = 8  # round trips timed per probe (the median counts)
BANDWIDTH_PROBE_BYTES = 256 << 10  # one READ this big, less a small one, times the link's read bandwidth
BANDWIDTH_PROBES = 3
PROBES_KEPT = 5  # a peer is priced on the median of its last this many probes: one probe on a busy core moves nothing


class Peer:
    """A connection to one owner and that owner's shard layout (for one-sided reads).

    Calls (routes) and reads (fetches) fail separately: a stalled owner may time out calls while its memory is
    still readable one-sidedly.
    """

    __slots__ = ("instance_id", "connection", "block_rows", "calls_failed_at", "reads_failed_at", "fabric",
                 "base_fabric", "probed_at", "probes", "ready_blocks", "all_ready")  # fmt: skip

    def __init__(self, instance_id: str, connection, block_rows: BlockRows, fabric: FabricProfile | None = None,
                 base_fabric: FabricProfile | None = None):  # fmt: skip
        self.instance_id = instance_id
        self.connection = connection
        self.block_rows = block_rows
        self.calls_failed_at = -float("inf")
        self.reads_failed_at = -float("inf")
        self.base_fabric = base_fabric or fabric  # the link's configured profile, which a new probe starts from
        self.probes: list[FabricProfile] = []  # the last PROBES_KEPT probed profiles
        self.fabric: FabricProfile | None = None  # what prices this peer's blocks; None: not probed
        self.probed_at = time.monotonic()
        if fabric is not None:
            self.probed(fabric)
        self.ready_blocks: np.ndarray | None = None  # the owner's ready flags as last read
        self.all_ready = False  # every block it holds was ready: its flags need no more reading

    @property
    def can_call(self) -> bool:
        return time.monotonic() - self.calls_failed_at > DEAD_PEER_BACKOFF_S

    @property
    def can_read(self) -> bool:
        return time.monotonic() - self.reads_failed_at > DEAD_PEER_BACKOFF_S

    @property
    def alive(self) -> bool:
        return self.can_call and self.can_read

    @property
    def link_broken(self) -> bool:
        """Its reads failed too (or the link is gone: ``failed`` marks both then): a new connection is needed. Calls
        alone that timed out on a one-sided link are a busy owner: the link stays, for fetches and late replies."""
        return not self.can_read

    def failed(self, exc: Exception, *, reading: bool) -> None:
        """Back off from this peer after a transport failure of a call or a read."""
        now = time.monotonic()
        if reading:
            self.reads_failed_at = now
        else:
            self.calls_failed_at = now
        one_sided = isinstance(self.connection, SupportsOneSidedRead)
        if isinstance(exc, ConnectionError) or not one_sided:  # gone (RemoteDisconnected too), or reads need its CPU
            self.calls_failed_at = self.reads_failed_at = now

    def probed(self, profile: FabricProfile) -> None:
        """Take a new probe: the peer is priced on the median, over its last ``PROBES_KEPT`` probes, of each
        measured figure (so that one probe taken while a core was busy does not flip its decisions)."""
        self.probes = [*self.probes[-(PROBES_KEPT - 1):], profile]
        self.probed_at = time.monotonic()
        figures = {name: statistics.median(getattr(p, name) for p in self.probes)
                   for name in ("probe_us", "fetch_probe_us", "fetch_bandwidth_gbps")
                   if all(getattr(p, name) is not None for p in self.probes)}  # fmt: skip
        self.fabric = dataclasses.replace(profile, **figures)

    def check_ready(self, corpus: str, block_ids: Sequence[int], timeout_s: float) -> None:
        """Raise ``RemoteError(NOT_READY)`` unless the owner has stored ``block_ids`` (its flags are read again,
        one-sidedly, while any of them is not known ready): a one-sided read of rows it has not stored would
        return zeros. A restarted owner is a new connection, so a new ``Peer`` that reads its flags afresh."""
        if self.all_ready:
            return
        known = self.ready_blocks
        if known is not None and known[list(block_ids)].all():
            return
        flags = np.empty(self.connection.region_sizes.get(ready_region_name(corpus), 0), np.uint8)
        if flags.size == 0:
            raise RemoteError(ErrorCode.NOT_READY, f"owner {self.instance_id!r} exposes no ready flags")
        self.connection.read(ready_region_name(corpus), [(0, flags.size)], flags, timeout_s)
        self.ready_blocks = flags
        self.all_ready = bool(flags[list(self.block_rows)].all())
        missing = [b for b in block_ids if not flags[b]]
        if missing:
            raise RemoteError(ErrorCode.NOT_READY, f"owner {self.instance_id!r} has not stored blocks {missing[:8]}")

    def __repr__(self) -> str:
        return f"Peer({self.instance_id!r}, can_call={self.can_call}, can_read={self.can_read})"


def probe_fabric(fabric: FabricProfile, connection: Connection, region: str) -> FabricProfile:
    """``fabric`` with the small-message and small-READ round trips to one peer measured on ``connection`` (the
    median of ``PROBES``) and its READ bandwidth (a ``BANDWIDTH_PROBE_BYTES`` READ less a small one, where the
    region is that big): a near peer and a far one are priced apart. A probe that fails leaves the profile's."""
    timings: dict[str, float] = {}
    size = connection.region_sizes.get(region, 0)
    try:
        if isinstance(connection, SupportsRawPing):
            timings["probe_us"] = statistics.median(connection.raw_notif_rtt(PROBES)) * 1e6
        if size >= 64:  # every connection reads (one-sidedly or not)
            small = _median_read_s(connection, region, 64, PROBES)
            timings["fetch_probe_us"] = small * 1e6
            timings.setdefault("probe_us", timings["fetch_probe_us"])  # no raw ping (TCP): a READ is a call too
        if size >= BANDWIDTH_PROBE_BYTES:
            big = _median_read_s(connection, region, BANDWIDTH_PROBE_BYTES, BANDWIDTH_PROBES)
            if big > small:  # GB/s = bytes per microsecond / 1e3
                timings["fetch_bandwidth_gbps"] = BANDWIDTH_PROBE_BYTES / ((big - small) * 1e6 * 1e3)
    except (TransportError, ConnectionError, ConfigError) as exc:
        logger.warning("qroute: probing a peer failed (%s); its blocks are priced with fabric %r", exc, fabric.name)
        return fabric
    return dataclasses.replace(fabric, **timings) if timings else fabric


def _median_read_s(connection: Connection, region: str, num_bytes: int, times: int) -> float:
    out = np.empty(num_bytes, np.uint8)
    reads = []
    for _ in range(times):
        start = time.perf_counter()
        connection.read(region, [(0, num_bytes)], out, 2.0)
        reads.append(time.perf_counter() - start)
    return statistics.median(reads)


def fastest_link(candidates: Mapping[str, tuple[Connection, FabricProfile]], region: str
                 ) -> tuple[str, FabricProfile, dict[str, float]]:  # fmt: skip
    """Of several connections to one owner (transport -> (connection, that transport's configured profile)): the
    transport whose probed small-message round trip is the lowest (ties: the first listed), its probed profile,
    and every candidate's probed round trip in microseconds."""
    probed = {name: probe_fabric(fabric, connection, region) for name, (connection, fabric) in candidates.items()}
    best = min(probed, key=lambda name: probed[name].probe_us)
    return best, probed[best], {name: profile.probe_us for name, profile in probed.items()}
