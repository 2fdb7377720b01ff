"""A partitioned owner: three real qroute instances as separate hosts, each in a network namespace of its own joined
by veth pairs to a bridge (``ClusterSpec.netns``, ``qroute up --netns``), over TCP, every chunk on two of them.

One owner's link is cut (its veth down: it reaches no one and no one reaches it) while another instance has requests
that need its chunks: each completes, token for token as in the healthy cluster, from the other replica, after at
most a few deadlines; the misses and fallbacks are on the requester's /metrics. Restored, the owner is routed to
again and answers its own requests exactly. Needs root for ``ip netns`` (skipped without). About 2 minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests.ops.faults import answers, asker_and_first_owner, running_cluster, wait_routed_again


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    made = subprocess.run(["ip", "netns", "add", "qr-probe"], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", "qr-probe"], capture_output=True)
    return made


pytestmark = pytest.mark.skipif(not _can_make_namespaces(), reason="network namespaces need root and iproute2")


@pytest.fixture(scope="module")
def cluster(vllm, tiny_fp32_model, sample_corpus, state_dir):
    from qroute.ops.cluster import ClusterSpec

    spec = ClusterSpec(model_dir=tiny_fp32_model, corpus_dir=sample_corpus, num_instances=3, replicas=2,
                       blocks_per_chunk=2, base_port=8780, transport="tcp", netns=True)  # fmt: skip
    with running_cluster(spec) as state:
        yield spec, state


def test_instances_are_separate_hosts(cluster):
    from qroute.ops import netns

    spec, state = cluster
    for k, info in enumerate(state.instances):
        assert info.url.startswith(f"http://{netns.address(k)}:") and info.chunks > 0
    assert state.netns == spec.instance_ids()


def test_a_cut_off_owner_costs_at_most_a_few_deadlines_and_is_used_again_once_restored(cluster):
    from qroute.ops import netns
    from qroute.ops.scrape import scrape, total, wait_for

    spec, state = cluster
    asker, victim, _ = asker_and_first_owner(spec, state)
    cut = victim.instance_id
    want = {mode: answers(asker.url, mode) for mode in ("route", "fetch")}
    assert want["route"] == want["fetch"]

    def fell_back(samples):
        return total(samples, "vllm:qroute_fallbacks_total", owner=cut)

    before = fell_back(scrape(asker.url))
    netns.cut(cut)
    try:
        start = time.monotonic()
        during = {mode: answers(asker.url, mode) for mode in ("route", "fetch")}
        elapsed = time.monotonic() - start
    finally:
        netns.restore(cut)
    assert during == want
    assert elapsed < 60.0, elapsed  # a few deadlines (timeout_s 2 s), never a hang
    assert fell_back(wait_for(lambda: scrape(asker.url), lambda s: fell_back(s) > before)) > before
    wait_routed_again(asker, cut, want["route"], timeout_s=90.0)
    assert answers(victim.url, "route") == want["route"]
