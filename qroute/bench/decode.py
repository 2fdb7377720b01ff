"""``qroute bench decode``: steady-state decode TPOT, qroute against stock vLLM, at 1, 4 and 8 requests at once.

Three set-ups over the same corpus and question (so the same context length), through the same streaming client:

- ``stock``: one plain vLLM instance, the corpus as a prompt prefix of every request;
- ``local``: one qroute instance holding the whole corpus (the prompt is the question alone);
- ``route``: the corpus sharded over two qroute instances, the requests on the first one in mode ``route``.

``N`` requests start together and stream ``MAX_TOKENS`` tokens each. Only the steady state counts: the gaps
between consecutive tokens that both arrive after the last request's first token and before the first request's
last token, so that every request is decoding (no prefill on either side) and ``N`` are in flight. TPOT is their
mean; each figure is the median over ``repeats`` rounds. Every set-up is up at once (idle instances cost next to
no CPU) and the rounds go round-robin over them, alternating the order, so that each ratio compares
measurements taken side by side, not minutes apart.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from qroute.ops.cluster import STATE_ENV, ClusterSpec, ClusterState, start_cluster, state_dir, stop_cluster

CONCURRENCY = (1, 4, 8)
MAX_TOKENS = 96
UNSTEADY_RETRIES = 3  # runs without a steady state tried again (and reported) before the bench gives up
TARGETS = {"local": 1.05, "route": 1.2}  # qroute TPOT / stock TPOT, at every concurrency
QUESTION = "Which function opens a connection, and what does it return?"
ON_CORPUS = {"qroute": {"corpus": "corpus"}}


def _stream_stamps(client, prompt: list[int], params: dict | None, max_tokens: int, start: threading.Barrier,
                   stamps: list[float], params_key: str) -> None:
    """Arrival times of a streamed greedy completion's tokens, appended to ``stamps``; sent once every request's
    thread is at ``start``. ``params`` go in the body under ``params_key`` (vLLM: ``kv_transfer_params``, SGLang:
    ``custom_params``)."""
    extra: dict[str, Any] = {"min_tokens": max_tokens, "ignore_eos": True}
    if params:
        extra[params_key] = params
    start.wait()
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                       stream=True, extra_body=extra)  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text is not None:
            stamps.append(time.perf_counter())


def steady_gaps(runs: list[list[float]]) -> list[float]:
    """Inter-token gaps while every request decodes: both ends after the last first token and before the first
    last token."""
    begin = max(stamps[0] for stamps in runs)
    end = min(stamps[-1] for stamps in runs)
    return [b - a for stamps in runs for a, b in zip(stamps, stamps[1:], strict=False) if a >= begin and b <= end]


def stream_together(url: str, prompts: list[list[int]], params: dict | None, max_tokens: int = MAX_TOKENS,
                    params_key: str = "kv_transfer_params") -> list[list[float]]:
    """One streamed completion per prompt, started together: each one's token arrival times."""
    from openai import OpenAI

    # Clients are made first and the requests released together: making a client takes tens of milliseconds of
    # CPU, which would otherwise stagger the requests' starts by more than a request lasts.
    clients = [OpenAI(base_url=url, api_key="qroute-bench") for _ in prompts]
    start = threading.Barrier(len(prompts))
    runs: list[list[float]] = [[] for _ in prompts]
    threads = [threading.Thread(target=_stream_stamps, args=(clients[k], prompt, params, max_tokens, start, runs[k],
                                                             params_key))
               for k, prompt in enumerate(prompts)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(len(stamps) < 2 for stamps in runs):
        raise RuntimeError(f"a request streamed {min(len(s) for s in runs)} tokens; expected {max_tokens}")
    return runs


def tpot_ms(url: str, prompts: list[list[int]], params: dict | None, unsteady: list[int],
            max_tokens: int = MAX_TOKENS, params_key: str = "kv_transfer_params") -> float:
    """Mean steady-state gap in ms of the prompts streamed together. A run in which the requests never all decoded
    at once (one started after another ended: on 2 busy cores a request's start can slip by half a second) is run
    again, and its concurrency appended to ``unsteady``."""
    for _ in range(1 + UNSTEADY_RETRIES):
        gaps = steady_gaps(stream_together(url, prompts, params, max_tokens, params_key))
        if len(gaps) >= len(prompts) * 4:
            return statistics.mean(gaps) * 1e3
        unsteady.append(len(prompts))
    raise RuntimeError(f"no steady state in {1 + UNSTEADY_RETRIES} runs at concurrency {len(prompts)}")


@contextlib.contextmanager
def scoped_env(name: str, value: str):
    """``os.environ[name] = value`` for the block, e.g. each set-up's own state directory (``STATE_ENV``), so that
    all can run at once; the instances started in it inherit it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def run_bench(model_dir: Path, corpus: Path, *, repeats: int = 3, base_port: int = 8650, transport: str = "tcp",
              log=print) -> dict[str, Any]:
    from qroute.core.corpus import place_model_corpus
    from qroute.ops.demo_core import question_ids

    token_ids, _ = place_model_corpus(model_dir, corpus, name="corpus", instances=["i0"])
    corpus_ids = token_ids.tolist()
    prompt = question_ids(model_dir, QUESTION)
    max_len = max(2048, 1 << (len(corpus_ids) + len(prompt) + MAX_TOKENS).bit_length())
    setups = {
        "stock": (ClusterSpec(model_dir=model_dir, corpus_dir=None, num_instances=1, base_port=base_port,
                              max_model_len=max_len), corpus_ids + prompt, None),
        "local": (ClusterSpec(model_dir=model_dir, corpus_dir=corpus, num_instances=1, base_port=base_port + 10,
                              transport=transport), prompt, ON_CORPUS),
        "route": (ClusterSpec(model_dir=model_dir, corpus_dir=corpus, num_instances=2, base_port=base_port + 20,
                              mode="route", transport=transport), prompt, ON_CORPUS),
    }  # fmt: skip
    samples: dict[str, dict[str, list[float]]] = {name: {str(c): [] for c in CONCURRENCY} for name in setups}
    unsteady: dict[str, list[int]] = {name: [] for name in setups}  # concurrencies of runs done again
    states: dict[str, ClusterState] = {}
    root = state_dir() / "bench-decode"
    try:
        for name, (spec, _, _) in setups.items():  # all up at once: measured side by side, round by round
            log(f"bench decode: starting {name} ({spec.num_instances} instance(s))")
            with scoped_env(STATE_ENV, str(root / name)):
                states[name] = start_cluster(spec, log=lambda *_: None)
        for name, (_, request_prompt, params) in setups.items():
            for c in CONCURRENCY:  # warm-up: the first batch of a new size runs slower
                stream_together(states[name].instances[0].url, [request_prompt] * c, params)
        for r in range(repeats):
            for c in CONCURRENCY:
                order = list(setups) if r % 2 == 0 else list(reversed(setups))  # no order bias
                for name in order:
                    _, request_prompt, params = setups[name]
                    url = states[name].instances[0].url
                    samples[name][str(c)].append(tpot_ms(url, [request_prompt] * c, params, unsteady[name]))
            log(f"bench decode: round {r + 1}/{repeats} done")
    finally:
        for name, state in states.items():
            with scoped_env(STATE_ENV, str(root / name)):
                stop_cluster(state)
    tpot = {name: {c: statistics.median(v) for c, v in per_c.items()} for name, per_c in samples.items()}
    ratio = {side: {c: tpot[side][c] / tpot["stock"][c] for c in tpot["stock"]} for side in TARGETS}
    return {
        "corpus_tokens": len(corpus_ids), "question_tokens": len(prompt), "max_tokens": MAX_TOKENS,
        "repeats": repeats, "transport": transport, "tpot_ms": tpot, "tpot_ratio": ratio, "targets": TARGETS,
        "samples_ms": samples, "unsteady_runs": unsteady,
    }  # fmt: skip


def _print(r: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    print(f"steady-state decode TPOT (ms), corpus {r['corpus_tokens']} tokens + question {r['question_tokens']}, "
          f"{r['max_tokens']} tokens per request, medians of {r['repeats']}, {r['transport']}", file=out)  # fmt: skip
    print(f"  {'at once':>7s} {'stock':>8s} {'local':>8s} {'route':>8s} {'local/stock':>12s} {'route/stock':>12s}",
          file=out)  # fmt: skip
    for c in r["tpot_ms"]["stock"]:
        t, q = r["tpot_ms"], r["tpot_ratio"]
        print(f"  {c:>7s} {t['stock'][c]:8.2f} {t['local'][c]:8.2f} {t['route'][c]:8.2f} {q['local'][c]:11.3f}x "
              f"{q['route'][c]:11.3f}x", file=out)  # fmt: skip
    print(f"  targets: local <= {r['targets']['local']}x, route <= {r['targets']['route']}x", file=out)
    redone = {name: runs for name, runs in r["unsteady_runs"].items() if runs}
    if redone:
        print(f"  runs done again for want of a steady state (concurrency per run): {redone}", file=out)


def _cmd(args: argparse.Namespace) -> int:
    from qroute.bench import emit
    from qroute.ops.cluster_cli import model_dir_or_tiny
    from qroute.ops.demo_core import default_corpus

    corpus = Path(args.corpus).resolve() if args.corpus else default_corpus()
    report = run_bench(model_dir_or_tiny(args.model_dir), corpus, repeats=args.repeats, base_port=args.base_port,
                       transport=args.transport, log=(lambda *_: None) if args.json else print)  # fmt: skip
    return emit(report, args.json, _print)


def add_cli(sub: argparse._SubParsersAction) -> None:
    from qroute.bench import cluster_bench_parser

    parser = cluster_bench_parser(sub, "decode", "steady-state decode TPOT, qroute against stock vLLM",
                                  base_port=8650, transport="tcp")
    parser.set_defaults(handler=_cmd)
