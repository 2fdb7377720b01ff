"""One corpus, two engines: a ``vllm serve`` qroute instance (i0) and a ``sglang serve`` qroute instance (i1) hold
halves of one corpus (``start_cluster`` with engine ``vllm+sglang``) and answer each other's routes and fetches:
the same wire, the same store format (float32 rows of the same model), the same placement. Every request, asked on
both engines at once in route, fetch and auto, reproduces one stock ``vllm serve`` instance whose prompt is corpus +
question (tokens identical, logprobs within ``check.TOLERANCE``), and each ran a local part and a part of the other
engine's instance, by the kind its mode says (vLLM's counts from ``kv_transfer_params``, SGLang's from its
``qroute: request <rid> done`` line). A stock instance, then the two (about 2 minutes)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from qroute.errors import ConfigError
from qroute.ops.check import QUESTION, TOLERANCE, counts_ok, expected_operations
from qroute.plugin.sglang_corpus import done_summaries

MODES = ("route", "fetch", "auto")
MAX_TOKENS = 8
BASE_PORT = 8575  # instances 8575-8576, owners 8675-8676
REFERENCE_PORT = 8579


@pytest.fixture(scope="module")
def mixed(vllm, tiny_fp32_model, sample_corpus, state_dir):
    from qroute.core.corpus import place_model_corpus
    from qroute.ops import sglang_serve
    from qroute.ops.cluster import ClusterSpec, start_cluster, stop_cluster
    from qroute.ops.demo_core import question_ids
    from qroute.ops.http_client import completion

    try:
        sglang_serve.sglang_python()
    except ConfigError as exc:
        pytest.skip(str(exc))
    question = question_ids(tiny_fp32_model, QUESTION)
    spec = ClusterSpec(model_dir=tiny_fp32_model, corpus_dir=sample_corpus, num_instances=2, blocks_per_chunk=2,
                       base_port=BASE_PORT, engine="vllm+sglang")  # fmt: skip
    corpus_ids, directory = place_model_corpus(tiny_fp32_model, sample_corpus, name="corpus",
                                               instances=spec.instance_ids(), blocks_per_chunk=2)  # fmt: skip
    stock = start_cluster(ClusterSpec(model_dir=tiny_fp32_model, corpus_dir=None, num_instances=1,
                                      base_port=REFERENCE_PORT))  # fmt: skip
    try:
        reply = completion(stock.instances[0].url, corpus_ids.tolist() + question, max_tokens=MAX_TOKENS,
                           logprobs=True)  # fmt: skip
    finally:
        stop_cluster(stock)
    state = start_cluster(spec)
    try:
        yield {"state": state, "directory": directory, "question": question, "reference": reply["choices"][0]}
    finally:
        stop_cluster(state)


def _ask(info, question: list[int], mode: str) -> dict:
    from openai import OpenAI

    params = {"qroute": {"mode": mode}}
    body = {"custom_params": params, "rid": f"{info.instance_id}-{mode}"} if info.engine == "sglang" else {
        "kv_transfer_params": params}  # fmt: skip
    client = OpenAI(base_url=info.url, api_key="unused", max_retries=0, timeout=300)
    reply = client.completions.create(model="tiny", prompt=question, max_tokens=MAX_TOKENS, temperature=0,
                                      logprobs=1, extra_body=body)  # fmt: skip
    choice = reply.choices[0]
    counts = (getattr(reply, "kv_transfer_params", None) or {}).get("qroute")
    return {"text": choice.text, "logprobs": choice.logprobs.token_logprobs, "counts": counts}


@pytest.fixture(scope="module")
def answers(mixed):
    infos = mixed["state"].instances
    with ThreadPoolExecutor(len(infos) * len(MODES)) as pool:  # both engines, every mode, at once
        futures = {(info.instance_id, mode): pool.submit(_ask, info, mixed["question"], mode)
                   for info in infos for mode in MODES}  # fmt: skip
        results = {key: future.result() for key, future in futures.items()}
    for info in infos:
        if info.engine == "sglang":
            done = done_summaries(open(info.log, errors="replace").read())
            for mode in MODES:
                results[(info.instance_id, mode)]["counts"] = done.get(f"{info.instance_id}-{mode}")
    return results


def test_the_corpus_is_split_between_the_engines(mixed):
    engines = {info.instance_id: info.engine for info in mixed["state"].instances}
    assert engines == {"i0": "vllm", "i1": "sglang"}
    assert all(info.chunks >= 2 for info in mixed["state"].instances)


@pytest.mark.parametrize("instance", ["i0", "i1"])
@pytest.mark.parametrize("mode", MODES)
def test_each_engine_attends_to_the_others_half_exactly(mixed, answers, instance, mode):
    got, want = answers[(instance, mode)], mixed["reference"]
    assert got["text"] == want["text"] and len(got["logprobs"]) == MAX_TOKENS
    wanted = want["logprobs"]["token_logprobs"]
    assert max(abs(a - b) for a, b in zip(got["logprobs"], wanted, strict=True)) <= TOLERANCE
    counts = got["counts"]
    expected = expected_operations(mixed["directory"], instance, 2, steps=MAX_TOKENS)
    assert counts is not None and counts["mode"] == mode and expected["local"] > 0
    assert counts_ok(mode, counts, expected), (counts, expected)
    assert counts["bytes_moved"] > 0
