"""Membership through a real etcd server (Debian's etcd-server, started here on loopback) and the follower that
re-places a corpus when a member joins or leaves: owners over real TCP, rows copied from holders. Engine-free.

What is checked: rendezvous re-placement moves only the chunks whose owners change (to the joiner on a join, from
the leaver on a leave); a joiner copies exactly those chunks, byte for byte, before it is routed to; a leaver stays
routed until every chunk it held is ready on its new owners; after each change every chunk's owners in the
routing placement hold its true rows at the layout they publish.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch

from qroute.core.config import QRouteConfig
from qroute.core.placement import build_directory
from qroute.dataplane.elastic import MembershipFollower
from qroute.dataplane.etcd_client import EtcdClient, EtcdError
from qroute.dataplane.membership import (
    MemberRecord,
    Membership,
    MemberState,
    check_new_member,
    headroom_rows,
    initial_members,
    leave_complete,
    moved_chunks,
    routing_members,
    target_members,
)
from qroute.dataplane.owner import OwnerService
from qroute.dataplane.owner_links import OwnerLinks
from qroute.dataplane.shard import CorpusShard, block_range, chunk_blocks, chunk_layout, compat_for, shard_layout
from qroute.errors import ConfigError
from qroute.numerics.attention import AttentionParams
from qroute.numerics.rowformat import RowFormat
from qroute.ops.etcd_server import start_etcd

SECRET = b"membership-secret"
FMT = RowFormat("float32", 4, 4)
TOKENS = 16 * 2 * 24  # 24 chunks of 2 blocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    server = start_etcd(tmp_path_factory.mktemp("etcd") / "data", _free_port())
    yield server
    server.stop()


def _directory(members, replicas=1):
    return build_directory("c", np.arange(TOKENS), instances=members, model_fingerprint="f" * 32,
                           replicas=replicas, blocks_per_chunk=2)  # fmt: skip


def test_rendezvous_moves_only_the_changed_owners_chunks():
    before = _directory(["a", "b", "c"], replicas=2)
    joined = before.with_instances(["a", "b", "c", "d"])
    moved = moved_chunks(before, joined)
    assert set(moved) == {"d"}  # a join moves chunks to the joiner only
    assert 0 < len(moved["d"]) < len(before.chunks)
    left = before.with_instances(["a", "c"])
    gained = moved_chunks(before, left)
    assert set(gained) <= {"a", "c"}
    assert sorted(c for cs in gained.values() for c in cs) == sorted(c.chunk_id for c in before.chunks_of("b"))
    # the headroom allocated up front holds what any single leave moves to an instance
    for name in "abc":
        for leaver in {"a", "b", "c"} - {name}:
            after = before.with_instances(sorted({"a", "b", "c"} - {leaver}))
            rows = sum(block_range(before, b)[1] - block_range(before, b)[0]
                       for c in moved_chunks(before, after).get(name, [])
                       for b in chunk_blocks(before, before.chunk(c)))  # fmt: skip
            assert rows <= headroom_rows(before, name)
    print(f"join 3 -> 4: {len(moved['d'])} of {len(before.chunks)} chunks moved (replicas 2)")


def test_member_sets_and_leave_completion():
    def rec(name, state, ready=()):
        return MemberRecord(name, "127.0.0.1:1", state, list(ready), list(ready))

    records = {"a": rec("a", "serving", range(24)), "b": rec("b", "leaving"), "d": rec("d", "joining")}
    assert routing_members(records) == ["a", "b"] and target_members(records) == ["a", "d"]
    d = _directory(["a", "b"])
    assert not leave_complete(d, "b", records)  # d does not hold b's chunks yet
    after = d.with_instances(["a", "d"])
    mine = [c.chunk_id for c in after.chunks_of("d")]
    records["d"] = rec("d", "joining", mine)
    assert leave_complete(d, "b", records)


def test_etcd_client_keys_leases_and_errors(etcd):
    client = EtcdClient(etcd.endpoint)
    assert client.version().startswith("3.")
    lease = client.grant(2)
    client.put(b"/t/m/x", b"1", lease=lease)
    client.put(b"/t/m/y", b"2")
    client.put(b"/t/n/z", b"3")
    assert client.get_prefix(b"/t/m/") == {b"/t/m/x": b"1", b"/t/m/y": b"2"}
    assert client.keepalive(lease)
    client.revoke(lease)
    assert client.get_prefix(b"/t/m/") == {b"/t/m/y": b"2"}  # the leased key went with its lease
    assert client.delete(b"/t/m/y") == 1 and client.get_prefix(b"/t/m/") == {}
    short = client.grant(2)
    client.put(b"/t/m/w", b"4", lease=short)
    deadline = time.monotonic() + 15
    while client.get_prefix(b"/t/m/") and time.monotonic() < deadline:  # not renewed: it expires
        time.sleep(0.5)
    assert client.get_prefix(b"/t/m/") == {} and not client.keepalive(short)
    with pytest.raises(EtcdError, match="unreachable"):
        EtcdClient(f"http://127.0.0.1:{_free_port()}", timeout_s=0.5).get_prefix(b"/")


class _Member:
    """One instance of the engine-free cluster: a shard (rows given or empty), its owner service and links, and
    the follower."""

    def __init__(self, name, etcd, cluster, members, true_rows, *, joining, replicas):
        self.name = name
        self.address = f"127.0.0.1:{_free_port()}"
        directory = _directory(members, replicas)
        self.layout = shard_layout(directory, name)
        capacity = max((r + n for r, n in self.layout.values()), default=0) + headroom_rows(directory, name)
        layers = [torch.zeros(capacity, FMT.width) for _ in true_rows]
        ready = torch.zeros(directory.num_blocks, dtype=torch.uint8)
        self.shard = CorpusShard(directory, name, layers, self.layout, FMT, ready=ready)
        prefilled = [] if joining else [c.chunk_id for c in directory.chunks_of(name)]
        for chunk_id in prefilled:  # what the launcher's prefill does: true rows, then ready
            blocks = list(chunk_blocks(directory, directory.chunk(chunk_id)))
            for layer, rows in enumerate(true_rows):
                for b in blocks:
                    row, count = self.layout[b]
                    start, _ = block_range(directory, b)
                    layers[layer][row : row + count] = rows[start : start + count]
            self.shard.mark_ready(blocks)
        config = QRouteConfig.from_extra_config({"instance_id": name, "instances": {name: self.address},
                                                 "timeout_s": 2.0, "corpus": {"name": "c", "path": "/unused"}})
        service = OwnerService({"c": self.shard}, AttentionParams(0.1, 4, torch.ones(2), True), instance_id=name,
                               model_fingerprint="f" * 32, secret=SECRET)  # fmt: skip
        self.links = OwnerLinks(config, service, directory, compat=compat_for("f" * 32, directory, FMT.width,
                                "float32"), on_connect=lambda *_: None)  # fmt: skip
        self.links.start()
        self.routed: list = []
        self.membership = Membership(EtcdClient(etcd.endpoint), cluster, "c", name, ttl_s=5)
        self.follower = MembershipFollower(
            self.membership, self.shard, directory, self.address, joining=joining, prefilled=prefilled,
            configured={} if joining else {n: "127.0.0.1:1" for n in members},
            connect=self.links.connect_to, set_members=self.links.set_members,
            on_routing=lambda d, layouts: self.routed.append((d, layouts)),
            on_chunk_ready=lambda chunk: self.shard.mark_ready(chunk_blocks(directory, chunk)),
        )  # fmt: skip

    def close(self):
        self.links.close()


def _rounds(members, n=3):
    for _ in range(n):
        for m in members:
            if not m.follower.left.is_set():
                m.follower.step()


def _check_placement(directory, members, true_rows):
    """Every chunk's owners in ``directory`` have it ready, with its true rows at their published layout."""
    by_name = {m.name: m for m in members}
    for chunk in directory.chunks:
        for owner in chunk.owners:
            m = by_name[owner]
            layout = chunk_layout(directory, m.shard.store_chunks())
            for b in chunk_blocks(directory, chunk):
                assert m.shard.ready[b] == 1, (owner, chunk.chunk_id)
                row, count = layout[b]
                start, _ = block_range(directory, b)
                for layer, rows in enumerate(true_rows):
                    assert torch.equal(m.shard.layers[layer][row : row + count], rows[start : start + count])


def _three_members(etcd, name: str, seed: int, replicas: int):
    """(true rows, cluster name, members a, b, c started together, each holding its chunks' true rows)."""
    torch.manual_seed(seed)
    true_rows = [torch.randn(TOKENS, FMT.width) for _ in range(2)]
    cluster = f"{name}{time.monotonic_ns()}"
    members = [_Member(n, etcd, cluster, ["a", "b", "c"], true_rows, joining=False, replicas=replicas) for n in "abc"]
    return true_rows, cluster, members


def test_a_member_joins_and_another_leaves(etcd):
    true_rows, cluster, members = _three_members(etcd, "join", 0, replicas=1)
    try:
        _rounds(members, 1)
        first = members[0].routed[-1][0]
        assert first.instances == ("a", "b", "c")
        # d joins: it lays out its store for the members in etcd plus itself, and copies the chunks it gains
        with pytest.raises(ConfigError, match="a member already"):
            check_new_member(members[0].membership)
        assert initial_members(Membership(EtcdClient(etcd.endpoint), cluster, "c", "d"), True, ()) == list("abcd")
        d = _Member("d", etcd, cluster, ["a", "b", "c", "d"], true_rows, joining=True, replicas=1)
        members.append(d)
        assert d.follower.state is MemberState.JOINING
        joined = first.with_instances(["a", "b", "c", "d"])
        _rounds(members)
        assert d.follower.state is MemberState.SERVING
        assert sorted(d.follower.copied) == moved_chunks(first, joined)["d"]  # exactly the moved chunks
        assert all(m.routed[-1][0].instances == ("a", "b", "c", "d") for m in members)
        _check_placement(joined, members, true_rows)
        # b is asked to leave: it stays routed until its chunks are ready on their new owners, then goes
        copied_before = {m.name: len(m.follower.copied) for m in members}
        members[0].membership.request_drain("b")
        b = members[1]
        b.follower.step()
        assert b.follower.state is MemberState.LEAVING and not b.follower.left.is_set()
        assert "b" in routing_members(members[0].membership.records())
        _rounds(members)
        assert b.follower.left.is_set() and "b" not in members[0].membership.records()
        _rounds([m for m in members if m is not b], 1)
        left = joined.with_instances(["a", "c", "d"])
        assert all(m.routed[-1][0].instances == ("a", "c", "d") for m in members if m is not b)
        gained = moved_chunks(joined, left)
        copied = {m.name: sorted(m.follower.copied[copied_before[m.name]:]) for m in members}
        assert {n: cs for n, cs in copied.items() if cs} == {n: sorted(cs) for n, cs in gained.items()}
        _check_placement(left, [m for m in members if m is not b], true_rows)
        print(f"join: {len(d.follower.copied)} chunks copied to d; leave of b: "
              f"{sum(len(v) for v in gained.values())} of {len(left.chunks)} chunks re-placed")
    finally:
        for m in members:
            m.membership.leave()
            m.close()


def test_a_dead_members_chunks_are_copied_from_their_other_replica(etcd):
    """Replicas 2: a member stops renewing (its owner service closed, as a killed process's would be); when its
    lease expires the others re-place without it and copy each chunk it held from the chunk's other replica."""
    true_rows, _, members = _three_members(etcd, "dead", 1, replicas=2)
    try:
        _rounds(members, 2)
        start = _directory(["a", "b", "c"], replicas=2)
        _check_placement(start, members, true_rows)
        dead = members.pop(1)
        dead.close()  # no more rounds: its lease (5 s) is not renewed
        deadline = time.monotonic() + 20
        while "b" in members[0].membership.records():
            assert time.monotonic() < deadline, "b's lease did not expire"
            time.sleep(0.5)
        _rounds(members, 2)
        after = start.with_instances(["a", "c"])
        assert all(m.routed[-1][0].instances == ("a", "c") for m in members)
        assert {m.name: sorted(m.follower.copied) for m in members if m.follower.copied} == \
            {n: sorted(cs) for n, cs in moved_chunks(start, after).items()}  # fmt: skip
        _check_placement(after, members, true_rows)  # every chunk on both survivors, true rows
    finally:
        for m in members:
            m.membership.leave()
            m.close()
