"""``qroute bench ab``: qroute against the stock path through the OpenAI endpoints, side by side in one run.

1. Decode speed with the whole corpus local: one stock instance with the corpus as a prompt prefix
   against one qroute instance holding the whole corpus (the prompt holds only the question). TPOT is
   the mean gap between streamed tokens; each side is measured alone, one after the other.
2. Peak RSS of each instance (every process of its process group, from /proc VmHWM).
3. A corpus larger than one instance's KV budget: the stock instance is given a KV budget smaller than
   corpus + question and must refuse; two qroute instances hold the corpus outside their paged caches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from qroute.errors import QRouteError
from qroute.ops.cluster import ClusterSpec, ClusterState, completion, http_json, start_cluster, stop_cluster
from qroute.ops.procstats import group_peak_rss_mib


def _stream_tpot(url: str, prompt: list[int], max_tokens: int, params: dict | None) -> tuple[float, float]:
    """(TTFT, mean inter-token gap) in seconds from a streamed greedy completion."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="qroute-bench")
    extra = {"kv_transfer_params": params, "min_tokens": max_tokens} if params else {"min_tokens": max_tokens}
    start = time.perf_counter()
    stamps = []
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                       stream=True, extra_body=extra)  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text is not None:
            stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return stamps[0] - start, statistics.mean(gaps) if gaps else float("nan")


def _measure(state: ClusterState, prompt: list[int], max_tokens: int, params: dict | None, repeats: int) -> dict:
    url = state.instances[0].url
    _stream_tpot(url, prompt, 4, params)  # warm-up
    runs = [_stream_tpot(url, prompt, max_tokens, params) for _ in range(repeats)]
    return {
        "ttft_ms": statistics.median(r[0] for r in runs) * 1e3,
        "tpot_ms": statistics.median(r[1] for r in runs) * 1e3,
        "peak_rss_mb": [group_peak_rss_mib(i.pid) for i in state.instances],
    }


def run_ab(model_dir: Path, corpus: Path, *, max_tokens: int, repeats: int, base_port: int, log=print) -> dict:
    from qroute.core.corpus import place_model_corpus
    from qroute.ops.demo_core import question_ids

    token_ids, _ = place_model_corpus(model_dir, corpus, name="corpus", instances=["i0"])
    corpus_ids = token_ids.tolist()
    prompt = question_ids(model_dir, "Which function opens a connection, and what does it return?")
    need = len(corpus_ids) + len(prompt) + max_tokens
    max_len = max(2048, 1 << need.bit_length())
    report: dict[str, Any] = {"corpus_tokens": len(corpus_ids), "question_tokens": len(prompt)}

    log("bench ab: stock instance, corpus as prompt prefix")
    state = start_cluster(ClusterSpec(model_dir=model_dir, corpus_dir=None, num_instances=1, base_port=base_port,
                                      max_model_len=max_len), log=log)  # fmt: skip
    try:
        report["stock_prefix"] = _measure(state, corpus_ids + prompt, max_tokens, None, repeats)
    finally:
        stop_cluster(state)

    log("bench ab: one qroute instance holding the whole corpus")
    state = start_cluster(ClusterSpec(model_dir=model_dir, corpus_dir=corpus, num_instances=1, base_port=base_port),
                          log=log)  # fmt: skip
    try:
        report["qroute_local"] = _measure(state, prompt, max_tokens, {"qroute": {"corpus": "corpus"}}, repeats)
    finally:
        stop_cluster(state)
    report["tpot_ratio_qroute_over_stock"] = report["qroute_local"]["tpot_ms"] / report["stock_prefix"]["tpot_ms"]

    # A paged-KV budget below corpus + question: the stock instance cannot serve the context at all; two
    # qroute instances can, since the corpus lives in their resident stores, not in the paged cache.
    budget_blocks = max(16, need // 16 // 2)
    log(f"bench ab: KV budget {budget_blocks * 16} tokens per instance against a {need}-token context")
    stock = ClusterSpec(model_dir=model_dir, corpus_dir=None, num_instances=1, base_port=base_port,
                        max_model_len=max_len, kv_blocks=budget_blocks)  # fmt: skip
    try:
        state = start_cluster(stock, log=log)
    except QRouteError as exc:  # vLLM refuses a max_model_len its KV budget cannot hold
        report["over_budget_stock"] = {"kv_budget_tokens": budget_blocks * 16, "served": False, "error": str(exc)}
    else:
        try:
            body = {"model": "tiny", "prompt": corpus_ids + prompt, "max_tokens": max_tokens}
            status, body = http_json(state.instances[0].url + "/completions", body)
            report["over_budget_stock"] = {"kv_budget_tokens": budget_blocks * 16, "served": status == 200,
                                           "status": status, "error": str(body)[:200]}  # fmt: skip
        finally:
            stop_cluster(state)
    sharded = ClusterSpec(model_dir=model_dir, corpus_dir=corpus, num_instances=2, base_port=base_port,
                          max_model_len=budget_blocks * 16 // 2, kv_blocks=budget_blocks)  # fmt: skip
    state = start_cluster(sharded, log=log)
    try:
        reply = completion(state.instances[0].url, prompt, max_tokens=max_tokens,
                           kv_transfer_params={"qroute": {"corpus": "corpus"}})  # fmt: skip
        report["over_budget_qroute"] = {
            "kv_budget_tokens": budget_blocks * 16, "instances": 2,
            "completion_tokens": reply["usage"]["completion_tokens"],
            "qroute": (reply.get("kv_transfer_params") or {}).get("qroute"),
            "peak_rss_mb": [group_peak_rss_mib(i.pid) for i in state.instances],
        }  # fmt: skip
    finally:
        stop_cluster(state)
    return report


def _run(args: argparse.Namespace) -> int:
    from qroute.ops.cluster_cli import model_dir_or_tiny
    from qroute.ops.demo_core import default_corpus

    report = run_ab(model_dir_or_tiny(args.model_dir), Path(args.corpus).resolve() if args.corpus else default_corpus(),
                    max_tokens=args.max_tokens, repeats=args.repeats, base_port=args.base_port,
                    log=(lambda *_: None) if args.json else print)  # fmt: skip
    if args.json:
        print(json.dumps(report))
        return 0
    s, q = report["stock_prefix"], report["qroute_local"]
    print(f"corpus {report['corpus_tokens']} tokens, question {report['question_tokens']} tokens")
    print(f"stock, corpus as prefix : TTFT {s['ttft_ms']:.1f} ms  TPOT {s['tpot_ms']:.2f} ms  "
          f"peak RSS {s['peak_rss_mb'][0]:.0f} MiB")  # fmt: skip
    print(f"qroute, corpus local    : TTFT {q['ttft_ms']:.1f} ms  TPOT {q['tpot_ms']:.2f} ms  "
          f"peak RSS {q['peak_rss_mb'][0]:.0f} MiB")  # fmt: skip
    print(f"TPOT qroute / stock     : {report['tpot_ratio_qroute_over_stock']:.3f}")
    o, r = report["over_budget_stock"], report["over_budget_qroute"]
    print(
        f"KV budget {o['kv_budget_tokens']} tokens per instance: stock served the context: {o['served']} "
        f"({o['error'][:120]})"
    )
    print(
        f"  2 qroute instances generated {r['completion_tokens']} tokens ({r['qroute']}), "
        f"peak RSS {[round(x) for x in r['peak_rss_mb']]} MiB"
    )
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from qroute.bench import bench_group

    parser = bench_group(sub).add_parser("ab", help="qroute vs the stock path through the OpenAI endpoints")
    parser.add_argument("--corpus", help="corpus directory (default: the stdlib sqlite3 package)")
    parser.add_argument("--model-dir")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=8600)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run)
