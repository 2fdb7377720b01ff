"""OwnerService.handle_batch: routes that arrive together for the same corpus, layer and blocks are answered by
one attention over all their rows, with replies equal to answering each alone (to float32 rounding:
``owner.replies_agree``); the others in the same batch (other blocks, other layers, bad calls) get their own
answers, in order."""

import pytest
import torch

from qroute.core import wire
from qroute.dataplane.owner import replies_agree
from qroute.errors import ErrorCode
from qroute.reference.prepared import prepare_corpus

SECRET = b"test-secret"


@pytest.fixture(scope="module")
def service(tiny_model_dir, sample_corpus):
    prepared = prepare_corpus(tiny_model_dir, sample_corpus, instances=["owner"], blocks_per_chunk=2)
    return prepared, prepared.owner_service("owner", SECRET, max_inflight=2)


def _route(prepared, request_id, rows, layer=0, block_ids=(0, 1, 2), corpus=None, heads=None) -> bytes:
    g = torch.Generator().manual_seed(request_id)
    geometry = prepared.geometry
    heads = heads or geometry.num_heads
    q_nope = torch.randn(rows, heads, geometry.kv_lora_rank, generator=g)
    q_pe = torch.randn(rows, heads, geometry.qk_rope_head_dim, generator=g)
    return wire.encode(wire.RouteRequest(request_id, corpus or prepared.directory.name, layer, wire.to_wire(q_nope),
                                         wire.to_wire(q_pe), tuple(block_ids), 10_000_000))  # fmt: skip


def test_a_batch_answers_each_call_as_alone(service):
    prepared, owner = service
    calls = [_route(prepared, k, rows=1 + k % 3) for k in range(8)]  # 8 requesters, the same blocks
    calls += [_route(prepared, 20, rows=2, layer=1), _route(prepared, 21, rows=1, block_ids=(3, 4))]
    calls += [_route(prepared, 24, rows=1, heads=2)]  # fewer heads: its rows cannot stack with the others
    calls += [b"not a message", _route(prepared, 22, rows=1, corpus="other"), _route(prepared, 23, rows=1, layer=99)]
    alone = [owner.handle(call) for call in calls]
    before = owner.stats.snapshot().counters
    together = owner.handle_batch(calls)
    after = owner.stats.snapshot().counters
    assert len(together) == len(alone) and all(map(replies_agree, together, alone))  # in order
    assert together[11:] == alone[11:]  # the refusals byte for byte
    replies = [wire.decode(r) for r in together]
    assert [r.request_id for r in replies[:11]] == [*range(8), 20, 21, 24]
    assert all(isinstance(r, wire.RouteReply) for r in replies[:11])
    assert [r.code for r in replies[11:]] == [ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_CORPUS, ErrorCode.BAD_REQUEST]
    # four groups computed (8 calls on blocks 0-2 at layer 0, one at layer 1, one on blocks 3-4, one with 2 heads)
    assert after["route_batches"] - before["route_batches"] == 4
    assert after["routes"] - before["routes"] == 11


def test_a_batch_over_the_in_flight_limit_is_refused_as_a_whole(service):
    prepared, owner = service
    taken = [owner._slots.acquire(blocking=False) for _ in range(2)]  # the limit (2) is reached
    try:
        replies = [wire.decode(r) for r in owner.handle_batch([_route(prepared, 30, 1), _route(prepared, 31, 1)])]
    finally:
        for ok in taken:
            if ok:
                owner._slots.release()
    assert [(r.request_id, r.code) for r in replies] == [(30, ErrorCode.OVERLOADED), (31, ErrorCode.OVERLOADED)]
    assert isinstance(wire.decode(owner.handle(_route(prepared, 32, 1))), wire.RouteReply)


def test_calls_that_arrive_together_over_nixl_are_answered_as_one_batch(service):
    """The NIXL poll thread hands every call one pass found to the batch handler. The first pass's answer is held
    until every requester has posted, so a later pass finds the others waiting (the only way to make arrivals
    coincide on purpose; what answers is the real service)."""
    pytest.importorskip("nixl")
    import threading

    from qroute.transport import get_transport

    prepared, owner = service
    all_posted = threading.Event()
    batch_sizes: list[int] = []

    def first_waits(payload: bytes) -> bytes:
        all_posted.wait(10.0)
        return owner.handle(payload)

    payload_types: set[type] = set()

    def batch(payloads):
        all_posted.wait(10.0)
        batch_sizes.append(len(payloads))
        payload_types.update(map(type, payloads))
        return owner.handle_batch(payloads)

    transport = get_transport("nixl")
    server = transport.server(first_waits, secret=SECRET, batch_handler=batch)
    address = server.start()
    connections = [transport.connect(address, secret=SECRET) for _ in range(6)]
    try:
        calls = [_route(prepared, 40 + k, rows=1 + k % 2) for k in range(len(connections))]
        pending = [connections[0].post(calls[0], timeout_s=10.0)]
        pending += [conn.post(call, timeout_s=10.0) for conn, call in zip(connections[1:], calls[1:], strict=True)]
        all_posted.set()
        replies = [p.wait(10.0) for p in pending]
    finally:
        for conn in connections:
            conn.close()
        server.stop()
        transport.close()
    assert all(map(replies_agree, replies, [owner.handle(call) for call in calls]))
    assert batch_sizes and max(batch_sizes) >= 2, batch_sizes  # arrivals that coincided were answered together
    assert payload_types == {memoryview}  # read where they landed in the inbox, not copied out


def test_replies_agree_only_within_rounding(service):
    prepared, owner = service
    call = _route(prepared, 50, rows=2)
    reply = owner.handle(call)
    decoded = wire.decode(reply)
    out = wire.as_torch(decoded.out).clone()
    assert replies_agree(reply, reply)
    for delta, agrees in ((4e-6, True), (1e-3, False)):
        moved = out.clone()
        moved[0, 0, 0] += delta
        other = wire.encode(wire.RouteReply(decoded.request_id, wire.to_wire(moved), decoded.lse))
        assert replies_agree(other, reply) is agrees
    assert not replies_agree(owner.handle(_route(prepared, 51, rows=2)), reply)  # another call's answer
