"""Helpers of the fault tests (restart, stop, partition, busy owner): a cluster started and stopped around a module's
tests, three prompts asked at once, the requester / owner pair whose blocks the owner is asked for first, and waiting
until an owner is routed to again."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = [[5, 17, 42, 99, 7, 3, 11, 23], [8, 1, 64, 2, 19, 77], [30, 31, 32, 33, 34, 35, 36]]


@contextlib.contextmanager
def running_cluster(spec, secret: str | None = None):
    """``start_cluster(spec)``'s state for the block, every instance stopped after it (take the ``state_dir``
    fixture first: the cluster records itself there)."""
    from qroute.ops.cluster import start_cluster, stop_cluster

    state = start_cluster(spec, secret=secret)
    try:
        yield state
    finally:
        stop_cluster(state)


def answers(url: str, mode: str, max_tokens: int = 8) -> list[list[int]]:
    """Greedy tokens of ``PROMPTS``, all in flight at once, each one's corpus attention reported without error."""
    from qroute.ops.check import greedy_completion

    def one(prompt: list[int]) -> list[int]:
        got = greedy_completion(url, prompt, max_tokens, {"qroute": {"mode": mode}})
        assert got["qroute"] and "error" not in got["qroute"], got["qroute"]
        return got["tokens"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def asker_and_first_owner(spec, state):
    """(requester info, owner info, directory): an instance and the owner it asks first for chunks it does not
    hold itself (the owner's chunks have another replica)."""
    from qroute.core.corpus import place_model_corpus

    _, directory = place_model_corpus(spec.model_dir, spec.corpus_dir, name=spec.corpus_name,
                                      instances=spec.instance_ids(), replicas=spec.replicas,
                                      blocks_per_chunk=spec.blocks_per_chunk)  # fmt: skip
    requester, owner = next((r, c.owners[0]) for r in spec.instance_ids() for c in directory.chunks
                            if r not in c.owners)  # fmt: skip
    index = {info.instance_id: k for k, info in enumerate(state.instances)}
    return state.instances[index[requester]], state.instances[index[owner]], directory


def routed_to(url: str, owner: str) -> float:
    from qroute.ops.scrape import scrape, total

    return total(scrape(url), "vllm:qroute_corpus_parts_total", owner=owner, decision="route")


def wait_routed_again(asker, owner: str, want: list[list[int]], timeout_s: float = 60.0) -> None:
    """Ask on ``asker`` (answers must stay ``want``) until its /metrics show a route answered by ``owner``."""
    before = routed_to(asker.url, owner)
    deadline = time.monotonic() + timeout_s
    while routed_to(asker.url, owner) <= before:  # past its back-off the owner is asked first again
        assert time.monotonic() < deadline, f"{owner!r} was not routed to again"
        assert answers(asker.url, "route") == want
        time.sleep(1.0)


def wait_for_line(log: str, text: str, count: int, timeout_s: float, poke) -> None:
    deadline = time.monotonic() + timeout_s
    while Path(log).read_text(errors="replace").count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} seen fewer than {count} times in {log}")
        poke()
        time.sleep(0.5)


def streamed_answers(url: str, mode: str, max_tokens: int, decoding: threading.Event) -> ThreadPoolExecutor:
    """``PROMPTS`` streamed at once; ``decoding`` is set once every stream has its first token. Returns the pool
    whose ``results`` attribute (a list of futures, in prompt order) gives each stream's token ids."""
    from openai import OpenAI

    from qroute.ops.http_client import token_ids_of

    started = threading.Barrier(len(PROMPTS), action=decoding.set)

    def one(prompt: list[int]) -> list[int]:
        client = OpenAI(base_url=url, api_key="test", max_retries=0, timeout=300.0)
        tokens: list[int] = []
        for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                               logprobs=1, stream=True, extra_body={
                                                   "return_tokens_as_token_ids": True,
                                                   "kv_transfer_params": {"qroute": {"mode": mode}}}):  # fmt: skip
            if chunk.choices and chunk.choices[0].logprobs is not None:
                new = token_ids_of(chunk.choices[0].logprobs.tokens)
                if new and not tokens:
                    started.wait(timeout=120.0)
                tokens += new
        return tokens

    pool = ThreadPoolExecutor(len(PROMPTS))
    pool.results = [pool.submit(one, prompt) for prompt in PROMPTS]  # type: ignore[attr-defined]
    return pool
