"""``qroute check``: qroute against one instance holding everything, through real ``vllm serve`` instances.

Reference: one stock instance (qroute installed, so the same CPU RoPE fix, but not configured),
prompt = corpus tokens + question tokens, float32, greedy. Then the corpus sharded over N qroute
instances, the prompt holding only the question, in modes route, fetch and auto. Reported per mode:
whether the generated tokens are identical and the largest |delta logprob| of the chosen tokens.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from qroute.core.config import COMPARED_MODES
from qroute.errors import QRouteError
from qroute.ops.cluster import ClusterSpec, completion, http_json, start_cluster, stop_cluster

QUESTION = "Which function computes the area of a circle, and what does it return?"
TOLERANCE = 1e-4


def _tokens_and_logprobs(reply: dict[str, Any]) -> tuple[list[int], list[float]]:
    logprobs = reply["choices"][0]["logprobs"]
    # return_tokens_as_token_ids makes each token "token_id:<id>"
    tokens = [int(t.rsplit(":", 1)[1]) for t in logprobs["tokens"]]
    return tokens, [float(x) for x in logprobs["token_logprobs"]]


def _generate(url: str, prompt: list[int], max_tokens: int, params: dict | None = None) -> dict[str, Any]:
    reply = completion(url, prompt, max_tokens=max_tokens, kv_transfer_params=params, logprobs=True,
                       extra={"return_tokens_as_token_ids": True})  # fmt: skip
    tokens, logprobs = _tokens_and_logprobs(reply)
    return {"tokens": tokens, "logprobs": logprobs, "kv_transfer_params": reply.get("kv_transfer_params")}


def run_check(
    model_dir: Path,
    corpus_dir: Path,
    *,
    num_instances: int = 2,
    max_tokens: int = 8,
    question: str = QUESTION,
    base_port: int = 8300,
    transport: str = "tcp",
    log=print,
) -> dict[str, Any]:
    from qroute.core.corpus import place_model_corpus
    from qroute.ops.demo_core import question_ids

    ids = [f"i{k}" for k in range(num_instances)]
    token_ids, directory = place_model_corpus(model_dir, corpus_dir, name="corpus", instances=ids)
    corpus_ids = token_ids.tolist()
    prompt = question_ids(model_dir, question)
    max_model_len = 1 << math.ceil(math.log2(len(corpus_ids) + len(prompt) + max_tokens + 1))

    log(f"qroute check: corpus {len(corpus_ids)} tokens, question {len(prompt)} tokens; reference instance")
    reference_spec = ClusterSpec(model_dir=model_dir, corpus_dir=None, num_instances=1, base_port=base_port,
                                 max_model_len=max(max_model_len, 2048))  # fmt: skip
    state = start_cluster(reference_spec, log=log)
    try:
        reference = _generate(state.instances[0].url, corpus_ids + prompt, max_tokens)
    finally:
        stop_cluster(state)

    log(f"qroute check: {num_instances} qroute instances")
    spec = ClusterSpec(model_dir=model_dir, corpus_dir=corpus_dir, num_instances=num_instances,
                       base_port=base_port, transport=transport)  # fmt: skip
    state = start_cluster(spec, log=log)
    report: dict[str, Any] = {"corpus_tokens": len(corpus_ids), "question_tokens": len(prompt),
                              "instances": num_instances, "reference": reference, "modes": {}}  # fmt: skip
    try:
        url = state.instances[0].url
        for mode in COMPARED_MODES:
            result = _generate(url, prompt, max_tokens, {"qroute": {"corpus": "corpus", "mode": mode}})
            deltas = [abs(a - b) for a, b in zip(result["logprobs"], reference["logprobs"], strict=False)]
            report["modes"][mode] = {
                "tokens_identical": result["tokens"] == reference["tokens"],
                "max_abs_dlogprob": max(deltas) if deltas else float("nan"),
                "tokens": result["tokens"],
                "qroute": (result["kv_transfer_params"] or {}).get("qroute"),
            }
        status, body = http_json(url + "/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": 1,
            "kv_transfer_params": {"qroute": {"corpus": "no-such-corpus"}},
        })  # fmt: skip
        report["unknown_corpus"] = {"status": status, "message": str(body)[:300]}
    finally:
        stop_cluster(state)
    report["passed"] = all(
        m["tokens_identical"] and m["max_abs_dlogprob"] <= TOLERANCE for m in report["modes"].values()
    )
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"reference tokens: {report['reference']['tokens']}")
    print(f"{'mode':6s} {'identical':>9s} {'max|dlogprob|':>14s}  route/fetch/local")
    for mode, m in report["modes"].items():
        q = m["qroute"] or {}
        print(f"{mode:6s} {str(m['tokens_identical']):>9s} {m['max_abs_dlogprob']:>14.2e}  "
              f"{q.get('route')}/{q.get('fetch')}/{q.get('local')}")  # fmt: skip
    print(f"unknown corpus -> HTTP {report['unknown_corpus']['status']}")
    print("PASS" if report["passed"] else f"FAIL (tolerance {TOLERANCE})")


def _run(args: argparse.Namespace) -> int:
    from qroute.ops.cluster_cli import model_dir_or_tiny

    report = run_check(model_dir_or_tiny(args.model_dir), Path(args.corpus).resolve(),
                       num_instances=args.instances, max_tokens=args.max_tokens, transport=args.transport,
                       log=(lambda *_: None) if args.json else print)  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    if not report["passed"]:
        raise QRouteError("routed attention does not reproduce the single-instance reference")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("check", help="exactness of route / fetch / auto against a single instance")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--model-dir")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--transport", choices=["tcp", "nixl"], default="tcp")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run)
