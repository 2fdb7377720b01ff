"""The main demo: two ``vllm serve`` instances share a corpus; questions go through the official
``openai`` client, once per mode, and a summary shows what each mode moved and how fast it decoded."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qroute.core.config import COMPARED_MODES
from qroute.ops.cluster import ClusterSpec, start_cluster, stop_cluster

QUESTIONS = [
    "Where does the module define the connect function?",
    "Which file implements the dump of a database?",
    "What does the adapter for dates return?",
]


def _ask(client, question: str, mode: str, max_tokens: int):
    params = {"kv_transfer_params": {"qroute": {"corpus": "corpus", "mode": mode}}}
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0.0,
        extra_body=params,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    first = time.perf_counter()
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], max_tokens=1, temperature=0.0,
        extra_body=params,
    )  # fmt: skip
    ttft = time.perf_counter() - first
    counts = ((reply.model_extra or {}).get("kv_transfer_params") or {}).get("qroute") or {}
    tokens = reply.usage.completion_tokens if reply.usage else max_tokens
    tpot = (elapsed - ttft) / max(1, tokens - 1)
    return reply.choices[0].message.content, counts, tpot


def run_vllm_demo(*, corpus: Path, transport: str, max_tokens: int, base_port: int = 8200, out=sys.stdout) -> int:
    from openai import OpenAI

    from qroute.reference.tinymodel import build_tiny_model

    model_dir = build_tiny_model(dtype="float32")
    print(f"model: {model_dir}\ncorpus: {corpus}", file=out)
    spec = ClusterSpec(model_dir=model_dir, corpus_dir=corpus, num_instances=2, transport=transport,
                       base_port=base_port)  # fmt: skip
    state = start_cluster(spec, log=lambda msg: print(msg, file=out))
    try:
        print(f"corpus: {state.corpus_tokens} tokens; " + ", ".join(
            f"{i.instance_id} at {i.url} owns {i.chunks} chunks" for i in state.instances), file=out)  # fmt: skip
        client = OpenAI(base_url=state.instances[0].url, api_key="qroute-demo")
        summary = {}
        for mode in COMPARED_MODES:
            totals = {"route": 0, "fetch": 0, "local": 0, "bytes_moved": 0}
            tpots = []
            for question in QUESTIONS:
                answer, counts, tpot = _ask(client, question, mode, max_tokens)
                tpots.append(tpot)
                for key in totals:
                    totals[key] += int(counts.get(key, 0))
                if mode == COMPARED_MODES[0]:
                    print(f"\nQ: {question}\nA: {answer!r}", file=out)
            summary[mode] = (totals, sum(tpots) / len(tpots))
    finally:
        stop_cluster(state)
    print(f"\n{'mode':6s} {'route':>7s} {'fetch':>7s} {'local':>7s} {'bytes moved':>12s} {'TPOT ms':>8s}", file=out)
    for mode, (t, tpot) in summary.items():
        print(f"{mode:6s} {t['route']:>7d} {t['fetch']:>7d} {t['local']:>7d} {t['bytes_moved']:>12d} "
              f"{tpot * 1e3:>8.1f}", file=out)  # fmt: skip
    print("(counts: owner-layer operations over all questions; TPOT from a full and a one-token call)", file=out)
    return 0
