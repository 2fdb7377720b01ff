"""A request whose corpus attention cannot be computed is failed by vLLM, not answered without the corpus.

Two real qroute instances; instance i1 is killed (SIGKILL to its process group), then a route-mode request
to i0 needs i1's blocks. Under ``kv_load_failure_policy`` "fail" (the default) the worker reports one of
the request's computed blocks as a load error and vLLM ends the request with FINISHED_ERROR: the client
gets HTTP 500, not a 200 completion computed without the corpus. i0 keeps serving requests that need no corpus.
"""

from __future__ import annotations

import os
import signal

import pytest

PROMPT = [5, 17, 42, 99, 7, 3, 11, 23]


@pytest.fixture(scope="module")
def cluster(vllm, tiny_fp32_model, sample_corpus, tmp_path_factory):
    from qroute.ops.cluster import ClusterSpec, start_cluster, stop_cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QROUTE_STATE_DIR", str(tmp_path_factory.mktemp("qroute-state")))
        spec = ClusterSpec(model_dir=tiny_fp32_model, corpus_dir=sample_corpus, num_instances=2,
                           blocks_per_chunk=4, base_port=8700)  # fmt: skip
        state = start_cluster(spec)
        try:
            yield state
        finally:
            stop_cluster(state)


def test_unreachable_owner_fails_the_request_and_the_instance_keeps_serving(cluster):
    from qroute.ops.cluster import http_json

    i0, i1 = cluster.instances
    os.killpg(i1.pid, signal.SIGKILL)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0,
            "kv_transfer_params": {"qroute": {"mode": "route"}}}  # fmt: skip
    status, reply = http_json(i0.url + "/completions", body, timeout_s=120.0)
    # vLLM 0.32's OpenAI server turns FINISHED_ERROR into HTTP 500 {"error": {"message": "Internal server
    # error", "type": "InternalServerError", ...}}; the qroute reason is in the worker's ERROR log line.
    assert status == 500 and "error" in reply and "choices" not in reply, (status, reply)
    status, reply = http_json(i0.url + "/completions", {**body, "kv_transfer_params": {"qroute": {"corpus": None}}})
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] == "length" and reply["choices"][0]["text"]
