"""A request whose corpus attention cannot be computed is failed, not answered without the corpus.

Two real qroute instances; instance i1 is killed (SIGKILL to its process group), then route-mode requests to i0
need i1's blocks. Under ``kv_load_failure_policy`` "fail" (the default) the worker reports one of the request's
computed blocks as a load error and vLLM ends the request with FINISHED_ERROR: HTTP 500, not a 200 completion
computed without the corpus. A request that ends on that failed first step (``max_tokens=1``), which vLLM cannot
fail, is turned into a 500 with the reason by qroute's middleware (``qroute.plugin.vllm_http``). i0 keeps serving
requests that need no corpus, and ``qroute status`` shows i1 down, as i0 sees it too, with i0's last errors.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.ops.faults import running_cluster

PROMPT = [5, 17, 42, 99, 7, 3, 11, 23]
ROUTED = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0,
          "kv_transfer_params": {"qroute": {"mode": "route"}}}  # fmt: skip


@pytest.fixture(scope="module")
def cluster(vllm, tiny_fp32_model, sample_corpus, state_dir):
    from qroute.ops.cluster import ClusterSpec

    spec = ClusterSpec(model_dir=tiny_fp32_model, corpus_dir=sample_corpus, num_instances=2, blocks_per_chunk=4,
                       base_port=8700)  # fmt: skip
    with running_cluster(spec) as state:
        yield state


def test_a_one_token_stream_is_answered_as_a_stream(cluster):
    """Both instances up: a streamed one-token request (which the middleware serves unstreamed, to check it) reaches
    the official client as a stream with the same token as the unstreamed answer, through completions and chat,
    several at once. (Runs before the fixtures below kill i1.)"""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from qroute.bench.soak import KINDS, ask

    client = OpenAI(base_url=cluster.instances[0].url, api_key="test", max_retries=0)
    question = "Which class keeps the items?"
    with ThreadPoolExecutor(len(KINDS)) as pool:
        got = dict(zip(KINDS, pool.map(lambda kind: ask(client, kind, question, PROMPT, 1), KINDS), strict=True))
    assert all(len(tokens) == 1 for tokens in got.values()), got
    assert got["completion stream"] == got["completion"] and got["chat stream"] == got["chat"], got


@pytest.fixture(scope="module")
def owner_killed(cluster):
    from qroute.ops.http_client import completion
    from qroute.ops.processes import stop_pid

    i0, i1 = cluster.instances
    completion(i0.url, PROMPT, max_tokens=2, kv_transfer_params={"qroute": {"mode": "route"}})  # served first
    os.killpg(i1.pid, signal.SIGKILL)
    stop_pid(i1.pid)  # returns once its process group is gone
    return cluster


def test_unreachable_owner_fails_the_request_and_the_instance_keeps_serving(owner_killed):
    from qroute.ops.http_client import http_json

    i0 = owner_killed.instances[0]
    status, reply = http_json(i0.url + "/completions", ROUTED, timeout_s=120.0)
    # vLLM 0.32's OpenAI server turns FINISHED_ERROR into HTTP 500 {"error": {"message": "Internal server
    # error", "type": "InternalServerError", ...}}; the qroute reason is in the worker's ERROR log line.
    assert status == 500 and "error" in reply and "choices" not in reply, (status, reply)
    status, reply = http_json(i0.url + "/completions", {**ROUTED, "kv_transfer_params": {"qroute": {"corpus": None}}})
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] == "length" and reply["choices"][0]["text"]


@pytest.mark.parametrize("mode", ["route", "fetch"])
def test_a_request_ending_on_its_failed_first_step_is_an_error_not_a_200(owner_killed, mode):
    from qroute.ops.http_client import http_json

    i0 = owner_killed.instances[0]
    body = {**ROUTED, "max_tokens": 1, "kv_transfer_params": {"qroute": {"mode": mode}}}
    status, reply = http_json(i0.url + "/completions", body, timeout_s=120.0)
    assert status == 500 and "choices" not in reply, (status, reply)
    message = reply["error"]["message"]
    assert "corpus attention failed" in message and "i1" in message, message


def test_status_shows_the_dead_owner_and_the_last_errors(owner_killed):
    from qroute.ops.cluster_cli import cluster_status

    rows = {row["instance"]: row for row in cluster_status(owner_killed)}
    assert rows["i0"]["healthy"] and not rows["i1"]["alive"]
    assert rows["i0"]["peers"]["i1"]["up"] == 0.0  # as i0 sees it, from its /metrics
    assert rows["i0"]["peers"]["i1"]["fallbacks"] >= 1
    assert any("i1" in line for line in rows["i0"]["last_errors"]), rows["i0"]["last_errors"]


@pytest.mark.parametrize("kind", ["completion stream", "chat stream"])
def test_a_one_token_stream_that_lost_its_corpus_is_an_error(owner_killed, kind):
    import openai

    from qroute.bench.soak import ask

    client = openai.OpenAI(base_url=owner_killed.instances[0].url, api_key="test", max_retries=0)
    with pytest.raises(openai.InternalServerError, match="corpus attention failed"):
        ask(client, kind, "Which class keeps the items?", PROMPT, 1)
