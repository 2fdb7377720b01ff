"""``qroute bench sglang``: qroute's SGLang backend against stock SGLang (torch-native attention) on this CPU, one
run side by side: each instance's start-up time (command to ``/health``) and steady-state decode TPOT at
1 and 4 requests streamed together (``bench.decode``'s measure: gaps after the last first token and before the
first last token). No corpus: the backend attends to each request's own tokens (SGLang's corpus routing is not
built, issue 13), so this prices qroute's own part and merge against SGLang's own attention. The tokens of both
instances are checked equal for every prompt before anything is timed."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from qroute.bench.decode import stream_together, tpot_ms

CONCURRENCY = (1, 4)
MAX_TOKENS = 64
BACKENDS = ("torch_native", "qroute")


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
    from qroute.ops.cluster import state_dir
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


def _print(r: dict[str, Any]) -> None:
    print("SGLang on CPU, qroute backend (own part only) against stock torch_native")
    print(f"start-up: stock {r['startup_s']['torch_native']:.1f} s, qroute {r['startup_s']['qroute']:.1f} s")
    for n, ratio in r["tpot_ratio"].items():
        print(f"TPOT at {n}: stock {r['tpot_ms']['torch_native'][n]:.1f} ms, qroute {r['tpot_ms']['qroute'][n]:.1f} "
              f"ms, ratio {ratio:.3f}")  # fmt: skip


def _cmd(args: argparse.Namespace) -> int:
    from qroute.bench import emit
    from qroute.ops.cluster_cli import model_dir_or_tiny

    report = run_bench(model_dir_or_tiny(args.model_dir), repeats=args.repeats, base_port=args.base_port,
                       log=(lambda *_: None) if args.json else print)  # fmt: skip
    return emit(report, args.json, _print)


def add_cli(sub: argparse._SubParsersAction) -> None:
    from qroute.bench import bench_group

    parser = bench_group(sub).add_parser("sglang", help="qroute's SGLang backend against stock SGLang")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model-dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=8540)
    parser.set_defaults(handler=_cmd)
