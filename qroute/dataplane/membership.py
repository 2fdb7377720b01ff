"""Membership through etcd: which instances serve a corpus, and the placements that follow from it.

Each instance keeps one key, ``/qroute/<cluster>/<corpus>/members/<id>``, under a lease it renews (``ttl_s``):
a killed instance's key goes when the lease expires, a leaving one's when it revokes it. The value
(``MemberRecord``) says how to reach it, what it is doing (``joining``, ``serving``, ``leaving``), which chunks its
store holds in which order (so that a requester computes one-sided read ranges without asking it) and which of
them are ready. Placement stays rendezvous hashing (``qroute.core.placement``), over two member sets:

- the **routing** set (serving and leaving members): whom requests attend through now. A joining member is not in
  it until every chunk it will own is copied; a leaving one stays in it until every chunk it held is ready on its
  new owners. So a chunk always has a ready owner in the routing placement, or none only when every holder died.
- the **target** set (serving and joining members): the placement being moved to. Each member copies the chunks it
  owns there and does not hold, from a ready holder's rows over the transport (``qroute.dataplane.elastic``).

Adding or removing one of N members moves only the chunks whose top ``replicas`` owners change, about 1/N of
them (``moved_chunks``). Engine-free.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from enum import StrEnum

import msgspec

from qroute.core.config import QRouteConfig
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.etcd_client import EtcdClient, EtcdError
from qroute.dataplane.shard import BlockRows, block_tokens, chunk_blocks, chunk_layout
from qroute.errors import ConfigError, CorpusError

__all__ = [
    "MemberRecord",
    "MemberState",
    "Membership",
    "check_new_member",
    "headroom_rows",
    "initial_members",
    "membership_for",
    "leave_complete",
    "member_layouts",
    "moved_chunks",
    "routing_members",
    "target_members",
]

logger = logging.getLogger("vllm.qroute")


class MemberState(StrEnum):
    JOINING = "joining"
    SERVING = "serving"
    LEAVING = "leaving"


class MemberRecord(msgspec.Struct, frozen=True):
    instance_id: str
    addresses: str | list[str]  # as in the connector config's ``instances``
    state: str
    store_chunks: list[int]  # chunk ids in the order of their rows in the member's store
    ready_chunks: list[int]  # those whose rows are stored, every layer


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(MemberRecord)


def routing_members(records: Mapping[str, MemberRecord]) -> list[str]:
    return sorted(i for i, r in records.items() if r.state in (MemberState.SERVING, MemberState.LEAVING))


def target_members(records: Mapping[str, MemberRecord]) -> list[str]:
    return sorted(i for i, r in records.items() if r.state in (MemberState.SERVING, MemberState.JOINING))


def member_layouts(directory: CorpusDirectory, records: Mapping[str, MemberRecord]) -> dict[str, BlockRows]:
    """Each member's store layout, from the chunk order it publishes."""
    return {i: chunk_layout(directory, r.store_chunks) for i, r in records.items()}


def moved_chunks(before: CorpusDirectory, after: CorpusDirectory) -> dict[str, list[int]]:
    """Instance -> the chunks it owns in ``after`` and did not in ``before``: what must be copied to it."""
    moved: dict[str, list[int]] = {}
    for old, new in zip(before.chunks, after.chunks, strict=True):
        for owner in set(new.owners) - set(old.owners):
            moved.setdefault(owner, []).append(new.chunk_id)
    return moved


def leave_complete(directory: CorpusDirectory, leaver: str, records: Mapping[str, MemberRecord]) -> bool:
    """Whether every chunk ``leaver`` owns in ``directory`` is ready on each of its owners in the target
    placement (so that dropping the leaver from the routing set leaves no chunk without its owners' rows)."""
    target = target_members(records)
    if not target:
        return False
    after = directory.with_instances(target, min(directory.replicas, len(target)))
    ready = {i: set(r.ready_chunks) for i, r in records.items()}
    return all(
        chunk.chunk_id in ready.get(owner, ())
        for chunk in directory.chunks_of(leaver)
        for owner in after.chunk(chunk.chunk_id).owners
    )


def headroom_rows(directory: CorpusDirectory, instance: str) -> int:
    """Store rows past ``instance``'s own that hold what it gains when any one other member leaves: the most
    that a single leave moves to it (allocated up front, so that a store never moves while it is registered)."""
    others = [i for i in directory.instances if i != instance]
    if not others:
        return 0
    replicas = min(directory.replicas, len(directory.instances) - 1)
    most = 0
    for leaver in others:
        after = directory.with_instances([i for i in directory.instances if i != leaver], replicas)
        gained = moved_chunks(directory, after).get(instance, [])
        most = max(most, sum(_chunk_rows(directory, c) for c in gained))
    return most


def _chunk_rows(directory: CorpusDirectory, chunk_id: int) -> int:
    return sum(block_tokens(directory, b) for b in chunk_blocks(directory, directory.chunk(chunk_id)))


class Membership:
    """One instance's key in etcd, and its view of the others'."""

    def __init__(self, client: EtcdClient, cluster: str, corpus: str, instance_id: str, *, ttl_s: int = 10):
        self.client = client
        self.instance_id = instance_id
        self.ttl_s = ttl_s
        self.prefix = f"/qroute/{cluster}/{corpus}/".encode()
        self._lease = 0
        self._published: MemberRecord | None = None

    def key(self, instance_id: str) -> bytes:
        return self.prefix + b"members/" + instance_id.encode()

    def drain_key(self, instance_id: str) -> bytes:
        return self.prefix + b"drain/" + instance_id.encode()

    def publish(self, record: MemberRecord) -> None:
        """Put this instance's record under its lease (a new lease where the old one expired)."""
        if not self._lease or not self.client.keepalive(self._lease):
            self._lease = self.client.grant(self.ttl_s)
        self.client.put(self.key(self.instance_id), _ENCODER.encode(record), lease=self._lease)
        self._published = record

    def keepalive(self) -> None:
        """Renew the lease; where it had expired (a long stall), publish the record again."""
        if self._published is not None and (not self._lease or not self.client.keepalive(self._lease)):
            self._lease = 0
            self.publish(self._published)

    def records(self) -> dict[str, MemberRecord]:
        """Every member's record; a malformed one is logged and left out (it cannot be routed to)."""
        out = {}
        for key, value in self.client.get_prefix(self.prefix + b"members/").items():
            try:
                record = _DECODER.decode(value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.error("qroute: membership record %s is malformed: %s", key.decode(errors="replace"), exc)
                continue
            out[record.instance_id] = record
        return out

    def drain_requested(self) -> bool:
        return bool(self.client.get_prefix(self.drain_key(self.instance_id)))

    def request_drain(self, instance_id: str) -> None:
        self.client.put(self.drain_key(instance_id), b"1")

    def leave(self) -> None:
        """Remove this instance's record now (revoke its lease) and its drain request."""
        try:
            if self._lease:
                self.client.revoke(self._lease)
            self.client.delete(self.drain_key(self.instance_id))
        except EtcdError as exc:  # its lease expires anyway
            logger.warning("qroute: leaving membership: %s", exc)
        self._lease, self._published = 0, None


def initial_members(membership: Membership, joining: bool, configured: Iterable[str]) -> list[str]:
    """The member set an instance lays its store out for: ``configured`` (a cluster started together), or, for
    a joining instance, the serving and joining members in etcd plus itself."""
    if not joining:
        return sorted(configured)
    records = membership.records()
    records.pop(membership.instance_id, None)  # its own, where its other process has registered already
    members = target_members(records)
    if not members:
        raise CorpusError(f"no member serves the corpus under {membership.prefix.decode()} in etcd at "
                          f"{membership.client.endpoint}: start a cluster first (join needs members to copy from)")
    return sorted({*members, membership.instance_id})


def check_new_member(membership: Membership) -> None:
    """A joining instance must not take over a live member's key (the same id twice would corrupt placement)."""
    if membership.instance_id in membership.records():
        raise ConfigError(f"instance {membership.instance_id!r} is a member already in etcd at "
                          f"{membership.client.endpoint}: a joining instance needs a new instance_id (or wait for "
                          f"the old record's lease, {membership.ttl_s} s, to expire)")


def membership_for(config: QRouteConfig) -> Membership | None:
    """This instance's ``Membership`` where the config names etcd, else None (a static member list)."""
    if config.etcd is None:
        return None
    e = config.etcd
    client = EtcdClient(e.endpoint, timeout_s=config.timeout_s)
    return Membership(client, e.cluster, config.corpus.name, config.instance_id, ttl_s=e.ttl_s)
