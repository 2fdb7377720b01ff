"""``qroute bench ab``: qroute against the stock KV transfer path, through the OpenAI endpoints, one configuration
after the other on the same model, corpus and workload (``qroute.bench.ab_configs``, ``qroute.bench.ab_workload``).

Per configuration: TTFT, TPOT and ITL percentiles, output throughput, peak RSS per instance, bytes moved per
decoded token from that side's own counters (D's ``vllm:nixl_bytes_transferred`` for the NIXL pair, the instances'
``vllm:qroute_bytes_moved_total`` for qroute) and qroute's parts by kind. The report is written only if every
configuration was really active (the pair moved blocks over NIXL, one transfer per request; each qroute mode ran
parts of its kind) and every session's greedy tokens agree across configurations; otherwise it says why, and no
comparison is printed. JSON, a Markdown table and PNG plots go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qroute.bench.ab_configs import Running, start_floor, start_nixl_pd, start_qroute
from qroute.bench.ab_workload import SessionResult, Workload, drive, latency_summary
from qroute.errors import QRouteError
from qroute.ops.check import flush_owner_stats
from qroute.ops.scrape import delta, scrape, total

__all__ = ["CONFIGS", "run_ab"]

CONFIGS = ("stock-floor", "stock-nixl-pd", "qroute-fetch", "qroute-route", "qroute-auto")
QROUTE_MODES = {"qroute-fetch": "fetch", "qroute-route": "route", "qroute-auto": "auto"}


def _counters(running: Running) -> dict[str, Any]:
    """The side's own counters now: NIXL's (every instance's) or qroute's."""
    return {i.url: scrape(i.url, prefix="vllm:") for i in running.instances}  # one scrape: NIXL's and qroute's


def _moved(running: Running, before: dict, after: dict) -> dict[str, float]:
    out = {"bytes": 0.0, "nixl_transfers": 0.0, "route": 0.0, "fetch": 0.0, "local": 0.0}
    for url in after:
        d = delta(after[url], before[url])
        out["bytes"] += total(d, "vllm:nixl_bytes_transferred_sum") + total(d, "vllm:qroute_bytes_moved_total")
        out["nixl_transfers"] += total(d, "vllm:nixl_bytes_transferred_count")
        for kind in ("route", "fetch", "local"):
            out[kind] += total(d, "vllm:qroute_corpus_parts_total", decision=kind)
    return out


def _measure(name: str, running: Running, workload: Workload, request_for) -> tuple[dict, list[SessionResult]]:
    # one step on every instance before each scrape: counters move at an instance's own steps
    urls = {i.instance_id: i.url for i in running.instances}
    drive(running.endpoints[:1], Workload(workload.questions[:1], 1, 2), request_for)  # warm-up, not counted
    flush_owner_stats(urls)
    before = _counters(running)
    results = drive(running.endpoints, workload, request_for)
    flush_owner_stats(urls)
    moved = _moved(running, before, _counters(running))
    summary = latency_summary(results)
    decoded = summary["decoded_tokens"] or 1
    row = {
        "ttft_ms_p50": summary["ttft_ms"]["p50"], "tpot_ms_p50": summary["tpot_ms"]["p50"],
        "bytes_per_token": round(moved["bytes"] / decoded, 1), **summary, "moved": moved,
        "instances": len(running.instances), "peak_rss_mib": running.peak_rss_mib(),
        "sessions_ttft_ms": [round(r.ttft_s * 1e3, 2) for r in results if r.error is None],
        "sessions_tpot_ms": [round(r.tpot_s * 1e3, 3) for r in results if r.error is None],
    }  # fmt: skip
    return row, results


def _activity_problems(name: str, row: dict, workload: Workload) -> list[str]:
    moved, problems = row["moved"], []
    if row["errors"]:
        problems.append(f"{name}: {len(row['errors'])} sessions failed, e.g. {row['errors'][0]}")
    if name == "stock-nixl-pd" and moved["nixl_transfers"] < workload.sessions:
        problems.append(f"{name}: D pulled {moved['nixl_transfers']:.0f} KV transfers over NIXL for "
                        f"{workload.sessions} requests: the pair did not run as P/D")  # fmt: skip
    mode = QROUTE_MODES.get(name)
    if mode in ("route", "fetch") and moved[mode] <= 0:
        problems.append(f"{name}: no {mode} part ran (the corpus was not sharded, or the mode was ignored)")
    if mode == "auto" and moved["route"] + moved["fetch"] <= 0:
        problems.append(f"{name}: no remote part ran")
    return problems


def run_ab(model_dir: Path, corpus: Path, workload: Workload, *, base_port: int = 8600, instances: int = 2,
           transport: str = "nixl", blocks_per_chunk: int = 16, configs=CONFIGS, log=print) -> dict:  # fmt: skip
    """Each configuration in turn; the report (``ok`` False, with ``problems``, when a check fails)."""
    from qroute.core.corpus import place_model_corpus
    from qroute.ops.demo_core import question_ids

    token_ids, _ = place_model_corpus(model_dir, corpus, name="corpus", instances=["i0"])
    corpus_ids = token_ids.tolist()
    questions = [question_ids(model_dir, q) for q in workload.questions]
    max_len = max(2048, 1 << (len(corpus_ids) + max(map(len, questions)) + workload.max_tokens).bit_length())
    report: dict[str, Any] = {"corpus_tokens": len(corpus_ids), "workload": workload.__dict__ | {},
                              "qroute_instances": instances, "transport": transport, "configs": {}}  # fmt: skip
    outputs: dict[str, list[list[int]]] = {}
    stock_request = lambda q: (corpus_ids + questions[q], {})  # noqa: E731
    qroute: Running | None = None
    try:
        for name in configs:
            log(f"bench ab: {name}")
            if name in QROUTE_MODES:
                if qroute is None:
                    qroute = start_qroute(model_dir, corpus, base_port + 10, instances, transport, blocks_per_chunk)
                mode = QROUTE_MODES[name]
                row, results = _measure(name, qroute, workload, lambda q, m=mode: (
                    questions[q], {"kv_transfer_params": {"qroute": {"corpus": "corpus", "mode": m}}}))
            else:
                start = start_floor if name == "stock-floor" else start_nixl_pd
                running = start(model_dir, base_port, max_len)
                try:
                    row, results = _measure(name, running, workload, stock_request)
                finally:
                    running.stop()
            report["configs"][name] = row
            outputs[name] = [r.tokens for r in results]
    finally:
        if qroute is not None:
            qroute.stop()
    problems = [p for name, row in report["configs"].items() for p in _activity_problems(name, row, workload)]
    reference = outputs[configs[0]]
    for name, tokens in outputs.items():
        differing = [i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b]
        if differing:
            problems.append(f"{name}: sessions {differing[:8]} decoded other tokens than {configs[0]}")
    report["outputs_agree"] = not any("decoded other tokens" in p for p in problems)
    report["problems"], report["ok"] = problems, not problems
    if report["ok"]:
        report["ratios"] = _ratios(report["configs"])
    return report


def _ratios(rows: dict[str, dict]) -> dict[str, dict[str, float]]:
    """qroute-auto against each stock configuration (the issue's targets are on these)."""
    auto = rows.get("qroute-auto")
    out = {}
    for stock in ("stock-nixl-pd", "stock-floor"):
        if auto is None or stock not in rows:
            continue
        s = rows[stock]
        moved = s["bytes_per_token"]
        out[f"qroute-auto/{stock}"] = {
            "bytes_per_token": round(auto["bytes_per_token"] / moved, 4) if moved else None,  # the floor moves none
            "ttft_p50": round(auto["ttft_ms_p50"] / s["ttft_ms_p50"], 3),
            "tpot_p50": round(auto["tpot_ms_p50"] / s["tpot_ms_p50"], 3),
        }  # fmt: skip
    return out


def markdown(report: dict) -> str:
    lines = ["| config | instances | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | ITL p50 / p99 ms | tok/s | "
             "bytes / token | parts route / fetch / local | peak RSS MiB |", "|" + " --- |" * 9]  # fmt: skip
    for name, r in report["configs"].items():
        t, p, i, m = r["ttft_ms"], r["tpot_ms"], r["itl_ms"], r["moved"]
        lines.append(f"| {name} | {r['instances']} | {t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f} | "
                     f"{p['p50']:.1f} / {p['p90']:.1f} / {p['p99']:.1f} | {i['p50']:.1f} / {i['p99']:.1f} | "
                     f"{r['throughput_tok_s']:.1f} | {r['bytes_per_token']:,.0f} | "
                     f"{m['route']:.0f} / {m['fetch']:.0f} / {m['local']:.0f} | "
                     f"{', '.join(f'{x:.0f}' for x in r['peak_rss_mib'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


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


def _write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.json").write_text(json.dumps(report, indent=2))
    if report["ok"]:
        (out / "ab.md").write_text(markdown(report))
        from qroute.bench.ab_plots import plot_report

        plot_report(report, out)


def _run(args: argparse.Namespace) -> int:
    from qroute.ops.cluster_cli import model_dir_or_tiny
    from qroute.ops.demo_core import default_corpus

    workload = Workload.from_jsonl(Path(args.workload), sessions=args.sessions) if args.workload else \
        Workload(sessions=args.sessions or 8, max_tokens=args.max_tokens, arrival_rate=args.arrival_rate)  # fmt: skip
    corpus = Path(args.corpus).resolve() if args.corpus else default_corpus()
    report = run_ab(model_dir_or_tiny(args.model_dir), corpus, workload, base_port=args.base_port,
                    instances=args.instances, transport=args.transport,
                    log=(lambda *_: None) if args.json else print)  # fmt: skip
    if args.out:
        _write(report, Path(args.out))
        write_bench_serve_datasets(model_dir_or_tiny(args.model_dir), corpus, workload, Path(args.out))
    if args.json:
        print(json.dumps(report))
    elif report["ok"]:
        print(markdown(report))
        for pair, ratio in report["ratios"].items():
            print(f"{pair}: {ratio}")
    else:
        print("bench ab: no comparison, the checks failed:")
        for problem in report["problems"]:
            print(f"  {problem}")
    if not report["ok"]:
        raise QRouteError("bench ab: " + "; ".join(report["problems"][:3]))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from qroute.bench import bench_group

    parser = bench_group(sub).add_parser("ab", help="qroute against the stock KV transfer path (NIXL P/D) and the "
                                                    "stock floor, through the OpenAI endpoints")  # fmt: skip
    parser.add_argument("--corpus", help="corpus directory (default: the stdlib sqlite3 package)")
    parser.add_argument("--workload", help="JSONL of {\"prompt\": question, \"output_tokens\": N} (vllm bench serve's "
                                           "custom dataset)")  # fmt: skip
    parser.add_argument("--sessions", type=int, help="concurrent sessions (default 8, or one per workload line)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--arrival-rate", type=float, default=0.0, help="sessions per second (0: all at once)")
    parser.add_argument("--instances", type=int, default=2, help="qroute instances the corpus is sharded over")
    parser.add_argument("--transport", choices=["tcp", "nixl", "nixl+tcp"], default="nixl")
    parser.add_argument("--model-dir")
    parser.add_argument("--base-port", type=int, default=8600)
    parser.add_argument("--out", help="directory for ab.json, ab.md and the plots")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run)
