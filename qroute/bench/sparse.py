"""``qroute bench sparse``: what moving the query saves under sparse selection, and how well ``auto`` decides.

One cluster of 3 qroute instances over one corpus, every instance keeping block summaries; ``AGENTS`` requests
with different questions about the corpus go to ``i0`` together, each selecting its top-k blocks per layer
(``selector: summary``), at top-k of 1, 4, 16 and 64 blocks, in ``route``, ``fetch`` and ``auto`` (one request
parameter each: the same instances serve every combination, so the figures are taken side by side).

- ``bytes_per_token``: bytes moved over the fabric per decoded token, from the requests' own counts: a run of
  ``MAX_TOKENS`` tokens minus a run of one token (its prefill step), over the decoded tokens;
- ``tpot_ms``: the steady-state inter-token gap of the requests streamed together (``decode.steady_gaps``),
  median over ``repeats`` rounds (round-robin over the combinations);
- ``mispredicted_fraction``: ``i0`` keeps a decision log (``QROUTE_DECISION_LOG``): every remote part of every
  layer with its planned decision and its time. Route and fetch runs measure both options on the same parts (same
  top-k, layer, owner, selected tokens and rows: selection is deterministic); an auto decision is mispredicted
  when the option it chose has the higher median time there. ``mispredicted_excess`` is the time those choices
  lost over the sum of the best options' times.

Targets (the sparse-selection issue): at every top-k auto's TPOT within 10 % of the better of route and fetch;
auto's bytes per token at most 0.1x fetch's at top-k 64.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qroute.bench.decode import scoped_env, tpot_ms
from qroute.dataplane.decisionlog import DECISION_LOG_ENV, read_decision_log
from qroute.ops.cluster import STATE_ENV, ClusterSpec, completion, start_cluster, state_dir, stop_cluster

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


def _params(topk: int, mode: str) -> dict:
    return {"qroute": {"corpus": "corpus", "selector": "summary", "topk": topk, "mode": mode}}


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


def mispredictions(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Auto's decisions against what route and fetch measured on the same parts (see the module docstring)."""
    times: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    auto: list[tuple[tuple, str]] = []
    for r in records:
        if r["fell_back"] or r["selector"] != "summary":
            continue
        key = (r["topk"], r["layer"], r["owner"], r["tokens"], r["rows"])
        if r["mode"] == "auto":
            auto.append((key, r["decision"]))
        elif r["mode"] in ("route", "fetch"):
            times[key][r["mode"]].append(r["seconds"])
    judged = wrong = 0
    lost = best = 0.0
    wrong_by_topk: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # topk -> [mispredicted, judged]
    for key, decision in auto:
        measured = times.get(key, {})
        if not measured.get("route") or not measured.get("fetch"):
            continue  # a part no route and fetch run measured alike (e.g. a prefill step batched differently)
        median = {mode: statistics.median(measured[mode]) for mode in ("route", "fetch")}
        other = "fetch" if decision == "route" else "route"
        judged += 1
        wrong_by_topk[str(key[0])][1] += 1
        best += min(median.values())
        if median[decision] > median[other]:
            wrong += 1
            wrong_by_topk[str(key[0])][0] += 1
            lost += median[decision] - median[other]
    return {
        "mispredicted_fraction": wrong / judged if judged else None,
        "mispredicted_excess": lost / best if best else None,
        "decisions_judged": judged,
        "decisions_unmatched": len(auto) - judged,
        "mispredicted_by_topk": {k: v[0] / v[1] for k, v in wrong_by_topk.items()},
        "auto_routed_fraction": sum(d == "route" for _, d in auto) / len(auto) if auto else None,
    }


def run_bench(
    model_dir: Path,
    corpus: Path,
    *,
    repeats: int = 3,
    base_port: int = 8750,
    transport: str = "nixl",
    topks: tuple[int, ...] = TOPK,
    log=print,
) -> dict[str, Any]:
    from qroute.core.corpus import place_model_corpus
    from qroute.ops.demo_core import question_ids

    token_ids, _ = place_model_corpus(model_dir, corpus, name="corpus", instances=["i0"])
    prompts = [question_ids(model_dir, q) for q in QUESTIONS]
    spec = ClusterSpec(model_dir=model_dir, corpus_dir=corpus, num_instances=3, base_port=base_port,
                       transport=transport, selector="summary", topk=max(topks))  # fmt: skip
    root = state_dir() / "bench-sparse"
    log_dir = root / "decisions"
    for old in log_dir.glob("*.jsonl"):
        old.unlink()  # the log appends: a previous run's decisions would be judged with this one's
    combos = [(k, mode) for k in topks for mode in MODES]
    samples: dict[tuple[int, str], list[float]] = {c: [] for c in combos}
    moved: dict[tuple[int, str], float] = {}
    unsteady: list[int] = []
    with scoped_env(STATE_ENV, str(root)), scoped_env(DECISION_LOG_ENV, str(log_dir)):
        log(f"bench sparse: starting 3 instances ({transport})")
        state = start_cluster(spec, log=lambda *_: None)
        try:
            url = state.instances[0].url
            for k, mode in combos:  # bytes (deterministic: once), and a warm-up for the timed rounds
                moved[(k, mode)] = bytes_per_token(url, prompts, _params(k, mode))
            log("bench sparse: bytes counted")
            for r in range(repeats):
                for k, mode in combos if r % 2 == 0 else list(reversed(combos)):  # no order bias
                    samples[(k, mode)].append(tpot_ms(url, prompts, _params(k, mode), unsteady, MAX_TOKENS))
                log(f"bench sparse: round {r + 1}/{repeats} done")
        finally:
            stop_cluster(state)
    records = read_decision_log(log_dir / "i0.jsonl")
    figures = {str(k): {mode: {"bytes_per_token": moved[(k, mode)],
                               "tpot_ms": statistics.median(samples[(k, mode)])} for mode in MODES}
               for k in topks}  # fmt: skip
    auto_over_best = {k: f["auto"]["tpot_ms"] / min(f["route"]["tpot_ms"], f["fetch"]["tpot_ms"])
                      for k, f in figures.items()}  # fmt: skip
    at_most = str(max(topks))
    return {
        "corpus_tokens": len(token_ids), "instances": 3, "agents": AGENTS, "max_tokens": MAX_TOKENS,
        "repeats": repeats, "transport": transport, "topk": figures, "auto_over_best_tpot": auto_over_best,
        "auto_over_fetch_bytes": {k: f["auto"]["bytes_per_token"] / f["fetch"]["bytes_per_token"]
                                  for k, f in figures.items()},
        "targets": {**TARGETS, "bytes_target_topk": at_most}, "samples_ms": {f"{k}/{m}": v for (k, m), v in
                                                                            samples.items()},
        "unsteady_runs": unsteady, "decision_records": len(records), **mispredictions(records),
    }  # fmt: skip


def _print(r: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    print(f"sparse selection (summary), corpus {r['corpus_tokens']} tokens on {r['instances']} instances, "
          f"{r['agents']} agents at once, {r['max_tokens']} tokens each, TPOT medians of {r['repeats']}, "
          f"{r['transport']}", file=out)  # fmt: skip
    print(
        f"  {'top-k':>5s} "
        + " ".join(f"{m + ' B/tok':>13s}" for m in MODES)
        + " "
        + " ".join(f"{m + ' ms':>9s}" for m in MODES)
        + f" {'auto/best':>9s} {'auto/fetch B':>12s}",
        file=out,
    )
    for k, f in r["topk"].items():
        print(
            f"  {k:>5s} "
            + " ".join(f"{f[m]['bytes_per_token']:13.0f}" for m in MODES)
            + " "
            + " ".join(f"{f[m]['tpot_ms']:9.2f}" for m in MODES)
            + f" {r['auto_over_best_tpot'][k]:8.3f}x {r['auto_over_fetch_bytes'][k]:11.3f}x",
            file=out,
        )
    t = r["targets"]
    print(f"  targets: auto/best <= {t['auto_over_best_tpot']}x at every top-k; auto/fetch bytes <= "
          f"{t['auto_over_fetch_bytes_at_64']}x at top-k {t['bytes_target_topk']}", file=out)  # fmt: skip
    print(f"  auto mispredicted {r['mispredicted_fraction']} of {r['decisions_judged']} owner-layer decisions "
          f"(by top-k {r['mispredicted_by_topk']}; time lost {r['mispredicted_excess']} of the best; "
          f"{r['decisions_unmatched']} unmatched; routed {r['auto_routed_fraction']})", file=out)  # fmt: skip
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
    from qroute.bench import bench_group

    parser = bench_group(sub).add_parser("sparse", help="bytes per token, TPOT and auto's mispredictions by top-k")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--corpus", help="corpus directory (default: the demo's corpus)")
    parser.add_argument("--model-dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=8750)
    parser.add_argument("--transport", choices=("tcp", "nixl"), default="nixl")
    parser.add_argument("--topk", type=int, nargs="+", default=list(TOPK))
    parser.set_defaults(handler=_cmd)
