"""A restarted owner never answers from its emptied store: three real qroute instances, every chunk on two of them.

One owner is killed (SIGKILL to its process group) and started again on the same ports with the same secret: it
comes back with an empty store and is not prefilled. The requester reconnects to it, asks it first for the blocks
it is the first replica of, is refused (``not_ready``, for routes) or reads its ready flags (for fetches), and takes
them from the other replica: the answers are token for token those the healthy cluster gave. The restarted
instance itself refuses requests that need its own chunks, with an error that says so. About 2 minutes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.ops.faults import (
    PROMPTS,
    answers,
    asker_and_first_owner,
    running_cluster,
    streamed_answers,
    wait_for_line,
    wait_routed_again,
)

SECRET = "restart-test-secret"
MID_DECODE_TOKENS = 48  # long enough that the kill lands while every stream is decoding


@pytest.fixture(scope="module")
def cluster(vllm, tiny_fp32_model, sample_corpus, state_dir):
    from qroute.ops.cluster import ClusterSpec

    spec = ClusterSpec(model_dir=tiny_fp32_model, corpus_dir=sample_corpus, num_instances=3, replicas=2,
                       blocks_per_chunk=2, base_port=8760)  # fmt: skip
    with running_cluster(spec, SECRET) as state:
        yield spec, state


def test_a_restarted_owner_is_skipped_until_prefilled_and_answers_stay_exact(cluster):
    from qroute.ops.cluster import spawn_instance, wait_healthy
    from qroute.ops.http_client import http_json

    spec, state = cluster
    asker, victim, _ = asker_and_first_owner(spec, state)
    restarted, k = victim.instance_id, state.instances.index(victim)
    before = {mode: answers(asker.url, mode) for mode in ("route", "fetch")}

    os.killpg(victim.pid, signal.SIGKILL)
    os.waitpid(victim.pid, 0)  # start_cluster started it from this process: reap it (a zombie stays "alive")
    process, info = spawn_instance(spec, k, SECRET)  # same ports, empty store, no prefill
    state.instances[k] = info
    wait_healthy([info], [process], 300.0)
    # the requester notices the old connection is gone (a request falls back), reconnects to the new process
    wait_for_line(asker.log, f"connected to owner '{restarted}'", 2, 120.0, lambda: answers(asker.url, "route"))

    after = {mode: answers(asker.url, mode) for mode in ("route", "fetch")}
    assert after == before  # exact: the other replica answered what the restarted owner could not
    log = Path(asker.log).read_text(errors="replace")
    assert f"owner '{restarted}' failed: not_ready: owner '{restarted}' has not stored blocks" in log
    # the restarted instance refuses what needs its own (empty) chunks: vLLM ends the request with an error
    # (HTTP 500, see test_failures) and the worker's log says why
    status, reply = http_json(info.url + "/completions", {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 2,
                                                          "temperature": 0.0})  # fmt: skip
    assert status == 500 and "choices" not in reply, (status, reply)
    assert f"is not ready on '{restarted}'" in Path(info.log).read_text(errors="replace")


def test_an_owner_killed_mid_decode_is_survived_and_the_supervisor_brings_it_back(cluster):
    """Streams in flight on a requester when an owner it routes to is SIGKILLed: each one completes, token for
    token as in the healthy cluster, from the other replica. Then ``qroute up --supervise``'s step: the dead owner
    is started again, its own chunks prefilled on it alone; it answers its own requests exactly, and its peers
    route to it again instead of to the other replica."""
    from qroute.ops.supervisor import supervise_once

    spec, state = cluster
    asker, victim, directory = asker_and_first_owner(spec, state)
    restarted, k = victim.instance_id, state.instances.index(victim)
    want = answers(asker.url, "route", max_tokens=MID_DECODE_TOKENS)
    connected = Path(asker.log).read_text(errors="replace").count(f"connected to owner '{restarted}'")

    decoding = threading.Event()
    with streamed_answers(asker.url, "route", MID_DECODE_TOKENS, decoding) as pool:
        assert decoding.wait(120.0), "the streams did not start"
        os.killpg(victim.pid, signal.SIGKILL)  # every stream has tokens, none is done
        assert not any(f.done() for f in pool.results)
        assert [f.result(timeout=300.0) for f in pool.results] == want

    deadline = time.monotonic() + 30.0
    while not (rejoined := supervise_once(spec, state, SECRET)):  # what `supervise` does every 2 s
        assert time.monotonic() < deadline, "the supervisor did not see the killed owner go"
        time.sleep(0.2)
    assert rejoined == [restarted]
    info = state.instances[k]
    assert info.pid != victim.pid and info.chunks == len(directory.chunks_of(restarted))
    short = [tokens[:8] for tokens in want]
    assert {mode: answers(info.url, mode) for mode in ("route", "fetch")} == {"route": short, "fetch": short}

    wait_for_line(asker.log, f"connected to owner '{restarted}'", connected + 1, 120.0,
                  lambda: answers(asker.url, "route"))  # fmt: skip
    refusals = Path(asker.log).read_text(errors="replace").count(f"owner '{restarted}' failed")
    wait_routed_again(asker, restarted, short)
    assert Path(asker.log).read_text(errors="replace").count(f"owner '{restarted}' failed") == refusals
    assert supervise_once(spec, state, SECRET) == []  # nothing else is down


def test_a_stopped_owner_costs_at_most_its_deadline_and_is_used_again_once_resumed(cluster):
    """SIGSTOP an owner (its whole process group) with requests to make: each request waits for it at most the
    configured deadline (timeout_s, 2 s) per attempt, then takes its blocks from the other replica, exactly; the
    misses are counted on /metrics. Once resumed (SIGCONT) it is routed to again, and its late replies to calls
    that timed out change nothing."""
    from qroute.ops.scrape import scrape, total, wait_for

    spec, state = cluster
    asker, victim, _ = asker_and_first_owner(spec, state)
    stopped = victim.instance_id
    want = answers(asker.url, "route")

    def misses(samples):
        return total(samples, "vllm:qroute_deadline_misses_total", owner=stopped)

    missed_before = misses(scrape(asker.url))
    os.killpg(victim.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        during = {mode: answers(asker.url, mode) for mode in ("route", "fetch")}
        elapsed = time.monotonic() - start
    finally:
        os.killpg(victim.pid, signal.SIGCONT)
    assert during == {"route": want, "fetch": want}
    assert elapsed < 60.0, elapsed  # waits of a few deadlines, never a hang (the HTTP client's own limit is 300 s)
    assert misses(wait_for(lambda: scrape(asker.url), lambda s: misses(s) > missed_before)) > missed_before
    wait_routed_again(asker, stopped, want)
    assert answers(victim.url, "route") == want
