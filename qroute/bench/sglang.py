"""``qroute bench sglang``: qroute on SGLang against stock SGLang (torch-native attention) on this CPU, each part one
run side by side, steady-state decode TPOT at 1 and 4 requests streamed together (``bench.decode``'s measure: gaps
after the last first token and before the first last token), medians of ``repeats`` rounds in alternating order.

- ``own``: one instance each, no corpus: qroute's own part and merge against SGLang's own attention, and each
  instance's start-up time (command to ``/health``), started one at a time.
- ``corpus``: one stock instance with the corpus as every request's prompt prefix, against the corpus sharded over
  two qroute SGLang instances (``start_cluster``, engine ``sglang``), the requests on ``i0`` in mode ``route``: the
  same context, the same client. Bytes moved per generated token come from ``i0``'s ``qroute: request ... done``
  lines of the timed requests.

Before anything is timed the tokens are checked equal (``own``: every prompt on both; ``corpus``: the question on
both set-ups)."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from qroute.bench.decode import stream_together, tpot_ms
from qroute.ops.cluster import ClusterSpec, start_cluster, state_dir, stop_cluster

CONCURRENCY = (1, 4)
MAX_TOKENS = 64
BACKENDS = ("torch_native", "qroute")
QUESTION = "Which function opens a connection, and what does it return?"


def _token_check(urls: dict[str, str], prompts: list[list[int]]) -> None:
    from openai import OpenAI

    answers = {}
    for backend, url in urls.items():
        client = OpenAI(base_url=url, api_key="qroute-bench")
        answers[backend] = [client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0.0)
                            .choices[0].text for p in prompts]  # fmt: skip
    if answers["qroute"] != answers["torch_native"]:
        raise RuntimeError(f"qroute's tokens differ from stock SGLang's: {answers}")


def run_bench(model_dir: Path, *, repeats: int = 3, base_port: int = 8540, log=print) -> dict[str, Any]:
    from qroute.ops import sglang_serve
    from qroute.ops.processes import stop_pid

    logs = state_dir() / "bench-sglang"
    started, urls, startup_s = {}, {}, {}
    try:
        for k, backend in enumerate(BACKENDS):  # one at a time: start-up is timed alone on the 2 cores
            port = base_port + k
            begin = time.perf_counter()
            process = sglang_serve.start_sglang(sglang_serve.sglang_serve_command(model_dir, port, backend=backend),
                                                sglang_serve.sglang_env(), logs / f"{backend}.log")  # fmt: skip
            started[backend] = process
            urls[backend] = sglang_serve.wait_sglang(process, port, logs / f"{backend}.log")
            startup_s[backend] = time.perf_counter() - begin
            log(f"{backend}: up in {startup_s[backend]:.1f} s")
        prompts = [list(range(5 + 7 * k, 37 + 7 * k)) for k in range(max(CONCURRENCY))]  # 32-token prompts
        _token_check(urls, prompts)
        for url in urls.values():  # warm-up
            stream_together(url, prompts[:1], None, 8)
        tpot: dict[str, dict[int, float]] = {b: {} for b in BACKENDS}
        unsteady: list[int] = []
        for n in CONCURRENCY:
            rounds = {b: [] for b in BACKENDS}
            for r in range(repeats):  # alternating order, medians
                for backend in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
                    rounds[backend].append(tpot_ms(urls[backend], prompts[:n], None, unsteady, MAX_TOKENS))
            for backend in BACKENDS:
                tpot[backend][n] = statistics.median(rounds[backend])
            log(f"{n} at once: stock {tpot['torch_native'][n]:.1f} ms, qroute {tpot['qroute'][n]:.1f} ms")
    finally:
        for process in started.values():
            stop_pid(process.pid)
    return {"startup_s": startup_s, "tpot_ms": tpot,
            "tpot_ratio": {n: tpot["qroute"][n] / tpot["torch_native"][n] for n in CONCURRENCY},
            "repeats": repeats, "max_tokens": MAX_TOKENS, "unsteady_reruns": unsteady}  # fmt: skip


def run_corpus_bench(model_dir: Path, corpus: Path, *, repeats: int = 3, base_port: int = 8540,
                     log=print) -> dict[str, Any]:  # fmt: skip
    from qroute.core.corpus import place_model_corpus
    from qroute.ops import sglang_serve
    from qroute.ops.demo_core import question_ids
    from qroute.ops.processes import stop_pid
    from qroute.plugin.sglang_corpus import done_summaries

    corpus_ids = place_model_corpus(model_dir, corpus, name="corpus", instances=["i0"])[0].tolist()
    question = question_ids(model_dir, QUESTION)
    context = 1 << (len(corpus_ids) + len(question) + MAX_TOKENS).bit_length()
    log_path = state_dir() / "bench-sglang" / "stock-prefix.log"
    command = sglang_serve.sglang_serve_command(model_dir, base_port, backend="torch_native", context_length=context,
                                                max_total_tokens=context * max(CONCURRENCY))  # fmt: skip
    stock = sglang_serve.start_sglang(command, sglang_serve.sglang_env(), log_path)
    state = None
    try:
        spec = ClusterSpec(model_dir=model_dir, corpus_dir=corpus, num_instances=2, base_port=base_port + 10,
                           blocks_per_chunk=4, engine="sglang", mode="route")  # fmt: skip
        begin = time.perf_counter()
        state = start_cluster(spec, log=log)
        cluster_s = time.perf_counter() - begin
        urls = {"stock": sglang_serve.wait_sglang(stock, base_port, log_path), "route": state.instances[0].url}
        prompts = {"stock": corpus_ids + question, "route": question}
        params = {"stock": None, "route": {"qroute": {"mode": "route"}}}
        _same_answer(urls, prompts, params)
        i0_log = Path(state.instances[0].log)
        timed_from = i0_log.stat().st_size
        tpot: dict[str, dict[int, float]] = {name: {} for name in urls}
        unsteady: list[int] = []
        for n in CONCURRENCY:
            rounds = {name: [] for name in urls}
            for r in range(repeats):
                for name in (list(urls) if r % 2 == 0 else list(urls)[::-1]):
                    rounds[name].append(tpot_ms(urls[name], [prompts[name]] * n, params[name], unsteady, MAX_TOKENS,
                                                "custom_params"))  # fmt: skip
            for name in urls:
                tpot[name][n] = statistics.median(rounds[name])
            log(f"corpus, {n} at once: stock prefix {tpot['stock'][n]:.1f} ms, qroute route {tpot['route'][n]:.1f} ms")
        with i0_log.open(errors="replace") as f:
            f.seek(timed_from)
            done = list(done_summaries(f.read()).values())
    finally:
        stop_pid(stock.pid)
        if state is not None:
            stop_cluster(state)
    routed = [d for d in done if d.get("mode") == "route"]
    return {"corpus_tokens": len(corpus_ids), "question_tokens": len(question), "cluster_startup_s": cluster_s,
            "tpot_ms": tpot, "tpot_ratio": {n: tpot["route"][n] / tpot["stock"][n] for n in CONCURRENCY},
            "route_requests": len(routed), "errors": sum("error" in d for d in routed),
            "bytes_moved_per_token": sum(d["bytes_moved"] for d in routed) / max(1, len(routed) * MAX_TOKENS),
            "routes_per_token": sum(d["route"] for d in routed) / max(1, len(routed) * MAX_TOKENS),
            "unsteady_reruns": unsteady}  # fmt: skip


def _same_answer(urls: dict[str, str], prompts: dict[str, list[int]], params: dict[str, dict | None]) -> None:
    from openai import OpenAI

    answers = {}
    for name, url in urls.items():
        extra = {"custom_params": params[name]} if params[name] else {}
        answers[name] = OpenAI(base_url=url, api_key="qroute-bench").completions.create(
            model="tiny", prompt=prompts[name], max_tokens=16, temperature=0.0, extra_body=extra).choices[0].text
    if len(set(answers.values())) != 1:
        raise RuntimeError(f"the sharded corpus answers otherwise than the stock prefix: {answers}")


def _print(r: dict[str, Any]) -> None:
    own = r["own"]
    print("SGLang on CPU, qroute backend (own part only) against stock torch_native")
    print(f"start-up: stock {own['startup_s']['torch_native']:.1f} s, qroute {own['startup_s']['qroute']:.1f} s")
    for n, ratio in own["tpot_ratio"].items():
        print(f"TPOT at {n}: stock {own['tpot_ms']['torch_native'][n]:.1f} ms, qroute "
              f"{own['tpot_ms']['qroute'][n]:.1f} ms, ratio {ratio:.3f}")  # fmt: skip
    c = r.get("corpus")
    if c:
        print(f"corpus {c['corpus_tokens']} tokens: stock prefix against 2 qroute instances (route); cluster up and "
              f"prefilled in {c['cluster_startup_s']:.1f} s")  # fmt: skip
        for n, ratio in c["tpot_ratio"].items():
            print(f"TPOT at {n}: stock prefix {c['tpot_ms']['stock'][n]:.1f} ms, qroute route "
                  f"{c['tpot_ms']['route'][n]:.1f} ms, ratio {ratio:.3f}")  # fmt: skip
        print(f"route: {c['bytes_moved_per_token']:.0f} bytes and {c['routes_per_token']:.1f} routes per token "
              f"({c['route_requests']} requests, {c['errors']} errors)")  # fmt: skip


def _cmd(args: argparse.Namespace) -> int:
    from qroute.bench import emit
    from qroute.ops.cluster_cli import model_dir_or_tiny
    from qroute.ops.demo_core import default_corpus

    model_dir, log = model_dir_or_tiny(args.model_dir), (lambda *_: None) if args.json else print
    report = {"own": run_bench(model_dir, repeats=args.repeats, base_port=args.base_port, log=log)}
    if not args.no_corpus:
        corpus = Path(args.corpus).resolve() if args.corpus else default_corpus()
        report["corpus"] = run_corpus_bench(model_dir, corpus, repeats=args.repeats, base_port=args.base_port + 2,
                                            log=log)  # fmt: skip
    return emit(report, args.json, _print)


def add_cli(sub: argparse._SubParsersAction) -> None:
    from qroute.bench import bench_group

    parser = bench_group(sub).add_parser("sglang", help="qroute's SGLang backend against stock SGLang")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model-dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=8540)
    parser.add_argument("--corpus", help="corpus directory (default: the stdlib sqlite3 package)")
    parser.add_argument("--no-corpus", action="store_true", help="only the own-part comparison")
    parser.set_defaults(handler=_cmd)
