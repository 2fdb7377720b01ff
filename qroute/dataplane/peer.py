"""A requester's view of one owner: its connection, its health (``Peer``) and the fabric measured to it.

``Peer``: calls (routes) and reads (fetches) fail separately, and a failed peer is skipped for a while.
``probe_fabric``: the configured fabric profile prices every peer alike; this replaces its probe latencies with
the ones measured on a peer's connection at connect, so that a near peer and a far one (NVLink inside a node, RDMA
or TCP between nodes) are decided apart (``Router.fabric_for``).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time

import numpy as np

from qroute.core.costmodel import FabricProfile
from qroute.dataplane.shard import BlockRows
from qroute.errors import ConfigError, TransportError
from qroute.transport import Connection, SupportsOneSidedRead, SupportsRawPing

logger = logging.getLogger(__name__)

DEAD_PEER_BACKOFF_S = 5.0  # skip a peer that just failed for this long before trying it again
PROBES = 8  # round trips timed per probe (the median counts)


class Peer:
    """A connection to one owner and that owner's shard layout (for one-sided reads).

    Calls (routes) and reads (fetches) fail separately: a stalled owner may time out calls while its memory is
    still readable one-sidedly.
    """

    __slots__ = ("instance_id", "connection", "block_rows", "calls_failed_at", "reads_failed_at", "fabric")

    def __init__(self, instance_id: str, connection, block_rows: BlockRows, fabric: FabricProfile | None = None):
        self.instance_id = instance_id
        self.connection = connection
        self.block_rows = block_rows
        self.calls_failed_at = -float("inf")
        self.reads_failed_at = -float("inf")
        self.fabric = fabric  # the profile with this peer's probe latencies measured at connect; None: not probed

    @property
    def can_call(self) -> bool:
        return time.monotonic() - self.calls_failed_at > DEAD_PEER_BACKOFF_S

    @property
    def can_read(self) -> bool:
        return time.monotonic() - self.reads_failed_at > DEAD_PEER_BACKOFF_S

    @property
    def alive(self) -> bool:
        return self.can_call and self.can_read

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

    def __repr__(self) -> str:
        return f"Peer({self.instance_id!r}, can_call={self.can_call}, can_read={self.can_read})"


def probe_fabric(fabric: FabricProfile, connection: Connection, region: str) -> FabricProfile:
    """``fabric`` with the small-message and small-READ round trips to one peer measured on ``connection`` (the
    median of ``PROBES``): a near peer and a far one are priced apart. A probe that fails leaves the profile's."""
    timings: dict[str, float] = {}
    try:
        if isinstance(connection, SupportsRawPing):
            timings["probe_us"] = statistics.median(connection.raw_notif_rtt(PROBES)) * 1e6
        if connection.region_sizes.get(region, 0) >= 64:  # every connection reads (one-sidedly or not)
            out = np.empty(64, np.uint8)
            reads = []
            for _ in range(PROBES):
                start = time.perf_counter()
                connection.read(region, [(0, 64)], out, 2.0)
                reads.append(time.perf_counter() - start)
            timings["fetch_probe_us"] = statistics.median(reads) * 1e6
            timings.setdefault("probe_us", timings["fetch_probe_us"])  # no raw ping (TCP): a READ is a call too
    except (TransportError, ConnectionError, ConfigError) as exc:
        logger.warning("qroute: probing a peer failed (%s); its blocks are priced with fabric %r", exc, fabric.name)
        return fabric
    return dataclasses.replace(fabric, **timings) if timings else fabric
