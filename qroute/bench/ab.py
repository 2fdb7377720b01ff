"""``qroute bench ab``: qroute against the stock KV transfer path, through the OpenAI endpoints, one configuration
after the other on the same model, corpus and workload (``qroute.bench.ab_configs``, ``qroute.bench.ab_workload``).

Per configuration: TTFT, TPOT and ITL percentiles, output throughput, peak RSS per instance, bytes moved per
decoded token from that side's own counters (D's ``vllm:nixl_bytes_transferred`` for the NIXL pair, the instances'
``vllm:qroute_bytes_moved_total`` for qroute), qroute's parts by kind, TTFT / TPOT at other concurrency levels and
qroute's predicted against measured parts (``qroute.bench.ab_predicted``). The report is written only if every
configuration was really active (the pair moved blocks over NIXL, one transfer per request; the prefix-cached
instance took every request's corpus blocks from its cache; each qroute mode ran parts of its kind) and every
session's greedy tokens agree across configurations and levels; otherwise it says why, and no comparison is
printed. JSON, Markdown tables and PNG plots go to ``--out`` (``qroute.bench.ab_report``); ``--capacity`` adds
sessions at the same KV budget (``qroute.bench.ab_capacity``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from qroute.bench.ab_configs import (
    Running,
    moved_between,
    start_floor,
    start_nixl_pd,
    start_prefix_cached,
    start_qroute,
)
from qroute.bench.ab_predicted import DecisionTail, predicted_vs_measured
from qroute.bench.ab_report import markdown, write_report
from qroute.bench.ab_workload import SessionResult, Workload, drive, latency_summary, warm_up
from qroute.errors import QRouteError
from qroute.ops.check import flush_owner_stats

__all__ = ["CONFIGS", "run_ab"]

CONFIGS = ("stock-floor", "stock-prefix-cached", "stock-nixl-pd", "qroute-fetch", "qroute-route", "qroute-auto",
           "qroute-auto-x3")  # fmt: skip
STOCK_STARTS = {"stock-floor": start_floor, "stock-prefix-cached": start_prefix_cached, "stock-nixl-pd": start_nixl_pd}
QROUTE_MODES = {"qroute-fetch": "fetch", "qroute-route": "route", "qroute-auto": "auto", "qroute-auto-x3": "auto"}
WIDE = "qroute-auto-x3"  # auto over `wide_instances`, against the prefix-cached instance
CPU_MLA_BLOCK_SIZE = 16  # what vLLM's CPU platform forces for the CPU MLA backend (platforms/cpu.py)


def _measure(running: Running, workload: Workload, request_for, levels: tuple[int, ...],
             decisions: DecisionTail | None) -> tuple[dict, list[SessionResult], list[SessionResult]]:  # fmt: skip
    """The workload (counted), then each other concurrency level's sessions (latency only); the row, the
    workload's sessions and the other levels' sessions."""
    # one step on every instance before each scrape: counters move at an instance's own steps
    urls = {i.instance_id: i.url for i in running.instances}
    warm_up(running.endpoints, workload.questions, request_for)
    flush_owner_stats(urls)
    before = running.counters()
    if decisions is not None:
        decisions.take()  # the warm-up's parts
    results = drive(running.endpoints, workload, request_for)
    flush_owner_stats(urls)
    moved = moved_between(before, running.counters())
    summary = latency_summary(results)
    decoded = summary["decoded_tokens"] or 1
    row = {
        "ttft_ms_p50": summary["ttft_ms"]["p50"], "tpot_ms_p50": summary["tpot_ms"]["p50"],
        "bytes_per_token": round(moved["bytes"] / decoded, 1), **summary, "moved": moved,
        "instances": len(running.instances), "peak_rss_mib": running.peak_rss_mib(),
        "sessions_ttft_ms": [round(r.ttft_s * 1e3, 2) for r in results if r.error is None],
        "sessions_tpot_ms": [round(r.tpot_s * 1e3, 3) for r in results if r.error is None],
    }  # fmt: skip
    if decisions is not None:
        row["predicted"] = predicted_vs_measured(decisions.take())
    row["by_concurrency"], others = {}, []
    for level in sorted(set(levels) | {workload.sessions}):
        level_results = results if level == workload.sessions else \
            drive(running.endpoints, dataclasses.replace(workload, sessions=level), request_for)  # fmt: skip
        others += [] if level == workload.sessions else level_results
        s = latency_summary(level_results)
        row["by_concurrency"][str(level)] = {"ttft_ms": s["ttft_ms"], "tpot_ms": s["tpot_ms"],
                                             "throughput_tok_s": s["throughput_tok_s"], "errors": len(s["errors"])}
    return row, results, others


def _activity_problems(name: str, row: dict, workload: Workload, corpus_tokens: int) -> list[str]:
    moved, problems = row["moved"], []
    if row["errors"]:
        problems.append(f"{name}: {len(row['errors'])} sessions failed, e.g. {row['errors'][0]}")
    if name == "stock-nixl-pd" and moved["nixl_transfers"] < workload.sessions:
        problems.append(f"{name}: D pulled {moved['nixl_transfers']:.0f} KV transfers over NIXL for "
                        f"{workload.sessions} requests: the pair did not run as P/D")  # fmt: skip
    cached = workload.sessions * (corpus_tokens // CPU_MLA_BLOCK_SIZE) * CPU_MLA_BLOCK_SIZE
    if name == "stock-prefix-cached" and moved["prefix_hit_tokens"] < cached:
        problems.append(f"{name}: {moved['prefix_hit_tokens']:.0f} prompt tokens came from the prefix cache, not "
                        f"every request's corpus blocks ({cached}): the override was not lifted")  # fmt: skip
    mode = QROUTE_MODES.get(name)
    if mode in ("route", "fetch") and moved[mode] <= 0:
        problems.append(f"{name}: no {mode} part ran (the corpus was not sharded, or the mode was ignored)")
    if mode == "auto" and moved["route"] + moved["fetch"] <= 0:
        problems.append(f"{name}: no remote part ran")
    return problems


def _disagreements(name: str, tokens: list[list[int]], reference: list[list[int]], label: str) -> list[str]:
    differing = [i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b]
    return [f"{name}: sessions {differing[:8]} decoded other tokens than {label}"] if differing else []


def run_ab(model_dir: Path, corpus: Path, workload: Workload, *, base_port: int = 8600, instances: int = 2,
           wide_instances: int = 3, concurrency: tuple[int, ...] = (), transport: str = "nixl",
           blocks_per_chunk: int = 16, configs=CONFIGS, log=print) -> dict:  # fmt: skip
    """Each configuration in turn; the report (``ok`` False, with ``problems``, when a check fails). Each
    configuration also runs the workload's questions at each ``concurrency`` level (TTFT / TPOT against
    concurrency; those sessions' tokens are checked against the workload's for the same question)."""
    import shutil
    import tempfile

    from qroute.core.corpus import place_model_corpus
    from qroute.ops.demo_core import question_ids

    token_ids, _ = place_model_corpus(model_dir, corpus, name="corpus", instances=["i0"])
    corpus_ids = token_ids.tolist()
    questions = [question_ids(model_dir, q) for q in workload.questions]
    max_len = max(2048, 1 << (len(corpus_ids) + max(map(len, questions)) + workload.max_tokens).bit_length())
    report: dict[str, Any] = {"corpus_tokens": len(corpus_ids), "workload": workload.__dict__ | {},
                              "qroute_instances": instances, "wide_instances": wide_instances,
                              "transport": transport, "configs": {}}  # fmt: skip
    outputs: dict[str, list[list[int]]] = {}
    problems: list[str] = []
    stock_request = lambda q: (corpus_ids + questions[q], {})  # noqa: E731
    qroute: Running | None = None
    log_root = Path(tempfile.mkdtemp(prefix="qroute-ab-decisions-"))
    try:
        for name in configs:
            log(f"bench ab: {name}")
            decisions = None
            if name in QROUTE_MODES:
                count = wide_instances if name == WIDE else instances
                if qroute is not None and len(qroute.instances) != count:
                    qroute.stop()
                    qroute = None
                if qroute is None:
                    qroute = start_qroute(model_dir, corpus, base_port + (20 if name == WIDE else 10), count,
                                          transport, blocks_per_chunk, log_root / f"x{count}")  # fmt: skip
                    tail = DecisionTail(log_root / f"x{count}")
                mode, running, decisions = QROUTE_MODES[name], qroute, tail
                request_for = lambda q, m=mode: (questions[q], {  # noqa: E731
                    "kv_transfer_params": {"qroute": {"corpus": "corpus", "mode": m}}})
                row, results, others = _measure(running, workload, request_for, concurrency, decisions)
            else:
                running = STOCK_STARTS[name](model_dir, base_port, max_len)
                try:
                    row, results, others = _measure(running, workload, stock_request, concurrency, None)
                finally:
                    running.stop()
            report["configs"][name] = row
            outputs[name] = [r.tokens for r in results]
            by_question = {r.question: r.tokens for r in results}
            problems += _disagreements(name, [r.tokens for r in others], [by_question.get(r.question, [])
                                                                         for r in others], "its own workload run")
    finally:
        if qroute is not None:
            qroute.stop()
        shutil.rmtree(log_root, ignore_errors=True)
    problems += [p for name, row in report["configs"].items()
                 for p in _activity_problems(name, row, workload, len(corpus_ids))]  # fmt: skip
    for name, tokens in outputs.items():
        problems += _disagreements(name, tokens, outputs[configs[0]], configs[0])
    report["outputs_agree"] = not any("decoded other tokens" in p for p in problems)
    report["problems"], report["ok"] = problems, not problems
    if report["ok"]:
        report["ratios"] = _ratios(report["configs"])
    return report


# the targets, as upper bounds on qroute / stock (benchmarks: printed, never asserted)
TARGETS = {("qroute-auto", "stock-nixl-pd"): {"bytes_per_token": 0.1, "ttft_p50": 0.5, "tpot_p50": 1.1},
           ("qroute-auto-x3", "stock-prefix-cached"): {"ttft_p50": 1.5, "tpot_p50": 1.2}}  # fmt: skip
COMPARED = (*TARGETS, ("qroute-route", "stock-nixl-pd"), ("qroute-auto", "stock-floor"))


def _ratios(rows: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """qroute against stock configurations, with the targets where the issue sets them."""
    out = {}
    for ours, stock in COMPARED:
        if ours not in rows or stock not in rows:
            continue
        q, s = rows[ours], rows[stock]
        moved = s["bytes_per_token"]
        ratio = {
            "bytes_per_token": round(q["bytes_per_token"] / moved, 4) if moved else None,  # the floor moves none
            "ttft_p50": round(q["ttft_ms_p50"] / s["ttft_ms_p50"], 3),
            "tpot_p50": round(q["tpot_ms_p50"] / s["tpot_ms_p50"], 3),
        }  # fmt: skip
        targets = TARGETS.get((ours, stock), {})
        ratio["targets"] = {k: {"at_most": bound, "met": ratio[k] is not None and ratio[k] <= bound}
                            for k, bound in targets.items()}  # fmt: skip
        out[f"{ours}/{stock}"] = ratio
    return out


def write_bench_serve_datasets(model_dir: Path, corpus: Path, workload: Workload, out: Path) -> list[Path]:
    """The workload as ``vllm bench serve`` custom datasets (docs/ab.md): ``workload.jsonl`` (the questions, for qroute
    instances, which add the corpus themselves) and ``workload-stock.jsonl`` (the corpus text before each question,
    for stock instances). Re-tokenized text, so for speed only: exactness is what ``qroute bench ab`` checks."""
    from transformers import AutoTokenizer

    from qroute.core.corpus import place_model_corpus

    token_ids, _ = place_model_corpus(model_dir, corpus, name="corpus", instances=["i0"])
    corpus_text = AutoTokenizer.from_pretrained(str(model_dir)).decode(token_ids.tolist())
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, prefix in (("workload.jsonl", ""), ("workload-stock.jsonl", corpus_text + "\n\n")):
        lines = [json.dumps({"prompt": prefix + workload.questions[i % len(workload.questions)],
                             "output_tokens": workload.max_tokens}) for i in range(workload.sessions)]  # fmt: skip
        paths.append(out / name)
        paths[-1].write_text("\n".join(lines) + "\n")
    return paths


def _run(args: argparse.Namespace) -> int:
    from qroute.ops.cluster_cli import model_dir_or_tiny
    from qroute.ops.demo_core import default_corpus

    workload = Workload.from_jsonl(Path(args.workload), sessions=args.sessions) if args.workload else \
        Workload(sessions=args.sessions or 8, max_tokens=args.max_tokens, arrival_rate=args.arrival_rate)  # fmt: skip
    corpus = Path(args.corpus).resolve() if args.corpus else default_corpus()
    report = run_ab(model_dir_or_tiny(args.model_dir), corpus, workload, base_port=args.base_port,
                    instances=args.instances, wide_instances=args.wide_instances, transport=args.transport,
                    concurrency=tuple(int(c) for c in args.concurrency.split(",") if c.strip()),
                    configs=CONFIGS if args.configs is None else tuple(c for c in args.configs.split(",") if c),
                    log=(lambda *_: None) if args.json else print)  # fmt: skip
    if args.capacity:
        from qroute.bench.ab_capacity import run_capacity

        capacity = run_capacity(model_dir_or_tiny(args.model_dir), corpus, workload.questions,
                                instances=args.wide_instances, extra_blocks=args.capacity_extra_blocks,
                                sessions=args.capacity_sessions, max_tokens=args.capacity_max_tokens,
                                base_port=args.base_port, transport=args.transport,
                                log=(lambda *_: None) if args.json else print)  # fmt: skip
        report["capacity"] = capacity
        report["problems"] += [f"capacity: {p}" for p in capacity["problems"]]
        report["ok"] = report["ok"] and capacity["ok"]
    if args.out:
        write_report(report, Path(args.out))
        write_bench_serve_datasets(model_dir_or_tiny(args.model_dir), corpus, workload, Path(args.out))
    if args.json:
        print(json.dumps(report))
    elif report["ok"]:
        print(markdown(report))
    else:
        print("bench ab: no comparison, the checks failed:")
        for problem in report["problems"]:
            print(f"  {problem}")
    if not report["ok"]:
        raise QRouteError("bench ab: " + "; ".join(report["problems"][:3]))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from qroute.bench import bench_group

    parser = bench_group(sub).add_parser("ab", help="qroute against the stock KV transfer path (NIXL P/D), "
                                                    "the stock floor and prefix caching, through OpenAI endpoints")
    parser.add_argument("--corpus", help="corpus directory (default: the stdlib sqlite3 package)")
    parser.add_argument("--workload", help="JSONL of {\"prompt\": question, \"output_tokens\": N} (vllm bench serve's "
                                           "custom dataset)")  # fmt: skip
    parser.add_argument("--sessions", type=int, help="concurrent sessions (default 8, or one per workload line)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--arrival-rate", type=float, default=0.0, help="sessions per second (0: all at once)")
    parser.add_argument("--instances", type=int, default=2, help="qroute instances the corpus is sharded over (as "
                                                                 "many as the NIXL pair has)")  # fmt: skip
    parser.add_argument("--wide-instances", type=int, default=3, help="instances of qroute-auto-x3")
    parser.add_argument("--concurrency", default="1,4", help="other session counts each configuration also "
                                                             "runs (TTFT / TPOT against concurrency); '' for none")
    parser.add_argument("--configs", help=f"comma-separated subset of {','.join(CONFIGS)} (the first is the "
                                          "reference the others' tokens are checked against; '' for none)")  # fmt: skip
    parser.add_argument("--transport", choices=["tcp", "nixl", "nixl+tcp"], default="nixl")
    parser.add_argument("--capacity", action="store_true", help="also measure concurrent sessions at the same "
                                                                "total KV budget (qroute.bench.ab_capacity)")
    parser.add_argument("--capacity-extra-blocks", type=int, default=32, help="KV budget per instance: the corpus's "
                                                                              "blocks plus these")  # fmt: skip
    parser.add_argument("--capacity-sessions", type=int, default=96, help="sessions offered at once")
    parser.add_argument("--capacity-max-tokens", type=int, default=96)
    parser.add_argument("--model-dir")
    parser.add_argument("--base-port", type=int, default=8600)
    parser.add_argument("--out", help="directory for ab.json, ab.md and the plots")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run)
