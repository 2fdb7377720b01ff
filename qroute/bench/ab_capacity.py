"""Concurrent sessions at the same total KV budget, measured (``qroute bench ab --capacity``).

Every set-up gets the same KV budget per instance, ``b`` blocks of 16 tokens: the corpus's blocks plus
``extra_blocks`` (the regime where the corpus nearly fills one instance, as when it outgrows one device):

- ``stock-prefix-cached-replicas``: ``N`` stock instances (prefix caching, the CPU override lifted), ``b`` blocks
  each; every replica holds the whole corpus in its own prefix cache and serves its share of the sessions.
- ``qroute-auto-xN``: ``N`` qroute instances, ``b`` blocks each *in all*: its corpus store's rows (the largest
  store of the placement, in blocks) plus its paged KV cache (the rest, ``--num-gpu-blocks-override``).
- ``stock-prefix-cached-one``: one stock instance with all ``N * b`` blocks, what one device holding the whole
  budget would do (the corpus is held once there too).

Each is offered 4, 6, 9, ... sessions at once (x1.5 up to ``sessions``; ``max_tokens`` each, the instances'
request cap above that) until an offer makes vLLM preempt: a set-up's figure is the most requests its engines ran at
once (``vllm:num_requests_running`` summed over its instances, sampled every 20 ms, and at least the sessions the
clients saw decoding together) in an offer without a preemption, a lower bound where no offer preempted ("not
saturated"). vLLM admits a request on its prompt's blocks and preempts when decodes outgrow the cache, so a peak
reached with preemptions is not a concurrency the set-up sustains. The KV budget each instance really had is read
back from its ``vllm:cache_config_info``; every session's tokens must be the same for its question across set-ups
and offers.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from pathlib import Path
from typing import Any

from qroute.bench.ab_configs import Running, moved_between, start_prefix_cached, start_qroute
from qroute.bench.ab_workload import SessionResult, Workload, drive, latency_summary, warm_up
from qroute.ops.scrape import scrape

__all__ = ["most_decoding_at_once", "offer_levels", "run_capacity"]

BLOCK = 16  # vLLM's CPU MLA block size (forced by its platform), and qroute's corpus block size


def most_decoding_at_once(results: list[SessionResult]) -> int:
    """The most sessions whose decodes overlapped (each from its first token to its last, as the client saw them)."""
    events = sorted(e for r in results if r.error is None and r.tokens
                    for e in ((r.first_token_s, 1), (r.ended_s, -1)))  # an end before a start at the same instant
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


_RUNNING = re.compile(rb"^vllm:num_requests_running\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)


class RunningPeak:
    """The largest sum over ``urls`` of vLLM's ``vllm:num_requests_running`` (the engine's own count, set at every
    step) seen while the block runs; sampled every 20 ms with a regular expression, not a full parse, so that short
    offers are seen too."""

    def __init__(self, urls: list[str], period_s: float = 0.02):
        self.urls, self.period_s, self.peak = urls, period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.period_s):
            running = 0.0
            for url in self.urls:
                with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10.0) as reply:
                    running += sum(float(v) for v in _RUNNING.findall(reply.read()))
            self.peak = max(self.peak, int(running))

    def __enter__(self) -> RunningPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _kv_blocks(url: str) -> int:
    """The paged KV blocks the instance really has (``vllm:cache_config_info``'s ``num_gpu_blocks`` label)."""
    info = scrape(url, prefix="vllm:cache_config_info")
    return int(next(dict(labels)["num_gpu_blocks"] for (_, labels) in info))


def _offer(running: Running, workload: Workload, request_for, tokens: dict[int, set]) -> dict[str, Any]:
    """One offer of ``workload``'s sessions at once; each session's tokens go into ``tokens[question]``."""
    before = running.counters()
    with RunningPeak([i.url for i in running.instances]) as engine:
        results = drive(running.endpoints, workload, request_for)
    summary, moved = latency_summary(results), moved_between(before, running.counters())
    for r in results:
        if r.error is None:
            tokens.setdefault(r.question, set()).add(tuple(r.tokens))
    decoding = most_decoding_at_once(results)
    # the engine runs every session the client sees decoding: its peak is at least their overlap, which a sample
    # 20 ms apart can miss when sessions last less than a scrape (seen: 0 sampled with 6 short sessions)
    return {"running_at_once": max(engine.peak, decoding), "decoding_at_once": decoding,
            "preemptions": int(moved["preemptions"]),
            "ttft_ms_p50": summary["ttft_ms"]["p50"], "tpot_ms_p50": summary["tpot_ms"]["p50"],
            "throughput_tok_s": summary["throughput_tok_s"], "moved": moved,
            "errors": summary["errors"]}  # fmt: skip


def _sweep(running: Running, questions: tuple[str, ...], max_tokens: int, levels: list[int],
           request_for) -> dict[str, Any]:  # fmt: skip
    """Offer each level's sessions in turn until one preempts (or fails); the set-up's capacity is the most sessions
    it ran at once in an offer without a preemption."""
    urls = [i.url for i in running.instances]
    warm_up(running.endpoints, questions, request_for)
    by_level: dict[str, dict[str, Any]] = {}
    tokens: dict[int, set] = {}
    for level in levels:
        row = by_level[str(level)] = _offer(running, Workload(questions, level, max_tokens), request_for, tokens)
        if row["preemptions"] or row["errors"]:
            break
    clean = [r["running_at_once"] for r in by_level.values() if not r["preemptions"] and not r["errors"]]
    return {"instances": len(urls), "kv_blocks_each": [_kv_blocks(u) for u in urls],
            "sessions_without_preemption": max(clean, default=0), "saturated": bool(row["preemptions"]),
            "levels": by_level, "tokens": tokens}  # fmt: skip


def offer_levels(sessions: int) -> list[int]:
    """4, 6, 9, ... (x1.5) up to ``sessions``, which is the last."""
    levels, n = [], 4
    while n < sessions:
        levels.append(n)
        n = max(n + 1, round(n * 1.5))
    return [*levels, sessions]


def run_capacity(model_dir: Path, corpus: Path, questions: tuple[str, ...], *, instances: int = 3,
                 extra_blocks: int = 32, sessions: int = 96, max_tokens: int = 96, base_port: int = 8600,
                 transport: str = "nixl", blocks_per_chunk: int = 4, log=print) -> dict[str, Any]:  # fmt: skip
    """The three set-ups in turn (module docstring); ``blocks_per_chunk`` small so that rendezvous placement evens
    the stores out (each qroute instance's KV cache is sized by the largest one)."""
    from qroute.core.corpus import place_model_corpus
    from qroute.dataplane.shard import shard_layout
    from qroute.ops.demo_core import question_ids

    ids = [f"i{k}" for k in range(instances)]
    token_ids, directory = place_model_corpus(model_dir, corpus, name="corpus", instances=ids,
                                              blocks_per_chunk=blocks_per_chunk)  # fmt: skip
    corpus_ids, q_ids = token_ids.tolist(), [question_ids(model_dir, q) for q in questions]
    budget = directory.num_blocks + extra_blocks
    store = {i: -(-sum(n for _, n in shard_layout(directory, i).values()) // BLOCK) for i in ids}
    levels = offer_levels(sessions)
    caps = ("--max-num-seqs", str(sessions))
    # one max_model_len for both stock set-ups: the power of two above a prompt and its tokens, cut to what a replica's
    # budget holds (vLLM refuses a max_model_len whose one request does not fit the KV cache)
    max_len = min((budget - 1) * BLOCK, 1 << (len(corpus_ids) + max(map(len, q_ids)) + max_tokens).bit_length())
    stock = lambda q: (corpus_ids + q_ids[q], {})  # noqa: E731
    setups: dict[str, dict[str, Any]] = {}
    for name, replicas, blocks in (("stock-prefix-cached-replicas", instances, budget),
                                   ("stock-prefix-cached-one", 1, instances * budget)):  # fmt: skip
        log(f"bench ab capacity: {name}")
        running = start_prefix_cached(model_dir, base_port, max_len, replicas=replicas,
                                      engine_args=("--num-gpu-blocks-override", str(blocks), *caps))  # fmt: skip
        try:
            setups[name] = _sweep(running, questions, max_tokens, levels, stock)
        finally:
            running.stop()
    name = f"qroute-auto-x{instances}"
    log(f"bench ab capacity: {name}")
    kv_blocks = budget - max(store.values())
    running = start_qroute(model_dir, corpus, base_port + 10, instances, transport, blocks_per_chunk,
                           kv_blocks=kv_blocks, max_num_seqs=sessions,
                           max_model_len=min(2048, (kv_blocks - 1) * BLOCK))  # vLLM: one request must fit  # fmt: skip
    try:
        setups[name] = _sweep(running, questions, max_tokens, levels, lambda q: (q_ids[q], {
            "kv_transfer_params": {"qroute": {"corpus": "corpus", "mode": "auto"}}}))
    finally:
        running.stop()
    problems = [f"{n} at {level} sessions: {len(r['errors'])} failed, e.g. {r['errors'][0]}"
                for n, s in setups.items() for level, r in s["levels"].items() if r["errors"]]  # fmt: skip
    answers: dict[int, set] = {}
    for s in setups.values():
        for question, seen in s.pop("tokens").items():
            answers.setdefault(question, set()).update(seen)
    problems += [f"question {q}: {len(seen)} different answers across set-ups and offers"
                 for q, seen in answers.items() if len(seen) > 1]  # fmt: skip

    def ratio(over: str) -> float | None:
        base = setups[over]["sessions_without_preemption"]
        return round(setups[name]["sessions_without_preemption"] / base, 2) if base else None

    return {
        "budget_blocks_per_instance": budget, "corpus_blocks": directory.num_blocks, "store_blocks": store,
        "sessions_offered": sessions, "max_tokens": max_tokens, "setups": setups, "problems": problems,
        "ok": not problems,
        "qroute_over_replicas": ratio("stock-prefix-cached-replicas"),
        "qroute_over_one": ratio("stock-prefix-cached-one"),
        "target_at_least": 3.0,
    }  # fmt: skip
