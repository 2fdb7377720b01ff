"""Following membership: an instance's thread that keeps its record, copies the chunks it gains, and tells the
router when the routing placement changes (``qroute.dataplane.membership`` has the rules).

A gained chunk is copied from a holder whose record says it is ready: its ready flags are read one-sidedly
first (a restarted holder's store is empty), then every layer's rows, byte for byte, into rows of this store
that are not served yet (``CorpusShard.add_chunks``); only then is the chunk marked ready. The copy is the
holder's rows, so a moved chunk is exactly what its old owner served. Chunks an instance was started to own
are prefilled by the launcher (``prefilled``) and never copied. Engine-free: the vLLM worker runs one
``MembershipFollower``; tests run it with loopback owners.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping

import numpy as np
import torch

from qroute.core.placement import ChunkEntry, CorpusDirectory
from qroute.dataplane.etcd_client import EtcdError
from qroute.dataplane.membership import (
    MemberRecord,
    Membership,
    MemberState,
    leave_complete,
    member_layouts,
    routing_members,
    target_members,
)
from qroute.dataplane.shard import BlockRows, CorpusShard, byte_ranges, chunk_blocks, chunk_layout, ready_region_name
from qroute.dataplane.shard import region_name as layer_region
from qroute.errors import CorpusError, QRouteError
from qroute.transport.base import Connection

__all__ = ["MembershipFollower"]

logger = logging.getLogger("vllm.qroute")

POLL_S = 0.5


class MembershipFollower:
    def __init__(
        self,
        membership: Membership,
        shard: CorpusShard,
        directory: CorpusDirectory,
        addresses: str | list[str],
        *,
        joining: bool,
        prefilled: Collection[int],
        configured: Mapping[str, str | list[str]],
        connect: Callable[[str, str | list[str]], Connection],
        set_members: Callable[[dict[str, str | list[str]]], None],
        on_routing: Callable[[CorpusDirectory, dict[str, BlockRows]], None],
        on_chunk_ready: Callable[[ChunkEntry], None],
        timeout_s: float = 2.0,
        poll_s: float = POLL_S,
    ):
        self.membership = membership
        self.shard = shard
        self.directory = directory  # any placement of the corpus: re-placed over each member set
        self.instance_id = membership.instance_id
        self.addresses = addresses
        self.state = MemberState.JOINING if joining else MemberState.SERVING
        self.prefilled = set(prefilled)
        self.configured = dict(configured)  # members started together: present until seen to go
        self.seen: set[str] = set()
        self.connect = connect
        self.set_members = set_members
        self.on_routing = on_routing
        self.on_chunk_ready = on_chunk_ready
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.routing: list[str] = []
        self.copied: list[int] = []  # chunks copied in, in order
        self.left = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record ---------------------------------------------------------------------------------

    def record(self) -> MemberRecord:
        ready, held = self.shard.ready, self.shard.store_chunks()
        stored = [c for c in held if all(ready[b] for b in chunk_blocks(self.directory, self.directory.chunk(c)))]
        return MemberRecord(self.instance_id, self.addresses, str(self.state), held, stored)

    def placement(self, members: list[str]) -> CorpusDirectory:
        return self.directory.with_instances(members, min(self.directory.replicas, len(members)))

    # -- one round ----------------------------------------------------------------------------------

    def step(self) -> None:
        """Renew, read the others, copy what this instance gains, publish, tell the router of a new routing set."""
        self.membership.keepalive()
        if self.state is MemberState.SERVING and self.membership.drain_requested():
            self.state = MemberState.LEAVING
            logger.info("qroute: %r asked to leave; its chunks move to their new owners first", self.instance_id)
        records = self._records()
        self.set_members({i: r.addresses for i, r in records.items() if i != self.instance_id})
        target = target_members(records)
        if self.instance_id in target:
            self._gain(records, self.placement(target))
            records[self.instance_id] = self.record()
        mine = self.placement(target).chunks_of(self.instance_id) if self.instance_id in target else ()
        if self.state is MemberState.JOINING and all(c.chunk_id in records[self.instance_id].ready_chunks
                                                     for c in mine):  # fmt: skip
            self.state = MemberState.SERVING
            records[self.instance_id] = self.record()
            logger.info("qroute: %r joined: %d chunks copied in (%s)", self.instance_id, len(self.copied),
                        self.copied[:16])  # fmt: skip
        routing = routing_members(records)
        if self.state is MemberState.LEAVING and leave_complete(self.placement(routing), self.instance_id, records):
            self.membership.leave()
            self.left.set()
            logger.info("qroute: %r left: every chunk it held is ready on its new owners", self.instance_id)
            return
        self.membership.publish(records[self.instance_id])
        if routing != self.routing and routing:
            self.routing = routing
            self.on_routing(self.placement(routing), member_layouts(self.directory, records))
            logger.info("qroute: routing over members %s", routing)

    def _records(self) -> dict[str, MemberRecord]:
        """The members' records, this instance's as it is now, and one for each configured member not seen in etcd
        yet (still starting: serving, nothing ready); a member seen once and gone since has left or died."""
        fresh = self.membership.records()
        self.seen |= fresh.keys()
        records = {i: MemberRecord(i, a, str(MemberState.SERVING), [c.chunk_id for c in self.directory.chunks_of(i)],
                                   []) for i, a in self.configured.items() if i not in self.seen}  # fmt: skip
        records.update(fresh)
        records[self.instance_id] = self.record()
        return records

    def _gain(self, records: dict[str, MemberRecord], target: CorpusDirectory) -> None:
        ready_here = set(records[self.instance_id].ready_chunks)
        wanted = [c for c in target.chunks_of(self.instance_id)
                  if c.chunk_id not in ready_here and c.chunk_id not in self.prefilled]  # fmt: skip
        if not wanted:
            return
        for chunk in wanted:
            holders = [r for i, r in sorted(records.items())
                       if i != self.instance_id and chunk.chunk_id in r.ready_chunks]  # fmt: skip
            if not holders:  # no rows to copy (yet, or its holders died): not taken, so no room is spent on it
                logger.debug("qroute: chunk %d has no ready holder to copy from", chunk.chunk_id)
                continue
            if chunk.chunk_id not in self.shard.store_chunks():
                try:
                    self.shard.add_chunks([chunk.chunk_id])
                except CorpusError as exc:  # no room left: it stays on its holders (or is refused), said loudly
                    logger.error("qroute: cannot take chunk %d: %s", chunk.chunk_id, exc)
                    continue
            for holder in holders:
                try:
                    self._copy(chunk, holder)
                except (QRouteError, OSError) as exc:
                    logger.warning("qroute: copying chunk %d from %r failed: %s", chunk.chunk_id, holder.instance_id,
                                   exc)  # fmt: skip
                    continue
                self.on_chunk_ready(chunk)
                self.copied.append(chunk.chunk_id)
                break

    def _copy(self, chunk: ChunkEntry, holder: MemberRecord) -> None:
        d, shard = self.directory, self.shard
        blocks = list(chunk_blocks(d, chunk))
        connection = self.connect(holder.instance_id, holder.addresses)
        try:
            flags = np.empty(connection.region_sizes.get(ready_region_name(d.name), 0), np.uint8)
            if flags.size < d.num_blocks:
                raise QRouteError(f"owner {holder.instance_id!r} exposes no ready flags")
            connection.read(ready_region_name(d.name), [(0, flags.size)], flags, self.timeout_s)
            if not flags[blocks].all():
                raise QRouteError(f"owner {holder.instance_id!r} has not stored chunk {chunk.chunk_id} (restarted?)")
            row_bytes = shard.row_bytes
            ranges = byte_ranges(chunk_layout(d, holder.store_chunks), blocks, row_bytes)
            slots = shard.slots(tuple(blocks))
            for layer, rows in enumerate(shard.layers):
                out = np.empty(sum(length for _, length in ranges), dtype=np.uint8)
                connection.read(layer_region(d.name, layer), ranges, out, self.timeout_s)
                shard_bytes = rows.view(torch.uint8).view(rows.shape[0], row_bytes)
                shard_bytes[slots] = torch.from_numpy(out).view(-1, row_bytes)
        finally:
            connection.close()

    # -- the thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.step_safely()
        self._thread = threading.Thread(target=self._loop, name="qroute-membership", daemon=True)
        self._thread.start()

    def step_safely(self) -> None:
        try:
            self.step()
        except (EtcdError, QRouteError, OSError) as exc:  # etcd or a peer away: the next round tries again
            logger.warning("qroute: membership round failed: %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s) and not self.left.is_set():
            self.step_safely()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
