"""Route and fetch between real processes over TCP and NIXL: exact results, and failures that end in a
fallback or a clear error within the deadline (SIGKILL and SIGSTOP of an owner), never a hang."""

import os
import signal
import time

import pytest
import torch

from qroute.core import wire
from qroute.core.costmodel import load_fabric
from qroute.dataplane.peering import connect_owners
from qroute.dataplane.router import Router, RouterConfig
from qroute.dataplane.shard import corpus_positions
from qroute.errors import QRouteError
from qroute.numerics.attention import partial_attention
from qroute.ops.owner_process import start_owner
from qroute.reference.prepared import prepare_corpus
from qroute.transport import get_transport

SECRET = b"process-test-secret"
INSTANCES = ["a", "b", "c"]  # a: this process (requester, no shard of its own here); b, c: owner processes
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, sample_corpus):
    return prepare_corpus(tiny_model_dir, sample_corpus, instances=INSTANCES, replicas=2, blocks_per_chunk=2)


@pytest.fixture(params=["tcp", "nixl"])
def owners(request, prepared, tiny_model_dir, sample_corpus):
    kind = request.param
    procs = {}
    try:
        for name in ("b", "c"):
            procs[name] = start_owner(instance=name, transport=kind, model_dir=tiny_model_dir, corpus=sample_corpus,
                                      instances=INSTANCES, secret=SECRET, replicas=2, blocks_per_chunk=2)  # fmt: skip
        transport = get_transport(kind)
        connections = connect_owners(
            transport, {n: p.address for n, p in procs.items()}, instance_id="a", directory=prepared.directory,
            model_fingerprint=prepared.fingerprint, compat=prepared.compat, secret=SECRET,
        )  # fmt: skip
        yield kind, procs, connections
        for connection in connections.values():
            connection.close()
        transport.close()
    finally:
        for proc in procs.values():
            if proc.process.poll() is None:
                os.kill(proc.process.pid, signal.SIGCONT)
            proc.stop()


def make_router(prepared, connections, mode):
    return Router(RouterConfig(instance_id="a", mode=mode, timeout_s=TIMEOUT_S), prepared.directory,
                  prepared.geometry, load_fabric("loopback-tcp"), prepared.params, connections)  # fmt: skip


def queries(prepared, rows=2):
    g = torch.Generator().manual_seed(11)
    h = prepared.geometry.num_heads
    return torch.randn(rows, h, 512, generator=g), torch.randn(rows, h, 64, generator=g)


def local_part(prepared, layer, q_nope, q_pe, block_ids):
    slots = corpus_positions(prepared.directory, block_ids)
    return partial_attention(q_nope, q_pe, prepared.all_rows[layer], slots, prepared.params.scale, 512)


def test_route_and_fetch_equal_local_attention(prepared, owners):
    _, _, connections = owners
    q_nope, q_pe = queries(prepared)
    for owner, connection in connections.items():
        blocks = tuple(sorted(b for b, _ in prepared.shard(owner).block_rows.items()))[:5]
        for layer in range(prepared.model.num_layers):
            ref_out, ref_lse = local_part(prepared, layer, q_nope, q_pe, blocks)
            request = wire.RouteRequest(1, "corpus", layer, wire.to_wire(q_nope), wire.to_wire(q_pe), blocks, 10**6)
            reply = wire.decode(connection.call(wire.encode(request), 5.0))
            assert isinstance(reply, wire.RouteReply)
            # Same rows, same order, same float32 op in another process: equal up to float32 rounding of the
            # 576-wide dot products, whose BLAS blocking depends on shape and threads (up to ~5e-6 seen on values of
            # a few units on an AVX-512 host).
            torch.testing.assert_close(wire.as_torch(reply.out), ref_out, atol=1e-5, rtol=0)
            torch.testing.assert_close(wire.as_torch(reply.lse), ref_lse, atol=1e-5, rtol=0)
    for mode in ("route", "fetch"):
        router = make_router(prepared, connections, mode)
        plan = router.plan(2)
        for layer in range(prepared.model.num_layers):
            out, lse = router.run(layer, q_nope, q_pe, plan)
            rows = prepared.all_rows[layer]
            ref = partial_attention(q_nope, q_pe, rows, torch.arange(rows.shape[0]), prepared.params.scale, 512)
            torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(lse, ref[1], atol=1e-5, rtol=0)
        assert router.stats[mode] > 0


def _blocks_of(prepared, only):
    """Blocks whose owners are exactly ``only`` (in some order)."""
    return [b for b in range(prepared.directory.num_blocks)
            if set(prepared.directory.chunk_for_block(b).owners) == set(only)]  # fmt: skip


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
@pytest.mark.parametrize("mode", ["route", "fetch"])
def test_lost_owner_falls_back_within_the_deadline(prepared, owners, how, mode):
    kind, procs, connections = owners
    q_nope, q_pe = queries(prepared)
    both = _blocks_of(prepared, ("b", "c"))
    only_b = [b for b in _blocks_of(prepared, ("a", "b"))]
    assert both and only_b, "the sample corpus should place chunks on every pair of owners"
    router = make_router(prepared, connections, mode)
    os.kill(procs["b"].process.pid, how)
    if how == signal.SIGSTOP:
        time.sleep(0.2)  # let every thread of the owner stop
    else:  # gone, not still exiting: a process being torn down can still answer a one-sided READ
        procs["b"].process.wait(10.0)

    start = time.monotonic()
    out, lse = router.run(0, q_nope, q_pe, router.plan(2, block_ids=both))  # b first or second: c answers
    elapsed = time.monotonic() - start
    ref = local_part(prepared, 0, q_nope, q_pe, both)
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=0)
    assert elapsed < 2 * TIMEOUT_S + 1.0

    start = time.monotonic()
    plan = router.plan(2, block_ids=only_b)
    if kind == "nixl" and how == signal.SIGSTOP:
        # A one-sided READ needs no CPU on the owner: a stalled owner's memory is still read, also after its
        # route timed out (route -> replica (a: not serving) -> fetch from b).
        fetches, fallbacks = router.stats["fetch"], router.stats["fallbacks"]
        torch.testing.assert_close(router.run(0, q_nope, q_pe, plan)[0],
                                   local_part(prepared, 0, q_nope, q_pe, only_b)[0], atol=1e-5, rtol=0)  # fmt: skip
        assert router.stats["fetch"] == fetches + 1  # the kind that finally answered
        if mode == "route":
            assert router.stats["fallbacks"] > fallbacks  # the route failed first
    else:
        with pytest.raises(QRouteError, match="unavailable"):  # a is not serving here and b is gone
            router.run(0, q_nope, q_pe, plan)
    assert time.monotonic() - start < 2 * TIMEOUT_S + 1.0
