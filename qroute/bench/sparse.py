"""``qroute bench sparse``: what moving the query saves under sparse selection, and how well ``auto`` decides.

One cluster of 3 qroute instances over one corpus, every instance keeping block summaries; ``AGENTS`` requests
with different questions about the corpus go to ``i0`` together, each selecting its top-k blocks per layer
(``selector: summary``), at top-k of 1, 4, 16 and 64 blocks, in ``route``, ``fetch`` and ``auto`` (one request
parameter each: the same instances serve every combination, so the figures are taken side by side).

- ``bytes_per_token``: bytes moved over the fabric per decoded token, from the requests' own counts: a run of
  ``MAX_TOKENS`` tokens minus a run of one token (its prefill step), over the decoded tokens;
- ``tpot_ms``: the steady-state inter-token gap of the requests streamed together (``decode.steady_gaps``),
  median over ``repeats`` rounds (round-robin over the combinations);
- ``mispredicted_fraction``: each peer's blocks can be routed or fetched, so with 2 peers there are 4 ways to
  decide a step (``owner_modes``, ``tpot_ms_by_assignment``); the one whose TPOT measured lowest is, per top-k,
  what each owner's decision should have been. ``i0`` keeps a decision log (``QROUTE_DECISION_LOG``: each remote
  part of each layer with its planned decision); an auto decision is mispredicted where it differs from the best
  assignment's for that owner. (Timing each part alone does not judge it: a route's cost to the step depends on
  what is computed while it flies, which differs from one mode to the other.)

Targets (the sparse-selection issue): at every top-k auto's TPOT within 10 % of the better of route and fetch;
auto's bytes per token at most 0.1x fetch's at top-k 64.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qroute.bench.decode import scoped_env, tpot_ms
from qroute.dataplane.decisionlog import DECISION_LOG_ENV, read_decision_log
from qroute.ops.cluster import STATE_ENV, ClusterSpec, start_cluster, state_dir, stop_cluster
from qroute.ops.http_client import completion

TOPK = (1, 4, 16, 64)
MODES = ("route", "fetch", "auto")
MAX_TOKENS = 48
QUESTIONS = (
    "Which function opens a connection, and what does it return?",
    "How are rows turned into Python objects?",
    "What does the module register as adapters and converters?",
    "Where is the command line shell implemented?",
)
AGENTS = len(QUESTIONS)
TARGETS = {"auto_over_best_tpot": 1.10, "auto_over_fetch_bytes_at_64": 0.1}


def _params(topk: int, mode: str, owner_modes: dict[str, str] | None = None) -> dict:
    params = {"corpus": "corpus", "selector": "summary", "topk": topk, "mode": mode}
    if owner_modes:
        params["owner_modes"] = owner_modes
    return {"qroute": params}


def _bytes_moved(url: str, prompts: list[list[int]], params: dict, max_tokens: int) -> tuple[int, int]:
    """Bytes the requests moved together and the tokens they generated (non-streamed: the counts come back)."""

    def one(prompt: list[int]) -> tuple[int, int]:
        reply = completion(url, prompt, max_tokens=max_tokens, kv_transfer_params=params,
                           extra={"min_tokens": max_tokens, "ignore_eos": True})  # fmt: skip
        counts = (reply.get("kv_transfer_params") or {}).get("qroute") or {}
        if "bytes_moved" not in counts:
            raise RuntimeError(f"{url} returned no qroute counts: {reply.get('kv_transfer_params')}")
        return int(counts["bytes_moved"]), int(reply["usage"]["completion_tokens"])

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, prompts))
    return sum(b for b, _ in results), sum(t for _, t in results)


def bytes_per_token(url: str, prompts: list[list[int]], params: dict) -> float:
    """Bytes moved per decoded token: a long run less its prefill step (a one-token run), over the decoded tokens."""
    long_bytes, long_tokens = _bytes_moved(url, prompts, params, MAX_TOKENS)
    short_bytes, short_tokens = _bytes_moved(url, prompts, params, 1)
    return (long_bytes - short_bytes) / (long_tokens - short_tokens)


def assignments(peers: list[str]) -> dict[str, dict[str, str]]:
    """Every way to decide the peers' blocks, route or fetch per peer: name ("i1=route,i2=fetch") -> owner modes."""
    return {",".join(f"{p}={m}" for p, m in zip(peers, modes, strict=True)): dict(zip(peers, modes, strict=True))
            for modes in itertools.product(("route", "fetch"), repeat=len(peers))}  # fmt: skip


def mispredictions(records: Iterable[dict[str, Any]], best: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Auto's owner-layer decisions (decision log ``records``) against ``best``: per top-k, the route/fetch
    assignment of the peers whose TPOT measured lowest. A decision is mispredicted where it differs from what the
    best assignment does with that owner."""
    judged: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # topk -> [mispredicted, judged]
    decided: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for r in records:
        if r["mode"] != "auto" or r["fell_back"] or r["selector"] != "summary":
            continue
        k = str(r["topk"])
        decided[k][r["owner"]][r["decision"]] += 1
        if k in best and r["owner"] in best[k]:
            judged[k][1] += 1
            judged[k][0] += r["decision"] != best[k][r["owner"]]
    wrong, total = sum(v[0] for v in judged.values()), sum(v[1] for v in judged.values())
    return {
        "mispredicted_fraction": wrong / total if total else None,
        "mispredicted_by_topk": {k: v[0] / v[1] for k, v in judged.items()},
        "decisions_judged": total,
        "auto_decisions": {k: {o: dict(d) for o, d in owners.items()} for k, owners in decided.items()},
    }


def run_bench(model_dir: Path, corpus: Path, *, repeats: int = 3, base_port: int = 8850, transport: str = "nixl",
              topks: tuple[int, ...] = TOPK, log=print) -> dict[str, Any]:
    from qroute.core.corpus import place_model_corpus
    from qroute.ops.demo_core import question_ids

    token_ids, _ = place_model_corpus(model_dir, corpus, name="corpus", instances=["i0"])
    prompts = [question_ids(model_dir, q) for q in QUESTIONS]
    spec = ClusterSpec(model_dir=model_dir, corpus_dir=corpus, num_instances=3, base_port=base_port,
                       transport=transport, selector="summary", topk=max(topks))  # fmt: skip
    ways = assignments(spec.instance_ids()[1:])  # the requester is i0; its peers' blocks, each routed or fetched
    root = state_dir() / "bench-sparse"
    log_dir = root / "decisions"
    for old in log_dir.glob("*.jsonl"):
        old.unlink()  # the log appends: a previous run's decisions would be counted with this one's
    params = {**{(k, m): _params(k, m) for k in topks for m in MODES},
              **{(k, name): _params(k, "auto", modes) for k in topks for name, modes in ways.items()}}
    samples: dict[tuple[int, str], list[float]] = {key: [] for key in params}
    moved: dict[tuple[int, str], float] = {}
    unsteady: list[int] = []
    with scoped_env(STATE_ENV, str(root)), scoped_env(DECISION_LOG_ENV, str(log_dir)):
        log(f"bench sparse: starting 3 instances ({transport})")
        state = start_cluster(spec, log=lambda *_: None)
        try:
            url = state.instances[0].url
            for k in topks:  # bytes, once (route's and fetch's follow from the selection; auto's from its decisions
                # of the moment), which also warms up every combination for the timed rounds
                for mode in MODES:
                    moved[(k, mode)] = bytes_per_token(url, prompts, params[(k, mode)])
            log("bench sparse: bytes counted")
            order = list(params)
            for r in range(repeats):
                for key in order if r % 2 == 0 else order[::-1]:  # no order bias
                    samples[key].append(tpot_ms(url, prompts, params[key], unsteady, MAX_TOKENS))
                log(f"bench sparse: round {r + 1}/{repeats} done")
        finally:
            stop_cluster(state)
    tpot = {key: statistics.median(v) for key, v in samples.items()}
    figures = {str(k): {m: {"bytes_per_token": moved[(k, m)], "tpot_ms": tpot[(k, m)]} for m in MODES}
               for k in topks}  # fmt: skip
    by_assignment = {str(k): {name: tpot[(k, name)] for name in ways} for k in topks}
    best = {k: ways[min(t, key=t.get)] for k, t in by_assignment.items()}
    best_tpot = {k: min(min(t.values()), figures[k]["route"]["tpot_ms"], figures[k]["fetch"]["tpot_ms"])
                 for k, t in by_assignment.items()}  # fmt: skip
    records = read_decision_log(log_dir / "i0.jsonl")
    return {
        "corpus_tokens": len(token_ids), "instances": 3, "agents": AGENTS, "max_tokens": MAX_TOKENS,
        "repeats": repeats, "transport": transport, "topk": figures,
        "auto_over_best_tpot": {k: f["auto"]["tpot_ms"] / min(f["route"]["tpot_ms"], f["fetch"]["tpot_ms"])
                                for k, f in figures.items()},
        "auto_over_best_assignment_tpot": {k: figures[k]["auto"]["tpot_ms"] / best_tpot[k] for k in figures},
        "auto_over_fetch_bytes": {k: f["auto"]["bytes_per_token"] / f["fetch"]["bytes_per_token"]
                                  for k, f in figures.items()},
        "tpot_ms_by_assignment": by_assignment, "best_assignment": best,
        "targets": {**TARGETS, "bytes_target_topk": str(max(topks))},
        "samples_ms": {f"{k}/{m}": v for (k, m), v in samples.items()}, "unsteady_runs": unsteady,
        "decision_records": len(records), **mispredictions(records, best),
    }  # fmt: skip


def _print(r: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    print(f"sparse selection (summary), corpus {r['corpus_tokens']} tokens on {r['instances']} instances, "
          f"{r['agents']} agents at once, {r['max_tokens']} tokens each, TPOT medians of {r['repeats']}, "
          f"{r['transport']}", file=out)  # fmt: skip
    print(f"  {'top-k':>5s} " + " ".join(f"{m + ' B/tok':>13s}" for m in MODES) + " "
          + " ".join(f"{m + ' ms':>9s}" for m in MODES) + f" {'auto/best':>9s} {'auto/fetch B':>12s}",
          file=out)  # fmt: skip
    for k, f in r["topk"].items():
        print(f"  {k:>5s} " + " ".join(f"{f[m]['bytes_per_token']:13.0f}" for m in MODES) + " "
              + " ".join(f"{f[m]['tpot_ms']:9.2f}" for m in MODES)
              + f" {r['auto_over_best_tpot'][k]:8.3f}x {r['auto_over_fetch_bytes'][k]:11.3f}x",
              file=out)  # fmt: skip
    for k, t in r["tpot_ms_by_assignment"].items():
        print(f"  top-k {k}: TPOT by assignment " + ", ".join(f"{n} {ms:.2f}" for n, ms in t.items())
              + f"; auto/best of all {r['auto_over_best_assignment_tpot'][k]:.3f}x; auto decided "
              + str(r["auto_decisions"].get(k, {})), file=out)  # fmt: skip
    t = r["targets"]
    print(f"  targets: auto/best <= {t['auto_over_best_tpot']}x at every top-k; auto/fetch bytes <= "
          f"{t['auto_over_fetch_bytes_at_64']}x at top-k {t['bytes_target_topk']}", file=out)  # fmt: skip
    print(f"  auto mispredicted {r['mispredicted_fraction']} of {r['decisions_judged']} owner-layer decisions "
          f"(against the best assignment per top-k; by top-k {r['mispredicted_by_topk']})", file=out)  # fmt: skip
    if r["unsteady_runs"]:
        print(f"  runs done again for want of a steady state: {len(r['unsteady_runs'])}", file=out)


def _cmd(args: argparse.Namespace) -> int:
    from qroute.bench import emit
    from qroute.ops.cluster_cli import model_dir_or_tiny
    from qroute.ops.demo_core import default_corpus

    corpus = Path(args.corpus).resolve() if args.corpus else default_corpus()
    report = run_bench(model_dir_or_tiny(args.model_dir), corpus, repeats=args.repeats, base_port=args.base_port,
                       transport=args.transport, topks=tuple(args.topk),
                       log=(lambda *_: None) if args.json else print)  # fmt: skip
    return emit(report, args.json, _print)


def add_cli(sub: argparse._SubParsersAction) -> None:
    from qroute.bench import cluster_bench_parser

    parser = cluster_bench_parser(sub, "sparse", "bytes per token, TPOT and auto's mispredictions by top-k",
                                  base_port=8850, transport="nixl")
    parser.add_argument("--topk", type=int, nargs="+", default=list(TOPK))
    parser.set_defaults(handler=_cmd)
