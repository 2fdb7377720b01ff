"""Membership through etcd with real instances: a ``qroute up --etcd`` cluster of two ``vllm serve`` instances grows
to three (``qroute join``) and shrinks to two again (``qroute leave``), with requests in flight.

The joiner lays its store out for the members in etcd plus itself and copies from their holders exactly the chunks
rendezvous hashing moves to it (about a third); it is routed to only once it holds them. The leaver stays routed
while its chunks are copied to their new owners, then removes its record and is stopped. Before, during and after
each change, every answer is token for token the two-instance cluster's (itself checked against one instance
holding everything by the other cluster tests), and the /metrics of the instances show the joiner's chunks really
answered (routes to it, fetches from it, its own local parts). About 3-4 minutes.
"""

from __future__ import annotations

import threading

import pytest

from tests.ops.faults import answers, running_cluster

SECRET = "membership-test-secret"


@pytest.fixture(scope="module")
def cluster(vllm, tiny_fp32_model, sample_corpus, state_dir):
    from qroute.ops.cluster import ClusterSpec

    spec = ClusterSpec(model_dir=tiny_fp32_model, corpus_dir=sample_corpus, num_instances=2, replicas=1,
                       blocks_per_chunk=2, base_port=8500, etcd=True)  # fmt: skip
    with running_cluster(spec, SECRET) as state:
        yield spec, state


def _parts(url: str, owner: str, decision: str) -> float:
    from qroute.ops.scrape import scrape, total

    return total(scrape(url), "vllm:qroute_corpus_parts_total", owner=owner, decision=decision)


def test_an_instance_joins_and_another_leaves_with_answers_unchanged(cluster):
    from qroute.core.corpus import place_model_corpus
    from qroute.dataplane.membership import moved_chunks
    from qroute.ops.check import flush_owner_stats
    from qroute.ops.membership_ops import join_instance, leave_instance, member_records

    spec, state = cluster
    i0, i1 = state.instances
    _, two = place_model_corpus(spec.model_dir, spec.corpus_dir, name=spec.corpus_name, instances=["i0", "i1"],
                                blocks_per_chunk=spec.blocks_per_chunk)  # fmt: skip
    assert {i: r.state for i, r in member_records(state).items()} == {"i0": "serving", "i1": "serving"}
    want = {mode: answers(i0.url, mode) for mode in ("route", "fetch")}
    assert answers(i1.url, "route") == answers(i1.url, "fetch")

    during: list[list[list[int]]] = []
    stop = threading.Event()

    def keep_asking() -> None:  # requests in flight on i0 while i2 starts, copies and is taken into routing
        while not stop.is_set():
            during.append(answers(i0.url, "route"))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        joined_id = join_instance(spec, state, SECRET, log=lambda _: None)
    finally:
        stop.set()
        asker.join()
    assert joined_id == "i2" and during and all(a == want["route"] for a in during), len(during)
    i2 = state.instances[2]
    three = two.with_instances(["i0", "i1", "i2"])
    records = member_records(state)
    moved = moved_chunks(two, three)
    assert set(moved) == {"i2"} and 0 < len(moved["i2"]) < len(two.chunks)
    assert sorted(records["i2"].ready_chunks) == moved["i2"]  # it copied exactly the chunks that moved to it
    print(f"join: {len(moved['i2'])} of {len(two.chunks)} chunks moved to i2")
    from qroute.ops.cluster_cli import cluster_status

    assert {r["instance"]: r["member"].split(",")[0] for r in cluster_status(state)} == \
        dict.fromkeys(["i0", "i1", "i2"], "serving")  # fmt: skip

    routed, fetched = _parts(i0.url, "i2", "route"), _parts(i1.url, "i2", "fetch")
    for mode in ("route", "fetch"):
        assert answers(i0.url, mode) == want[mode]
        assert answers(i1.url, mode) == want[mode]
        assert answers(i2.url, mode) == want[mode]
    flush_owner_stats({"i0": i0.url, "i1": i1.url, "i2": i2.url})
    assert _parts(i0.url, "i2", "route") > routed and _parts(i1.url, "i2", "fetch") > fetched
    assert _parts(i2.url, "i2", "local") > 0  # its copied rows answer its own requests

    leave_instance(state, "i0", log=lambda _: None)
    records = member_records(state)
    assert sorted(records) == ["i1", "i2"]
    after = two.with_instances(["i1", "i2"])
    for name in ("i1", "i2"):  # every chunk is ready on its owners without i0
        assert {c.chunk_id for c in after.chunks_of(name)} <= set(records[name].ready_chunks), name
    for mode in ("route", "fetch"):
        assert answers(i1.url, mode) == want[mode]
        assert answers(i2.url, mode) == want[mode]
