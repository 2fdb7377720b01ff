"""Many agents at once, end to end through the official ``openai`` client: four different questions in flight at
once over three qroute instances (so several requests share each engine step), through completions and chat,
streaming and not, and with ``max_tokens=1``, each equal to one stock instance holding corpus + question (tokens,
and logprobs within ``check.TOLERANCE``), the requests of a step sharing their owner messages; a ``"corpus": null``
request in the same batch equals a plain instance without the corpus. The cluster runs with replicas, corpus
prefills split over steps and preemptions (see ``REPLICAS``). And a corpus prefill that an instance does not store
is an error of the launcher, never a silently missing chunk. One reference instance, then three qroute
instances."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from qroute.core.corpus import place_model_corpus
from qroute.errors import QRouteError
from qroute.ops.check import TOLERANCE
from qroute.ops.cluster import ClusterSpec, prefill_corpus_http, start_cluster, stop_cluster
from qroute.ops.demo_core import question_ids
from qroute.ops.http_client import token_ids_of

QUESTIONS = [
    "Which function computes the area of a circle?",
    "What does the store return for a missing key?",
    "Where is the square case handled?",
    "What is the README about?",
]
INSTANCES = ["i0", "i1", "i2"]
BLOCKS_PER_CHUNK = 2
# Long enough that every answer grows past its prompt's blocks: 7 requests per instance, each needing about 4
# blocks at once, cannot all fit in KV_BLOCKS, so vLLM must preempt (with 6 tokens, whether it did depended on
# arrival timing).
MAX_TOKENS = 40
# The qroute cluster runs tight, so that the paths a roomy test never takes run too: each chunk held by two
# instances (replicas), a step budget below a corpus chunk (its prefill is split over steps), and a paged cache
# too small for every request in flight (vLLM preempts requests and recomputes them).
REPLICAS = 2
STEP_TOKENS = 24
MAX_MODEL_LEN = 128
KV_BLOCKS = 10


ON_CORPUS = {"qroute": {"corpus": "corpus"}}
NO_CORPUS = {"qroute": {"corpus": None}}  # a qroute instance attending to its own tokens only


def _extra(kv: dict | None = ON_CORPUS) -> dict:
    return {"return_tokens_as_token_ids": True, **({"kv_transfer_params": kv} if kv is not None else {})}


Answer = tuple[list[int], list[float]]  # greedy token ids and their logprobs
REPORTS: list[dict] = []  # what qroute reported for each non-streamed completion on the corpus


def _completion(client, prompt: list[int], *, stream: bool, kv: dict | None = ON_CORPUS,
                max_tokens: int = MAX_TOKENS) -> Answer:
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0.0, logprobs=1)
    if not stream:
        reply = client.completions.create(**kwargs, extra_body=_extra(kv))
        if kv is ON_CORPUS:  # qroute reports what it did: a local part on every instance, no error
            qroute = ((reply.model_extra or {}).get("kv_transfer_params") or {}).get("qroute")
            assert qroute and "error" not in qroute and qroute["local"] > 0, qroute
            REPORTS.append(qroute)
        logprobs = reply.choices[0].logprobs
        return token_ids_of(logprobs.tokens), list(logprobs.token_logprobs)
    tokens: list[str] = []
    values: list[float] = []
    for chunk in client.completions.create(**kwargs, stream=True, extra_body=_extra(kv)):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
    return token_ids_of(tokens), values


def _chat(client, question: str, *, stream: bool) -> Answer:
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS,
                  temperature=0.0, logprobs=True)  # fmt: skip
    if not stream:
        reply = client.chat.completions.create(**kwargs, extra_body=_extra())
        content = reply.choices[0].logprobs.content
    else:
        content = []
        for chunk in client.chat.completions.create(**kwargs, stream=True, extra_body=_extra()):
            if chunk.choices and chunk.choices[0].logprobs is not None:
                content += chunk.choices[0].logprobs.content or []
    return token_ids_of([c.token for c in content]), [c.logprob for c in content]


@pytest.fixture(scope="module")
def corpus(tiny_fp32_model, sample_corpus):
    token_ids, directory = place_model_corpus(tiny_fp32_model, sample_corpus, name="corpus", instances=INSTANCES,
                                              blocks_per_chunk=BLOCKS_PER_CHUNK, replicas=REPLICAS)  # fmt: skip
    return token_ids.tolist(), directory


@pytest.fixture(scope="module")
def reference(vllm, state_dir, tiny_fp32_model, corpus):
    """Greedy tokens of one stock instance: with the corpus in front of each question, and without it."""
    from openai import OpenAI

    corpus_ids, _ = corpus
    state = start_cluster(ClusterSpec(model_dir=tiny_fp32_model, corpus_dir=None, num_instances=1, base_port=8600))
    try:
        client = OpenAI(base_url=state.instances[0].url, api_key="test")
        prompts = [question_ids(tiny_fp32_model, q) for q in QUESTIONS]
        with_corpus = [_completion(client, corpus_ids + p, stream=False, kv=None) for p in prompts]
        without = _completion(client, prompts[0], stream=False, kv=None)
    finally:
        stop_cluster(state)
    return prompts, with_corpus, without


@pytest.fixture(scope="module")
def cluster(vllm, state_dir, tiny_fp32_model, sample_corpus, reference):
    state = start_cluster(ClusterSpec(model_dir=tiny_fp32_model, corpus_dir=sample_corpus, num_instances=3,
                                      blocks_per_chunk=BLOCKS_PER_CHUNK, base_port=8610, replicas=REPLICAS,
                                      max_num_batched_tokens=STEP_TOKENS, max_model_len=MAX_MODEL_LEN,
                                      kv_blocks=KV_BLOCKS))  # fmt: skip
    try:
        yield state
    finally:
        stop_cluster(state)


def test_many_questions_at_once_through_every_endpoint_equal_the_reference(cluster, reference, corpus):
    from openai import OpenAI

    prompts, want, without = reference
    _, directory = corpus
    assert all(directory.chunks_of(i) for i in INSTANCES)  # every instance owns part of the corpus
    assert all(len(chunk.owners) == REPLICAS for chunk in directory.chunks)
    assert directory.chunk_tokens > STEP_TOKENS  # every corpus chunk's prefill took two steps
    clients = {info.instance_id: OpenAI(base_url=info.url, api_key="test") for info in cluster.instances}
    jobs = {}
    for q, (question, prompt) in enumerate(zip(QUESTIONS, prompts, strict=True)):
        client = clients[INSTANCES[q % len(INSTANCES)]]
        jobs[(q, "completion")] = (_completion, client, prompt, {"stream": False})
        jobs[(q, "completion stream")] = (_completion, client, prompt, {"stream": True})
        jobs[(q, "chat")] = (_chat, client, question, {"stream": False})
        jobs[(q, "chat stream")] = (_chat, client, question, {"stream": True})
        jobs[(q, "one token")] = (_completion, client, prompt, {"stream": False, "max_tokens": 1})
    jobs[(0, "no corpus")] = (_completion, clients["i1"], prompts[0], {"stream": False, "kv": NO_CORPUS})
    with ThreadPoolExecutor(len(jobs)) as pool:  # all in flight at once: 17 requests over 3 instances
        futures = {key: pool.submit(fn, client, arg, **kw) for key, (fn, client, arg, kw) in jobs.items()}
        got = {key: future.result() for key, future in futures.items()}
    for (q, kind), (tokens, logprobs) in got.items():
        expected, expected_logprobs = without if kind == "no corpus" else want[q]
        if kind == "one token":
            expected, expected_logprobs = expected[:1], expected_logprobs[:1]
        assert tokens == expected, (q, kind, tokens, expected)
        worst = max(abs(a - b) for a, b in zip(logprobs, expected_logprobs, strict=True))
        assert worst <= TOLERANCE, (q, kind, worst)
    assert without[0] != want[0][0]  # the corpus changes the answer: the comparison can tell
    # requests in one engine step shared their owner messages (one per owner and layer for all of them)
    assert sum(report["shared"] for report in REPORTS) > 0, REPORTS
    preempted = sum(_metric(info.url, "vllm:num_preemptions_total") for info in cluster.instances)
    assert preempted > 0, "the paged cache was large enough for every request: no preemption was exercised"


def _metric(url: str, name: str) -> float:
    """One counter from the instance's Prometheus endpoint (summed over its label sets)."""
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_a_prefill_that_is_not_stored_is_an_error(cluster, tiny_fp32_model, sample_corpus):
    """A directory that disagrees with the instances' (other chunk size): the instances refuse its chunks (HTTP 500
    through qroute's middleware, with the reason); the launcher must raise, naming the chunk and the reason."""
    token_ids, wrong = place_model_corpus(tiny_fp32_model, sample_corpus, name="corpus", instances=INSTANCES,
                                          blocks_per_chunk=BLOCKS_PER_CHUNK + 1)  # fmt: skip
    with pytest.raises(QRouteError, match="prefill of chunk 0 .* was not stored: .*not the token ids of chunk 0"):
        prefill_corpus_http(cluster, token_ids.tolist(), wrong, log=lambda *_: None)
