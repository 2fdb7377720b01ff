"""``qroute check``: qroute against one instance holding everything, through real ``vllm serve`` instances.

Reference: one stock instance (qroute installed, so the same CPU RoPE fix, but not configured),
prompt = corpus tokens + question tokens, float32, greedy. Then the corpus sharded over N qroute
instances in small chunks (``--blocks-per-chunk``), so that every instance owns several and every run
merges a local part with routed or fetched parts from each other instance; the question (its prompt holding
only the question) is asked on **every** instance in modes route, fetch and auto, and (3 instances or more)
``mixed``: routed to one peer and fetched from the others in the same steps (``owner_modes``), all at once (so
several requests share each engine step). Reported per instance and mode: whether the generated tokens are
identical, the largest |delta logprob| of the generated and of the question's prompt tokens, and the
owner-layer operations by kind against the exact expected numbers (layers x steps x owner groups). A
negative control asks the same question without the corpus, which must fail the comparison.

With ``--selector summary --topk K`` every request attends only to its top-K corpus blocks per layer. K at least
the corpus's blocks is the dense answer, so the stock instance stays the reference; for a smaller K the reference
is one qroute instance holding the whole corpus and selecting the same way (stock vLLM cannot select), and each
run's operations must be at most the dense count (it attended to fewer owners, never to more).
"""

from __future__ import annotations

import argparse
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qroute.core.config import COMPARED_MODES, Mode, group_mode
from qroute.errors import QRouteError
from qroute.ops.cluster import CLUSTER_TRANSPORTS, ClusterSpec, link_choices, start_cluster, stop_cluster
from qroute.ops.http_client import completion, http_json, token_ids_of
from qroute.ops.scrape import Samples, delta, scrape, total, wait_for

QUESTION = "Which function computes the area of a circle, and what does it return?"
TOLERANCE = 1e-4
BLOCKS_PER_CHUNK = 2  # 32-token chunks: a corpus of a few hundred tokens spreads over every instance
MIXED = "mixed"  # the run with owner_modes: one peer routed, the others fetched


def greedy_completion(url: str, prompt: list[int], max_tokens: int, params: dict | None = None) -> dict[str, Any]:
    """A greedy completion of token ids with the logprobs of its generated and prompt tokens and qroute's counts."""
    reply = completion(url, prompt, max_tokens=max_tokens, kv_transfer_params=params, logprobs=True,
                       extra={"return_tokens_as_token_ids": True, "prompt_logprobs": 1})  # fmt: skip
    choice = reply["choices"][0]
    logprobs = choice["logprobs"]
    tokens = token_ids_of(logprobs["tokens"])
    prompt_lps = [None if d is None else d[str(tok)]["logprob"]
                  for tok, d in zip(prompt, choice["prompt_logprobs"], strict=True)]  # fmt: skip
    return {"tokens": tokens, "logprobs": [float(x) for x in logprobs["token_logprobs"]],
            "prompt_logprobs": prompt_lps, "qroute": (reply.get("kv_transfer_params") or {}).get("qroute")}  # fmt: skip


def _compare(reference: dict[str, Any], got: dict[str, Any], num_question: int) -> dict[str, Any]:
    generated = [abs(a - b) for a, b in zip(reference["logprobs"], got["logprobs"], strict=True)]
    # The question's prompt positions 1..: position 0 has no logprob in a qroute request (nothing before it in
    # its own prompt), and in the reference it is the first token after the corpus.
    prompt = [abs(a - b) for a, b in zip(reference["prompt_logprobs"][-num_question + 1:], got["prompt_logprobs"][1:],
                                         strict=True)]  # fmt: skip
    return {"tokens_identical": got["tokens"] == reference["tokens"], "tokens": got["tokens"],
            "max_abs_dlogprob": max(generated), "max_abs_dlogprob_prompt": max(prompt)}  # fmt: skip


def reference_answers(
    model_dir: Path, corpus_ids: list[int], prompts: list[list[int]], max_tokens: int, *, base_port: int, log=print
) -> list[dict[str, Any]]:
    """Greedy answers of one stock instance (qroute not configured) to ``corpus_ids + prompt``, all at once."""
    longest = len(corpus_ids) + max(map(len, prompts)) + max_tokens + 1
    spec = ClusterSpec(model_dir=model_dir, corpus_dir=None, num_instances=1, base_port=base_port,
                       max_model_len=max(1 << math.ceil(math.log2(longest)), 2048))  # fmt: skip
    state = start_cluster(spec, log=log)
    try:
        url = state.instances[0].url
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(lambda prompt: greedy_completion(url, corpus_ids + prompt, max_tokens), prompts))
    finally:
        stop_cluster(state)


def expected_operations(directory, instance: str, num_layers: int, steps: int,
                        owner_modes: dict[str, str] | None = None) -> dict[str, int]:
    """Owner-layer operations of one dense request on ``instance`` over ``steps`` engine steps: one local
    operation per layer and step if it holds part of the corpus, one remote one per other owner group; with
    ``owner_modes`` (which must name an owner of every group), how many of those are routed and fetched."""
    held = any(instance in chunk.owners for chunk in directory.chunks)
    remote = {chunk.owners for chunk in directory.chunks if instance not in chunk.owners}
    per_step = num_layers * steps
    expected = {"local": per_step * int(held), "remote": per_step * len(remote)}
    if owner_modes:
        modes = [group_mode(owners, owner_modes, "") for owners in remote]
        expected.update(route=per_step * modes.count(Mode.ROUTE), fetch=per_step * modes.count(Mode.FETCH))
    return expected


def counts_ok(mode: str, counts: dict[str, int], expected: dict[str, int]) -> bool:
    """A dense request's counts are ``expected_operations``'s: its local parts exactly, its remote ones all routed
    (route), all fetched (fetch), as ``owner_modes`` split them (mixed) or either way (auto); and no error."""
    remote = {Mode.ROUTE: (expected["remote"], 0), Mode.FETCH: (0, expected["remote"])}.get(mode)
    if mode == MIXED:
        remote = (expected["route"], expected["fetch"])
    got_remote = (counts["route"], counts["fetch"])
    remote_ok = got_remote == remote if remote is not None else sum(got_remote) == expected["remote"]
    return remote_ok and counts["local"] == expected["local"] and "error" not in counts


def _selected_counts_ok(counts: dict[str, int], dense: dict[str, int], layer_steps: int) -> bool:
    """A selecting run attends to at most the owners a dense one does, and to some corpus every layer and step."""
    total = counts["route"] + counts["fetch"] + counts["local"]
    return "error" not in counts and layer_steps <= total <= dense["local"] + dense["remote"]


def selecting_reference(model_dir: Path, corpus_dir: Path, prompt: list[int], max_tokens: int, selection: dict,
                        *, base_port: int, blocks_per_chunk: int, log=print) -> list[dict[str, Any]]:
    """The answer of one qroute instance holding the whole corpus, selecting blocks as ``selection`` says."""
    spec = ClusterSpec(model_dir=model_dir, corpus_dir=corpus_dir, num_instances=1, base_port=base_port,
                       blocks_per_chunk=blocks_per_chunk, **selection)  # fmt: skip
    state = start_cluster(spec, log=log)
    try:
        return [greedy_completion(state.instances[0].url, prompt, max_tokens,
                                  {"qroute": {"corpus": "corpus", **selection}})]  # fmt: skip
    finally:
        stop_cluster(state)


_EXPORTED = ("route", "fetch", "local", "bytes_moved")


def flush_owner_stats(urls: dict[str, str]) -> None:
    """One engine step on each instance (a request without corpus work): an instance exports what it answered for
    its peers at its own steps, so that a scrape after this one includes every answer given before it."""
    for url in urls.values():
        completion(url, [1], max_tokens=1, kv_transfer_params={"qroute": {"corpus": None}})


def exported_counts(urls: dict[str, str], before: dict[str, Samples], runs: dict[str, dict]) -> dict[str, Any]:
    """What each instance's ``/metrics`` gained over the checked requests against the sum of those requests' own
    counts (equal when no request shared an operation with another), and the routes the owners say they answered
    against the routes the requesters ran (``before``: scraped before them, after ``flush_owner_stats``)."""
    flush_owner_stats(urls)

    def exported(samples: Samples) -> dict[str, float]:
        parts = {kind: total(samples, "vllm:qroute_corpus_parts_total", decision=kind) for kind in _EXPORTED[:3]}
        return {**parts, "bytes_moved": total(samples, "vllm:qroute_bytes_moved_total")}

    report: dict[str, Any] = {"instances": {}}
    routes_run = routes_answered = 0
    for instance, url in urls.items():
        mine = [run["qroute"] for key, run in runs.items() if key.startswith(f"{instance}/")]
        expected = {name: float(sum(counts.get(name, 0) for counts in mine)) for name in _EXPORTED}
        gained = wait_for(lambda url=url, i=instance: delta(scrape(url), before[i]),
                          lambda d, e=expected: exported(d) == e)  # fmt: skip
        report["instances"][instance] = {
            "exported": exported(gained), "responses": expected,
            "shared": sum(counts.get("shared", 0) for counts in mine),
            "route_round_trips": total(gained, "vllm:qroute_round_trip_seconds_count", kind="route"),
            "peers_up": {dict(labels)["peer"]: value for (name, labels), value in scrape(url).items()
                         if name == "vllm:qroute_peer_up"},
        }  # fmt: skip
        routes_run += expected["route"]
        routes_answered += total(gained, "vllm:qroute_owner_routes_total")
    report["routes_run"], report["routes_answered"] = routes_run, routes_answered
    report["match"] = routes_run == routes_answered and all(
        r["exported"] == r["responses"] for r in report["instances"].values())
    return report


def mixed_owner_modes(directory, instance: str) -> dict[str, str]:
    """Owner modes under which ``instance`` routes to one peer and fetches from the others (``owner_modes``)."""
    peers = sorted(set(directory.instances) - {instance})
    return {peer: str(Mode.ROUTE if k == 0 else Mode.FETCH) for k, peer in enumerate(peers)}


def run_check(
    model_dir: Path,
    corpus_dir: Path,
    *,
    num_instances: int = 3,
    blocks_per_chunk: int = BLOCKS_PER_CHUNK,
    max_tokens: int = 8,
    question: str = QUESTION,
    base_port: int = 8300,
    transport: str = "tcp",
    selector: str = "dense",
    topk: int = 0,
    log=print,
) -> dict[str, Any]:
    from qroute.core.corpus import place_model_corpus
    from qroute.core.geometry import load_config
    from qroute.ops.demo_core import question_ids

    ids = [f"i{k}" for k in range(num_instances)]
    token_ids, directory = place_model_corpus(model_dir, corpus_dir, name="corpus", instances=ids,
                                              blocks_per_chunk=blocks_per_chunk)  # fmt: skip
    corpus_ids = token_ids.tolist()
    prompt = question_ids(model_dir, question)
    num_layers = int(load_config(model_dir)["num_hidden_layers"])

    selecting = selector != "dense" and topk < directory.num_blocks
    selection = {"selector": selector, "topk": topk} if selector != "dense" else {}
    log(f"qroute check: corpus {len(corpus_ids)} tokens, question {len(prompt)} tokens; reference instance")
    if selecting:  # one qroute instance holding the whole corpus, selecting the same blocks
        [reference] = selecting_reference(model_dir, corpus_dir, prompt, max_tokens, selection, base_port=base_port,
                                          blocks_per_chunk=blocks_per_chunk, log=log)  # fmt: skip
    else:
        [reference] = reference_answers(model_dir, corpus_ids, [prompt], max_tokens, base_port=base_port, log=log)

    log(f"qroute check: {num_instances} qroute instances, {len(directory.chunks)} chunks of "
        f"{directory.chunk_tokens} tokens")  # fmt: skip
    spec = ClusterSpec(model_dir=model_dir, corpus_dir=corpus_dir, num_instances=num_instances, base_port=base_port,
                       transport=transport, blocks_per_chunk=blocks_per_chunk, selector=selector,
                       topk=topk)  # fmt: skip
    state = start_cluster(spec, log=log)
    report: dict[str, Any] = {
        "corpus_tokens": len(corpus_ids), "question_tokens": len(prompt), "instances": num_instances,
        "transport": transport, "chunks": len(directory.chunks), "selection": selection or "dense",
        "reference_kind": "one qroute instance, same selection" if selecting else "stock instance",
        "chunks_per_instance": {i: len(directory.chunks_of(i)) for i in ids},
        "reference": reference, "runs": {},
    }  # fmt: skip
    try:
        urls = {info.instance_id: info.url for info in state.instances}
        jobs = {(i, str(mode)): (urls[i], {"qroute": {"corpus": "corpus", "mode": str(mode), **selection}})
                for i in ids for mode in COMPARED_MODES}  # fmt: skip
        if num_instances >= 3:  # routed to one peer and fetched from another in the same steps
            for i in ids:
                jobs[(i, MIXED)] = (urls[i], {"qroute": {"corpus": "corpus", "mode": str(Mode.AUTO), **selection,
                                                         "owner_modes": mixed_owner_modes(directory, i)}})
        jobs[(ids[0], "no corpus")] = (urls[ids[0]], {"qroute": {"corpus": None}})
        flush_owner_stats(urls)  # the routes owners answered for the corpus prefill, exported before `before`
        before = {i: scrape(url) for i, url in urls.items()}
        with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: several requests in each engine step
            futures = {key: pool.submit(greedy_completion, url, prompt, max_tokens, params)
                       for key, (url, params) in jobs.items()}  # fmt: skip
            results = {key: future.result() for key, future in futures.items()}
        for (instance, mode), got in results.items():
            run = _compare(reference, got, len(prompt))
            if mode == "no corpus":
                report["negative_control"] = run
                continue
            owner_modes = mixed_owner_modes(directory, instance) if mode == MIXED else None
            expected = expected_operations(directory, instance, num_layers, max_tokens, owner_modes)
            counts = got["qroute"] or {}
            if selecting:
                ok = _selected_counts_ok(counts, expected, num_layers * max_tokens)
            else:
                ok = counts_ok(mode, counts, expected)
            run.update(qroute=counts, expected_operations=expected, counts_ok=ok)
            report["runs"][f"{instance}/{mode}"] = run
        report["metrics"] = exported_counts(urls, before, report["runs"])
        status, body = http_json(urls[ids[0]] + "/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": 1,
            "kv_transfer_params": {"qroute": {"corpus": "no-such-corpus"}},
        })  # fmt: skip
        report["unknown_corpus"] = {"status": status, "message": str(body)[:300]}
        report["links"] = {info.instance_id: link_choices(info.log) for info in state.instances}
    finally:
        stop_cluster(state)
    negative = report["negative_control"]
    report["negative_control_fails"] = not negative["tokens_identical"] or negative["max_abs_dlogprob"] > TOLERANCE
    report["passed"] = report["negative_control_fails"] and all(
        r["tokens_identical"] and r["max_abs_dlogprob"] <= TOLERANCE and r["max_abs_dlogprob_prompt"] <= TOLERANCE
        and r["counts_ok"] for r in report["runs"].values()
    ) and report["metrics"]["match"]
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"reference tokens: {report['reference']['tokens']}")
    print(f"chunks per instance: {report['chunks_per_instance']}")
    for instance, peers in report.get("links", {}).items():
        print(f"{instance} reaches " + ", ".join(f"{peer} over {link['transport']} (probed "
              + ", ".join(f"{name} {us:.0f} us" for name, us in link["round_trips_us"].items()) + ")"
              for peer, link in peers.items()))  # fmt: skip
    print(f"{'instance/mode':14s} {'identical':>9s} {'max|dlp| gen':>13s} {'prompt':>9s}  route/fetch/local "
          "(expected local, remote)")  # fmt: skip
    for key, r in report["runs"].items():
        q, e = r["qroute"], r["expected_operations"]
        print(f"{key:14s} {str(r['tokens_identical']):>9s} {r['max_abs_dlogprob']:>13.2e} "
              f"{r['max_abs_dlogprob_prompt']:>9.2e}  {q.get('route')}/{q.get('fetch')}/{q.get('local')} "
              f"({e['local']}, {e['remote']}){'' if r['counts_ok'] else '  COUNTS WRONG'}")  # fmt: skip
    n = report["negative_control"]
    verdict = "fails as it must" if report["negative_control_fails"] else "DID NOT FAIL"
    print(f"negative control (no corpus): identical {n['tokens_identical']}, max|dlogprob| "
          f"{n['max_abs_dlogprob']:.2e} -> {verdict}")
    m = report["metrics"]
    print(f"/metrics: routes run {m['routes_run']:.0f}, answered {m['routes_answered']:.0f}; per-instance counts "
          + ("match the responses" if m["match"] else f"DO NOT MATCH {m['instances']}"))
    print(f"unknown corpus -> HTTP {report['unknown_corpus']['status']}")
    print("PASS" if report["passed"] else f"FAIL (tolerance {TOLERANCE})")


def _run(args: argparse.Namespace) -> int:
    from qroute.ops.cluster_cli import model_dir_or_tiny

    report = run_check(model_dir_or_tiny(args.model_dir), Path(args.corpus).resolve(),
                       num_instances=args.instances, blocks_per_chunk=args.blocks_per_chunk,
                       max_tokens=args.max_tokens, transport=args.transport, selector=args.selector,
                       topk=args.topk, log=(lambda *_: None) if args.json else print)  # fmt: skip
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
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--blocks-per-chunk", type=int, default=BLOCKS_PER_CHUNK,
                        help="corpus blocks (16 tokens) per chunk; small chunks spread a small corpus")
    parser.add_argument("--model-dir")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--transport", choices=CLUSTER_TRANSPORTS, default="tcp",
                        help="nixl+tcp: both at once, each peer over the faster link it has")
    parser.add_argument("--selector", choices=["dense", "summary"], default="dense",
                        help="block selection of every request (summary: the top-k blocks by key bounds)")
    parser.add_argument("--topk", type=int, default=0, help="blocks per layer for --selector summary")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run)
