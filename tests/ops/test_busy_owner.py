"""A busy owner over NIXL: two real qroute instances, every chunk on one of them, so the asker has no other replica.

The owner is stopped (SIGSTOP to its process group: an owner too busy to answer, as one overloaded on shared cores
was seen to be) while the asker has routed requests in flight. Its routes miss their deadline, but its memory is
still readable one-sidedly, so each part falls back to a fetch from it, on the same link: the answers are token for
token the healthy ones, with no reconnection (a new connection would need the stopped owner's CPU for its
handshake, and every request would fail). Resumed, it is routed to again. About 2 minutes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.ops.faults import answers, asker_and_first_owner, running_cluster, wait_routed_again


@pytest.fixture(scope="module")
def cluster(vllm, tiny_fp32_model, sample_corpus, state_dir):
    from qroute.ops.cluster import ClusterSpec

    spec = ClusterSpec(model_dir=tiny_fp32_model, corpus_dir=sample_corpus, num_instances=2, replicas=1,
                       blocks_per_chunk=2, base_port=8840, transport="nixl")  # fmt: skip
    with running_cluster(spec) as state:
        yield spec, state


def test_a_stopped_owners_blocks_are_fetched_over_the_link_kept_and_it_is_routed_to_again(cluster):
    from qroute.ops.scrape import scrape, total, wait_for

    spec, state = cluster
    asker, owner, _ = asker_and_first_owner(spec, state)
    stopped = owner.instance_id
    want = answers(asker.url, "route")
    assert want == answers(asker.url, "fetch")

    def counts(samples):
        return {name: total(samples, f"vllm:qroute_{name}_total", owner=stopped)
                for name in ("deadline_misses", "fallbacks")}  # fmt: skip

    before = counts(scrape(asker.url))
    lost = Path(asker.log).read_text(errors="replace").count(f"lost owner '{stopped}'")
    os.killpg(owner.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        during = [answers(asker.url, "route") for _ in range(2)]  # the second within the routes' back-off
        elapsed = time.monotonic() - start
    finally:
        os.killpg(owner.pid, signal.SIGCONT)
    assert during == [want, want]
    assert elapsed < 30.0, elapsed  # a deadline (timeout_s 2 s) per missed route, never a hang
    after = counts(wait_for(lambda: scrape(asker.url), lambda s: counts(s)["fallbacks"] > before["fallbacks"]))
    assert after["deadline_misses"] > before["deadline_misses"] and after["fallbacks"] > before["fallbacks"]
    assert Path(asker.log).read_text(errors="replace").count(f"lost owner '{stopped}'") == lost  # link kept
    wait_routed_again(asker, stopped, want)
