"""End to end through real ``sglang serve`` instances (SGLang's CPU engine, qroute's SGLang plugin, the tiny float32
MLA model): the corpus sharded over two qroute instances (``qroute up --engine sglang``'s ``start_cluster``, every
instance owning chunks, prefilled chunk by chunk) reproduces one stock ``sglang serve`` instance
(``--attention-backend torch_native``) whose prompt is corpus + question, queried with the official ``openai``
client, everything in flight at once: two questions on each instance in route, fetch and auto, a streamed
completion and a chat. Each request's work comes from the ``qroute: request <rid> done`` line of its instance's log:
exact owner-layer counts by kind (the local part, and the peer's part routed or fetched). A request without corpus
must differ from the reference (negative control); bad parameters are an HTTP 400 and lose nothing else; once i1
is killed, i0's requests that need its half are aborted with HTTP 500 and the reason while one without the corpus
is answered. Three instances (about 2 minutes)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from qroute.errors import ConfigError
from qroute.ops.check import QUESTION, TOLERANCE, counts_ok, expected_operations
from qroute.ops.processes import stop_pid
from qroute.plugin.sglang_corpus import done_summaries

QUESTIONS = [QUESTION, "What does Store.get return when the key is missing?"]
MODES = ("route", "fetch", "auto")
MAX_TOKENS = 8
BASE_PORT = 8560  # instances 8560-8561, owners 8660-8661
REFERENCE_PORT = 8565


@pytest.fixture(scope="module")
def cluster(tiny_fp32_model, sample_corpus, state_dir):
    from qroute.core.corpus import place_model_corpus
    from qroute.ops import sglang_serve
    from qroute.ops.cluster import ClusterSpec, start_cluster, stop_cluster
    from qroute.ops.demo_core import question_ids

    try:
        sglang_serve.sglang_python()
    except ConfigError as exc:
        pytest.skip(str(exc))
    spec = ClusterSpec(model_dir=tiny_fp32_model, corpus_dir=sample_corpus, num_instances=2, blocks_per_chunk=2,
                       base_port=BASE_PORT, engine="sglang")  # fmt: skip
    corpus_ids, directory = place_model_corpus(tiny_fp32_model, sample_corpus, name="corpus",
                                               instances=spec.instance_ids(), blocks_per_chunk=2)  # fmt: skip
    log = state_dir / "reference.log"
    command = sglang_serve.sglang_serve_command(tiny_fp32_model, REFERENCE_PORT, backend="torch_native")
    reference = sglang_serve.start_sglang(command, sglang_serve.sglang_env(), log)  # starts beside the cluster
    state = None
    try:
        state = start_cluster(spec)
        reference_url = sglang_serve.wait_sglang(reference, REFERENCE_PORT, log)
        yield {"state": state, "directory": directory, "corpus_ids": corpus_ids.tolist(), "reference": reference_url,
               "questions": [question_ids(tiny_fp32_model, q) for q in QUESTIONS]}  # fmt: skip
    finally:
        stop_pid(reference.pid)
        if state is not None:
            stop_cluster(state)


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)


def _completion(url: str, prompt: list[int], params: dict | None, rid: str) -> dict:
    body = {"rid": rid, **({"custom_params": {"qroute": params}} if params is not None else {})}
    choice = _client(url).completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             logprobs=1, extra_body=body).choices[0]  # fmt: skip
    return {"text": choice.text, "tokens": choice.logprobs.tokens, "logprobs": choice.logprobs.token_logprobs}


def _streamed(url: str, prompt: list[int], rid: str) -> dict:
    stream = _client(url).completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True, extra_body={"rid": rid})  # fmt: skip
    return {"text": "".join(chunk.choices[0].text for chunk in stream if chunk.choices)}


def _chat(url: str, question: str, rid: str) -> dict:
    reply = _client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                                 max_tokens=MAX_TOKENS, temperature=0, extra_body={"rid": rid})
    return {"text": reply.choices[0].message.content}


@pytest.fixture(scope="module")
def answers(cluster):
    urls = {info.instance_id: info.url for info in cluster["state"].instances}
    corpus, questions = cluster["corpus_ids"], cluster["questions"]
    jobs = {("reference", q): (_completion, cluster["reference"], corpus + prompt, None, f"ref-{q}")
            for q, prompt in enumerate(questions)}  # fmt: skip
    for instance, url in urls.items():
        for mode in MODES:
            for q, prompt in enumerate(questions):
                jobs[(instance, mode, q)] = (_completion, url, prompt, {"mode": mode}, f"{instance}-{mode}-{q}")
    jobs[("i1", "stream")] = (_streamed, urls["i1"], questions[0], "i1-stream")  # default corpus and mode (auto)
    jobs[("i0", "chat")] = (_chat, urls["i0"], QUESTIONS[0], "i0-chat")
    jobs[("i0", "no corpus")] = (_completion, urls["i0"], questions[0], {"corpus": None}, "i0-no-corpus")
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: several requests in each engine step
        futures = {key: pool.submit(fn, *args) for key, (fn, *args) in jobs.items()}
        results = {key: future.result() for key, future in futures.items()}
    done = {}
    for info in cluster["state"].instances:
        done.update(done_summaries(open(info.log, errors="replace").read()))
    return results, done


def test_every_instance_holds_and_stored_part_of_the_corpus(cluster):
    directory = cluster["directory"]
    for info in cluster["state"].instances:
        mine = directory.chunks_of(info.instance_id)
        assert info.chunks == len(mine) >= 2
        stored = re.findall(r"qroute: stored chunk (\d+) of", open(info.log, errors="replace").read())
        assert sorted(map(int, stored)) == sorted(c.chunk_id for c in mine)


@pytest.mark.parametrize("instance", ["i0", "i1"])
@pytest.mark.parametrize("mode", MODES)
def test_sharded_sglang_reproduces_one_stock_instance(cluster, answers, instance, mode):
    results, done = answers
    num_layers = 2
    for q in range(len(QUESTIONS)):
        got, want = results[(instance, mode, q)], results[("reference", q)]
        assert got["tokens"] == want["tokens"] and len(got["tokens"]) == MAX_TOKENS
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)) <= TOLERANCE
        counts = done[f"{instance}-{mode}-{q}"]
        expected = expected_operations(cluster["directory"], instance, num_layers, steps=MAX_TOKENS)
        assert counts["corpus"] == "corpus" and counts["mode"] == mode
        assert expected["local"] > 0 and expected["remote"] == expected["local"]
        assert counts_ok(mode, counts, expected), (counts, expected)
        assert counts["bytes_moved"] > 0


def test_streamed_and_chat_requests_attend_to_the_corpus(answers):
    results, done = answers
    assert results[("i1", "stream")]["text"] == results[("reference", 0)]["text"]
    assert results[("i0", "chat")]["text"] == results[("reference", 0)]["text"]
    assert done["i1-stream"]["mode"] == "auto" and done["i1-stream"]["local"] > 0
    assert done["i0-chat"]["local"] > 0 and "error" not in done["i0-chat"]


def test_a_request_without_the_corpus_does_not_match(answers):
    results, done = answers
    got, want = results[("i0", "no corpus")], results[("reference", 0)]
    assert got["tokens"] != want["tokens"] or max(
        abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)) > 100 * TOLERANCE  # fmt: skip
    assert "i0-no-corpus" not in done  # no corpus work, so no summary


def test_bad_parameters_are_refused_and_nothing_else_is_lost(cluster, answers):
    from openai import BadRequestError

    url = cluster["state"].instances[1].url
    with pytest.raises(BadRequestError, match="unknown corpus 'nope'"):
        _completion(url, cluster["questions"][0], {"corpus": "nope"}, "i1-unknown")
    with pytest.raises(BadRequestError, match="custom_params.qroute.mode 'bogus' is not one of"):
        _completion(url, cluster["questions"][0], {"mode": "bogus"}, "i1-bogus")
    again = _completion(url, cluster["questions"][1], {"mode": "route"}, "i1-again")
    assert again["tokens"] == answers[0][("reference", 1)]["tokens"]


def test_a_dead_owner_fails_its_requests_with_500_and_the_instance_keeps_serving(cluster, answers):
    """Runs last: it kills i1. Requests on i0 that need i1's half are aborted with HTTP 500 and the reason, in
    flight together with ones that need no corpus, which are answered."""
    import os
    import signal

    from openai import InternalServerError

    i0, i1 = cluster["state"].instances
    os.killpg(i1.pid, signal.SIGKILL)
    stop_pid(i1.pid)
    question = cluster["questions"][0]
    jobs = {mode: {"mode": mode} for mode in ("route", "fetch")} | {"none": {"corpus": None}}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(_completion, i0.url, question, params, f"i0-dead-{name}")
                   for name, params in jobs.items()}  # fmt: skip
    for name in ("route", "fetch"):
        with pytest.raises(InternalServerError, match="qroute: .*i1"):
            futures[name].result()
    assert futures["none"].result()["tokens"] == answers[0][("i0", "no corpus")]["tokens"]
