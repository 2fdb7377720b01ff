"""Owner service and router over the in-process loopback transport (real code, not a mock).

The same exactness checks run between real processes over TCP and NIXL in tests/transport.
"""

import dataclasses

import msgspec
import pytest
import torch

from qroute.core import wire
from qroute.core.costmodel import Decision, load_fabric
from qroute.dataplane.peering import connect_owner, connect_owners, serve_owner
from qroute.dataplane.router import Router, RouterConfig
from qroute.dataplane.shard import block_range, block_tokens, corpus_positions
from qroute.errors import HandshakeMismatch, QRouteError, RemoteError
from qroute.numerics.attention import merge, partial_attention
from qroute.numerics.rope import PositionShift
from qroute.reference.prepared import prepare_corpus
from qroute.transport.loopback import LoopbackTransport

SECRET = b"test-secret"
INSTANCES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, sample_corpus):
    return prepare_corpus(tiny_model_dir, sample_corpus, instances=INSTANCES, replicas=2, blocks_per_chunk=2)


@pytest.fixture
def cluster(prepared):
    """Owners b and c serving on loopback; the requester is a (which holds a share itself)."""
    transport = LoopbackTransport()
    servers = {name: serve_owner(transport, prepared.owner_service(name, SECRET)) for name in ("b", "c")}
    addresses = {name: server.start() for name, server in servers.items()}
    connections = connect_owners(
        transport, addresses, instance_id="a", directory=prepared.directory,
        model_fingerprint=prepared.fingerprint, compat=prepared.compat, secret=SECRET,
    )  # fmt: skip
    yield transport, servers, addresses, connections
    for connection in connections.values():
        connection.close()
    for server in servers.values():
        server.stop()


def make_router(prepared, connections, *, mode="auto", local=True, **config):
    return Router(
        RouterConfig(instance_id="a", mode=mode, timeout_s=2.0, **config),
        prepared.directory,
        prepared.geometry,
        load_fabric("loopback-tcp"),
        prepared.params,
        connections,
        local_shard=prepared.shard("a") if local else None,
    )


def random_queries(prepared, num_rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, r, p = prepared.geometry.num_heads, prepared.geometry.kv_lora_rank, prepared.geometry.qk_rope_head_dim
    return torch.randn(num_rows, h, r, generator=g), torch.randn(num_rows, h, p, generator=g)


def dense_reference(prepared, layer, q_nope, q_pe):
    rows = prepared.all_rows[layer]
    return partial_attention(q_nope, q_pe, rows, torch.arange(rows.shape[0]), prepared.params.scale, 512)


@pytest.mark.parametrize("mode", ["route", "fetch", "auto"])
@pytest.mark.parametrize("local", [True, False])
def test_router_reproduces_dense_attention(prepared, cluster, mode, local):
    router = make_router(prepared, cluster[3], mode=mode, local=local)
    q_nope, q_pe = random_queries(prepared)
    plan = router.plan(q_nope.shape[0])
    covered = sorted(b for part in plan.parts for b in part.block_ids)
    assert covered == list(range(prepared.directory.num_blocks))
    for layer in range(prepared.model.num_layers):
        out, lse = router.run(layer, q_nope, q_pe, plan)
        ref_out, ref_lse = dense_reference(prepared, layer, q_nope, q_pe)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    if mode in ("route", "fetch"):
        assert router.stats[mode] > 0 and router.stats["bytes_moved"] > 0
        other = "fetch" if mode == "route" else "route"
        assert router.stats[other] == 0
    assert (router.stats["local"] > 0) == local


def _shift(prepared, positions: torch.Tensor) -> PositionShift:
    """Own positions -> corpus positions, with the reference model's own rope angles."""
    p, n = prepared.params, prepared.directory.num_tokens
    return PositionShift(positions, positions + n, p.inv_freq, interleaved=p.interleaved, engine_table=False)


def test_position_shift_rotates_the_query(prepared, cluster):
    """Queries roped at own positions 0.. and moved by N (PositionShift) equal queries roped at N.."""
    from qroute.numerics.rope import apply_rope

    router = make_router(prepared, cluster[3], mode="route")
    q_nope, q_raw = random_queries(prepared, num_rows=2, seed=3)
    inv_freq, inter = prepared.params.inv_freq, prepared.params.interleaved
    n = prepared.directory.num_tokens
    local_pos = torch.arange(2)
    moved = _shift(prepared, local_pos)(apply_rope(q_raw, local_pos, inv_freq, inter))
    shifted = router.run(0, q_nope, moved, router.plan(2))
    at_global = dense_reference(prepared, 0, q_nope, apply_rope(q_raw, local_pos + n, inv_freq, inter))
    torch.testing.assert_close(shifted[0], at_global[0], atol=1e-5, rtol=0)


def test_full_model_with_sharded_corpus_matches_single_instance(prepared, cluster):
    """Corpus + question through the reference model, single instance vs corpus on 3 owners."""
    model, n = prepared.model, prepared.directory.num_tokens
    question = torch.tensor([7, 300, 45, 1200, 99, 18], dtype=torch.int64)
    reference = model.forward(torch.cat([prepared.token_ids, question]), torch.arange(n + len(question)))[n:]
    router = make_router(prepared, cluster[3], mode="auto")
    plan = router.plan(len(question))
    shift = _shift(prepared, torch.arange(len(question)))

    def attend(layer, q_nope, q_pe, own, q_positions):
        own_part = model.self_attention(layer, q_nope, q_pe, own, q_positions)
        return router.run(layer, q_nope, shift(q_pe), plan, own=own_part)

    logits = model.forward(question, torch.arange(len(question)), attend)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-5)
    assert logits.argmax(-1).tolist() == reference.argmax(-1).tolist()


def test_auto_follows_the_predicate(prepared, cluster):
    router = make_router(prepared, cluster[3], mode="auto", local=False)
    plan = router.plan(1)
    assert {p.decision for p in plan.parts} <= {Decision.ROUTE, Decision.FETCH}
    # A one-token fetch is cheaper than any route on every fabric profile.
    tiny = router.plan(1, block_ids=[prepared.directory.num_blocks - 1])
    assert [p.decision for p in tiny.parts] == [Decision.FETCH] or prepared.directory.num_tokens % 16 == 0


def test_route_falls_back_to_replica_then_fetch(prepared, cluster):
    _, servers, _, connections = cluster
    router = make_router(prepared, connections, mode="route", local=False)
    q_nope, q_pe = random_queries(prepared)
    plan = router.plan(3)
    servers["b"].stop()  # b is gone: its blocks are replicated on a (not connected) or c
    reachable = [p for p in plan.parts if "c" in p.owners]
    assert reachable
    lost = [p for p in plan.parts if "c" not in p.owners]
    if lost:  # blocks on a and b only: a is not connected and b is dead, so nothing can answer
        with pytest.raises(QRouteError, match="unavailable"):
            router.run(0, q_nope, q_pe, plan)
        plan = router.plan(3, block_ids=[b for p in reachable for b in p.block_ids])
    out, lse = router.run(0, q_nope, q_pe, plan)
    blocks = [b for p in plan.parts for b in p.block_ids]
    slots = corpus_positions(prepared.directory, blocks)
    ref = partial_attention(q_nope, q_pe, prepared.all_rows[0], slots, prepared.params.scale, 512)
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=0)
    assert router.stats["fallbacks"] > 0


def test_fetch_cache_turns_repeats_local(prepared, cluster):
    router = make_router(prepared, cluster[3], mode="fetch", local=False, cache_bytes=1 << 24)
    q_nope, q_pe = random_queries(prepared)
    plan = router.plan(3)
    first = router.run(0, q_nope, q_pe, plan)
    moved, fetches = router.stats["bytes_moved"], router.stats["fetch"]
    second = router.run(0, q_nope, q_pe, plan)
    assert router.stats["bytes_moved"] == moved and router.stats["fetch"] == fetches
    assert router.cache.stats["hits"] == len(plan.parts)
    torch.testing.assert_close(first, second)


def test_owner_refuses_bad_requests_and_keeps_serving(prepared, cluster):
    transport, servers, addresses, connections = cluster
    conn = connections["b"]
    q_nope, q_pe = random_queries(prepared, num_rows=1)
    shard_b = prepared.shard("b")
    held = sorted(shard_b.block_rows)[:2]
    not_held = next(b for b in range(prepared.directory.num_blocks) if b not in shard_b.block_rows)

    def route(corpus="corpus", block_ids=tuple(held), layer=0):
        req = wire.RouteRequest(1, corpus, layer, wire.to_wire(q_nope), wire.to_wire(q_pe), block_ids, 10**6)
        return wire.decode(conn.call(wire.encode(req), 2.0))

    cases = [
        (route(corpus="other"), wire.ErrorCode.UNKNOWN_CORPUS),
        (route(block_ids=(not_held,)), wire.ErrorCode.BAD_REQUEST),
        (route(layer=99), wire.ErrorCode.BAD_REQUEST),
        (wire.decode(conn.call(b"\x93garbage", 2.0)), wire.ErrorCode.BAD_REQUEST),
        (wire.decode(conn.call(wire.encode(wire.ErrorReply(5, wire.ErrorCode.INTERNAL)), 2.0)),
         wire.ErrorCode.BAD_REQUEST),
    ]  # fmt: skip
    for reply, code in cases:
        assert isinstance(reply, wire.ErrorReply) and reply.code == code, reply
    assert isinstance(reply.as_exception(), RemoteError)
    good = route()
    assert isinstance(good, wire.RouteReply)
    ref = partial_attention(q_nope, q_pe, shard_b.layers[0], shard_b.slots(held), prepared.params.scale, 512)
    torch.testing.assert_close(wire.as_torch(good.out), ref[0], atol=0, rtol=0)


def test_handshake_refuses_mismatches(prepared, cluster):
    transport, _, addresses, _ = cluster
    common = dict(instance_id="a", directory=prepared.directory, model_fingerprint=prepared.fingerprint,
                  compat=prepared.compat, secret=SECRET)  # fmt: skip
    with pytest.raises(HandshakeMismatch, match="model"):
        connect_owner(transport, addresses["b"], **{**common, "model_fingerprint": "0" * 32})
    with pytest.raises(HandshakeMismatch, match="incompatible rows"):
        connect_owner(transport, addresses["b"], **{**common, "compat": "0" * 32})
    changed = msgspec.structs.replace(prepared.directory, version="f" * 32)
    with pytest.raises(HandshakeMismatch, match="version"):
        connect_owner(transport, addresses["b"], **{**common, "directory": changed})
    with pytest.raises(HandshakeMismatch):
        connect_owner(transport, addresses["b"], **{**common, "secret": b"wrong"})
    other = msgspec.structs.replace(prepared.directory, name="other-corpus")
    with pytest.raises(HandshakeMismatch, match="holds no corpus 'other-corpus'"):
        connect_owner(transport, addresses["b"], **{**common, "directory": other})
    assert connect_owner(transport, addresses["b"], **common) is not None  # still serving


def test_owner_modes_route_to_one_owner_and_fetch_from_another_in_one_plan(prepared, cluster):
    """A mixed plan (``owner_modes``) merges routed, fetched and local parts exactly."""
    router = make_router(prepared, cluster[3], mode="auto")
    q_nope, q_pe = random_queries(prepared)
    plan = router.plan(q_nope.shape[0], owner_modes={"b": "route", "c": "fetch"})
    by_owners = {part.owners: part.decision for part in plan.parts}
    # Replicas 2 over a, b, c: the groups a does not hold are owned by (b, c) or (c, b); the first owner named
    # in owner_modes decides each, in the group's own owner order.
    remote = {owners: decision for owners, decision in by_owners.items() if owners}
    assert remote and all(d is (Decision.ROUTE if o[0] == "b" else Decision.FETCH) for o, d in remote.items())
    assert {Decision.ROUTE, Decision.FETCH, Decision.LOCAL} == set(by_owners.values())
    out, lse = router.run(0, q_nope, q_pe, plan)
    ref_out, ref_lse = dense_reference(prepared, 0, q_nope, q_pe)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    assert router.stats["route"] > 0 and router.stats["fetch"] > 0 and router.stats["local"] > 0


@pytest.mark.parametrize("mode", ["route", "fetch"])
def test_fp8_stores_route_and_fetch_656_byte_rows(prepared, mode):
    """Owners and the requester store DeepSeek-V3.2's FP8 rows: a route is attended on the owner's FP8 rows, a
    fetch moves 656 bytes per token; either way the result is attention over the dequantized corpus."""
    fmt = prepared.row_format("fp8_ds_mla")
    transport = LoopbackTransport()
    servers = {name: serve_owner(transport, prepared.owner_service(name, SECRET, row_format="fp8_ds_mla"))
               for name in ("b", "c")}  # fmt: skip
    addresses = {name: server.start() for name, server in servers.items()}
    connections = connect_owners(transport, addresses, instance_id="a", directory=prepared.directory,
                                 model_fingerprint=prepared.fingerprint, compat=prepared.compat_of(fmt.name),
                                 secret=SECRET)  # fmt: skip
    try:
        router = Router(RouterConfig(instance_id="a", mode=mode), prepared.directory, prepared.geometry,
                        load_fabric("loopback-tcp"), prepared.params, connections,
                        local_shard=prepared.shard("a", fmt.name))  # fmt: skip
        assert router.row_bytes == 656
        q_nope, q_pe = random_queries(prepared, seed=11)
        plan = router.plan(q_nope.shape[0])
        remote_tokens = sum(block_tokens(prepared.directory, b) for p in plan.parts if p.owners for b in p.block_ids)
        for layer in range(prepared.model.num_layers):
            before = router.stats["bytes_moved"]
            out, lse = router.run(layer, q_nope, q_pe, plan)
            rows = fmt.decode(fmt.encode(prepared.all_rows[layer]))
            want = partial_attention(q_nope, q_pe, rows, torch.arange(rows.shape[0]), prepared.params.scale, 512)
            torch.testing.assert_close(lse, want[1], atol=1e-5, rtol=0)
            torch.testing.assert_close(out, want[0], atol=1e-5, rtol=0)
            if mode == "fetch":
                assert router.stats["bytes_moved"] - before == remote_tokens * 656
        assert router.stats[mode] > 0 and router.stats["local"] > 0
    finally:
        for connection in connections.values():
            connection.close()
        for server in servers.values():
            server.stop()


def test_each_peer_is_priced_over_its_own_measured_round_trip(prepared, cluster):
    """Connecting probes each owner: its measured round trips replace the profile's, and in one plan each owner
    group is decided on the figures of the owner that serves it."""
    router = make_router(prepared, cluster[3], mode="auto", local=False)
    base = router.fabric
    for name in ("b", "c"):
        fabric = router.peers[name].fabric
        assert fabric is not None and fabric.probe_us > 0 and fabric.fetch_probe_us > 0
        assert (fabric.probe_us, fabric.fetch_probe_us) != (base.probe_us, base.fetch_probe_us)  # measured

    def decisions(far_calls: str) -> dict[tuple[str, ...], tuple[str, Decision]]:
        """Calls to ``far_calls`` take a second (route loses), the other's READs do (fetch loses)."""
        for name in ("b", "c"):
            slow_call = name == far_calls
            router.peers[name].fabric = dataclasses.replace(base, probe_us=1e6 if slow_call else 1.0,
                                                            fetch_probe_us=1.0 if slow_call else 1e6)  # fmt: skip
        plan = router.plan(1)
        return {p.owners: (next(o for o in p.owners if o in router.peers), p.decision) for p in plan.parts}

    for far in ("b", "c"):
        got = decisions(far)
        assert {pricing for pricing, _ in got.values()} == {"b", "c"}  # both serve groups in this plan
        for pricing, decision in got.values():
            assert decision == (Decision.FETCH if pricing == far else Decision.ROUTE), (far, got)


def test_the_block_caches_hit_rate_is_the_reuse_the_predicate_prices(prepared, cluster):
    router = make_router(prepared, cluster[3], mode="fetch", local=False, cache_bytes=64 << 20)
    assert router.observed_reuse() == 1.0  # no lookups yet
    q_nope, q_pe = random_queries(prepared, seed=21)
    plan = router.plan(3)
    for _ in range(4):  # the first run fetches (misses), the next three hit
        router.run(0, q_nope, q_pe, plan)
    cache = router.cache.stats.snapshot()
    assert cache["hits"] == 3 * cache["misses"] > 0
    assert router.observed_reuse() == 4.0


def test_full_model_with_summary_selection_matches_one_instance_selecting_the_same(prepared, cluster):
    """The float32 reference model, question after the corpus: one instance holding every block and attending to
    the top-k blocks per layer, against the corpus on 3 owners (summaries assembled from their shards, as every
    instance does) with the same rule; selection really narrows the answer (it differs from the dense one)."""
    from qroute.dataplane.selection import BlockSummaries, Selection, choose_blocks, summarise_shard

    model, d = prepared.model, prepared.directory
    n, k = d.num_tokens, 2
    selection = Selection("summary", topk=k)
    question = torch.tensor([7, 300, 45, 1200, 99, 18], dtype=torch.int64)
    own_positions = torch.arange(len(question))

    whole = []  # one instance: every block's bounds from its own rows
    for rows in prepared.all_rows:
        whole.append(BlockSummaries(d.num_blocks, rows.shape[1]))
        whole[-1].add(range(d.num_blocks), [rows[slice(*block_range(d, b))] for b in range(d.num_blocks)])
    assembled = [BlockSummaries(d.num_blocks, prepared.geometry.latent_width) for _ in prepared.all_rows]
    for name in INSTANCES:  # the sharded side: each owner's share, from its shard
        shard = prepared.shard(name)
        summarise_shard(assembled, shard, sorted(shard.block_rows))
    chosen: dict[str, list[tuple[int, ...]]] = {"one": [], "sharded": []}

    def one_instance(layer, q_nope, q_pe, own, q_positions):  # q_pe roped at corpus positions already
        blocks = choose_blocks(whole[layer], q_nope, q_pe, d.num_blocks, selection)
        chosen["one"].append(blocks)
        keys = corpus_positions(d, blocks)
        corpus = partial_attention(q_nope, q_pe, prepared.all_rows[layer], keys, model.scale, model.kv_lora_rank)
        return merge([model.self_attention(layer, q_nope, q_pe, own, q_positions), corpus])

    reference = model.forward(question, own_positions + n, one_instance)
    router = make_router(prepared, cluster[3], mode="auto")
    shift = _shift(prepared, own_positions)

    def sharded(layer, q_nope, q_pe, own, q_positions):
        moved = shift(q_pe)
        blocks = choose_blocks(assembled[layer], q_nope, moved, d.num_blocks, selection)
        chosen["sharded"].append(blocks)
        own_part = model.self_attention(layer, q_nope, q_pe, own, q_positions)
        return router.run(layer, q_nope, moved, router.plan(len(question), block_ids=blocks), own=own_part)

    logits = model.forward(question, own_positions, sharded)
    assert chosen["sharded"] == chosen["one"] and all(len(b) == k for b in chosen["one"]) and k < d.num_blocks
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-5)
    dense = model.forward(torch.cat([prepared.token_ids, question]), torch.arange(n + len(question)))[n:]
    assert (logits - dense).abs().max() > 1e-2  # attending to 2 blocks is not attending to all of them


def test_every_remote_part_run_is_timed_with_its_decision_and_selected_tokens(prepared, cluster):
    _, servers, _, connections = cluster
    router = make_router(prepared, connections, mode="auto", local=True)
    router.timings = []
    q_nope, q_pe = random_queries(prepared)
    plan = router.plan(3, owner_modes={"b": "route", "c": "fetch"})
    remote = [p for p in plan.parts if p.decision is not Decision.LOCAL]
    assert {p.decision for p in remote} == {Decision.ROUTE, Decision.FETCH}
    router.run(1, q_nope, q_pe, plan)
    timed = {(t.owner, t.decision, t.tokens) for t in router.timings}
    assert timed == {(p.owners[0], p.decision.value, sum(block_tokens(prepared.directory, b) for b in p.block_ids))
                     for p in remote}  # fmt: skip
    assert all(t.layer == 1 and t.rows == 3 and t.seconds > 0 and not t.fell_back for t in router.timings)
    # a route whose owner is gone runs on a replica or as a fetch: timed, but marked as no measure of its decision
    router.timings.clear()
    routed_to_b = [p for p in remote if p.decision is Decision.ROUTE and p.owners[0] == "b"]
    servers["b"].stop()
    router.run(1, q_nope, q_pe, plan)
    assert [t.fell_back for t in router.timings if t.owner == "b" and t.decision == "route"] == [True] * len(
        routed_to_b
    )


def test_probes_measure_read_bandwidth_and_the_stalest_peer_is_probed_again(prepared, cluster):
    from qroute.dataplane.peer import BANDWIDTH_PROBE_BYTES
    from qroute.dataplane.shard import region_name

    router = make_router(prepared, cluster[3], mode="auto", local=False)
    region = region_name(prepared.directory.name, 0)
    for peer in router.peers.values():
        assert peer.connection.region_sizes[region] >= BANDWIDTH_PROBE_BYTES  # big enough to time a bandwidth
        measured = peer.fabric.fetch_bandwidth_gbps
        assert measured > 0 and measured != router.fabric.fetch_bandwidth_gbps
        assert peer.base_fabric is router.fabric
    b, c = router.peers["b"], router.peers["c"]
    b.fabric = dataclasses.replace(b.fabric, probe_us=12345.0)
    c.fabric = dataclasses.replace(c.fabric, probe_us=12345.0)
    router.refresh_probes(3600.0)  # nobody is due
    assert b.fabric.probe_us == c.fabric.probe_us == 12345.0
    b.probed_at -= 7200.0
    c.probed_at -= 3600.0
    router.refresh_probes(60.0)  # both are due: the stalest only, one probe per call
    assert b.fabric.probe_us != 12345.0 and c.fabric.probe_us == 12345.0
    router.refresh_probes(60.0)
    assert c.fabric.probe_us != 12345.0


def test_run_many_posts_every_route_first_and_tallies_each_item(prepared, cluster):
    from qroute.dataplane.plan import RunItem

    router = make_router(prepared, cluster[3], mode="route", local=True)
    events: list[str] = []
    for peer in router.peers.values():
        real_post = peer.connection.post

        class Seen:  # the real pending call, its wait recorded
            def __init__(self, pending):
                self.pending = pending

            def wait(self, timeout_s):
                events.append("wait")
                return self.pending.wait(timeout_s)

        def post(payload, real_post=real_post, **kw):
            events.append("post")
            return Seen(real_post(payload, **kw))

        peer.connection.post = post
    blocks = list(range(prepared.directory.num_blocks))
    q_a, q_b = random_queries(prepared, 2, seed=1), random_queries(prepared, 1, seed=2)
    plan_a = router.plan(2, block_ids=blocks[::2], mode="route")
    plan_b = router.plan(1, block_ids=blocks[1::2], owner_modes={"c": "fetch"})
    items = [RunItem(*q_a, plan_a, tally={}), RunItem(*q_b, plan_b, tally={})]
    before = router.stats.snapshot().counters
    parts = router.run_many(0, items)
    after = router.stats.snapshot().counters
    posts = events.count("post")
    assert posts == sum(p.decision is Decision.ROUTE for plan in (plan_a, plan_b) for p in plan.parts) >= 2
    assert events[:posts] == ["post"] * posts  # every route of both items in flight before the first wait
    for item, plan in zip(items, (plan_a, plan_b), strict=True):
        for kind in (Decision.ROUTE, Decision.FETCH, Decision.LOCAL):
            assert item.tally.get(kind.value, 0) == sum(p.decision is kind for p in plan.parts)
    for name in ("route", "fetch", "local", "bytes_moved"):
        assert sum(item.tally.get(name, 0) for item in items) == after[name] - before[name]
    for (q_nope, q_pe), plan, (out, lse) in zip((q_a, q_b), (plan_a, plan_b), parts, strict=True):
        slots = corpus_positions(prepared.directory, [b for p in plan.parts for b in p.block_ids])
        ref = partial_attention(q_nope, q_pe, prepared.all_rows[0], slots, prepared.params.scale, 512)
        torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(lse, ref[1], atol=1e-5, rtol=0)



def test_an_owner_that_has_not_stored_its_blocks_is_never_answered_from(prepared):
    """b restarted with an empty store (its blocks not ready): its routes are refused (NOT_READY) and its ready flags
    stop a one-sided fetch from reading its zeros; the replica answers instead, exactly. Once b has stored its
    blocks again it serves them."""
    from qroute.dataplane.owner import OwnerService
    from qroute.errors import ErrorCode

    d = prepared.directory
    empty_b = dataclasses.replace(prepared.shard("b"), ready=torch.zeros(d.num_blocks, dtype=torch.uint8))
    services = {"b": OwnerService({d.name: empty_b}, prepared.params, instance_id="b",
                                  model_fingerprint=prepared.fingerprint, secret=SECRET),
                "c": prepared.owner_service("c", SECRET)}  # fmt: skip
    transport = LoopbackTransport()
    servers = {name: serve_owner(transport, service) for name, service in services.items()}
    connections = connect_owners(transport, {name: s.start() for name, s in servers.items()}, instance_id="a",
                                 directory=d, model_fingerprint=prepared.fingerprint, compat=prepared.compat,
                                 secret=SECRET)  # fmt: skip
    try:
        q_nope, q_pe = random_queries(prepared)
        for mode in ("route", "fetch"):
            router = make_router(prepared, connections, mode=mode, local=True)
            plan = router.plan(3)
            assert any(p.owners[:1] == ("b",) for p in plan.parts)  # b is asked first for some blocks
            out, lse = router.run(0, q_nope, q_pe, plan)
            ref = dense_reference(prepared, 0, q_nope, q_pe)
            torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(lse, ref[1], atol=1e-5, rtol=0)
            assert router.stats["fallbacks"] > 0
        assert services["b"].stats.snapshot().errors.get(str(ErrorCode.NOT_READY), 0) > 0  # the refused routes
        assert not router.peers["b"].ready_blocks.any()  # the fetch read b's flags: nothing stored
        empty_b.mark_ready(list(empty_b.block_rows))
        fallbacks = router.stats["fallbacks"]
        router.run(0, q_nope, q_pe, plan)
        assert router.stats["fallbacks"] == fallbacks and router.peers["b"].all_ready  # b serves again
    finally:
        for connection in connections.values():
            connection.close()
        for server in servers.values():
            server.stop()
