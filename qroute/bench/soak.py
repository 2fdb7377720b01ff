"""``qroute bench soak``: a qroute cluster under full concurrency for a long time, through the OpenAI endpoints.

``--concurrency`` clients (the official ``openai`` client, one each) ask questions about the corpus without pause,
spread over every instance, in turn through completions and chat, streamed and not. The first answer to each
(question, instance, endpoint) is the expected one: every later answer must have the same tokens (greedy, float32;
a different token is a wrong answer, counted as a mismatch). Phases: a warm-up, then a pause in which nothing is
in flight and each instance's process group is measured (RSS, threads, file descriptors, sockets, from ``/proc``;
NIXL registrations, transfer handles and remote agents from its ``/metrics``), the main run in two halves with
the same measurement after each, the same clients connected throughout. A count that grew over the second half is a
leak (in the first, caches that fill on first use, such as prepared NIXL handles or a lazily started thread, may
still grow); RSS may grow by at most ``RSS_GROWTH_MAX`` over the whole main run. Printed: requests, errors,
mismatches, latency, and per instance each count at the three measurements.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qroute.ops.cluster import CLUSTER_TRANSPORTS, ClusterSpec, ClusterState, start_cluster, stop_cluster
from qroute.ops.http_client import token_ids_of
from qroute.ops.procstats import group_usage
from qroute.ops.scrape import scrape

QUESTIONS = [
    "Which function computes the area of a circle?",
    "What does the store return for a missing key?",
    "Where is the square case handled?",
    "What is the README about?",
    "Which module holds the geometry helpers?",
    "How is a value stored?",
]
KINDS = ("completion", "completion stream", "chat", "chat stream")
RSS_GROWTH_MAX = 0.05  # the bound on RSS growth over the run
# counts that must not grow between the two idle measurements
LEAK_COUNTS = ("threads", "fds", "sockets", "nixl_registrations", "nixl_xfer_handles", "nixl_remote_agents")


@dataclass
class SoakSpec:
    corpus_dir: Path
    model_dir: Path
    minutes: float = 30.0
    warmup_s: float = 60.0
    concurrency: int = 8
    instances: int = 3
    replicas: int = 1
    transport: str = "nixl+tcp"
    max_tokens: int = 16
    base_port: int = 8900


@dataclass
class _Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    mismatches: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    expected: dict[tuple, list[int]] = field(default_factory=dict)

    def answered(self, key: tuple, tokens: list[int], seconds: float) -> None:
        with self.lock:
            self.requests[key[2]] = self.requests.get(key[2], 0) + 1
            self.latencies_s.append(seconds)
            want = self.expected.setdefault(key, tokens)
            if tokens != want and len(self.mismatches) < 20:
                self.mismatches.append(f"{key}: {tokens} != {want}")
            elif tokens != want:
                self.mismatches.append("...")

    def failed(self, key: tuple, exc: Exception) -> None:
        with self.lock:
            self.error_count += 1
            if len(self.errors) < 20:
                self.errors.append(f"{key}: {type(exc).__name__}: {exc}"[:400])


def ask(client: Any, kind: str, question: str, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy token ids of one question through one endpoint (``KINDS``)."""
    extra = {"return_tokens_as_token_ids": True}
    common = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0.0, "extra_body": extra}
    stream = kind.endswith("stream")
    if kind.startswith("completion"):
        reply = client.completions.create(prompt=prompt, logprobs=1, stream=stream, **common)
        chunks = reply if stream else [reply]
        return token_ids_of([t for c in chunks if c.choices and c.choices[0].logprobs
                             for t in c.choices[0].logprobs.tokens])  # fmt: skip
    reply = client.chat.completions.create(messages=[{"role": "user", "content": question}], logprobs=True,
                                           stream=stream, **common)  # fmt: skip
    chunks = reply if stream else [reply]
    return token_ids_of([t.token for c in chunks if c.choices and c.choices[0].logprobs
                         for t in c.choices[0].logprobs.content or []])  # fmt: skip


def _run_phase(clients: list[tuple[str, Any]], jobs: list[tuple], prompts: dict[str, list[int]], seconds: float,
               max_tokens: int, tally: _Tally) -> None:  # fmt: skip
    """Every client asks without pause for ``seconds``; returns once every one's last request ended."""
    deadline = time.monotonic() + seconds

    def loop(worker: int) -> None:
        k = worker
        while time.monotonic() < deadline:
            instance, client = clients[worker]
            question, kind = jobs[k % len(jobs)]
            k += len(clients)
            key = (instance, question, kind)
            start = time.perf_counter()
            try:
                tokens = ask(client, kind, question, prompts[question], max_tokens)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, the soak goes on
                tally.failed(key, exc)
                continue
            if len(tokens) != max_tokens:
                tally.failed(key, RuntimeError(f"{len(tokens)} tokens, expected {max_tokens}"))
                continue
            tally.answered(key, tokens, time.perf_counter() - start)

    threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def measure(state: ClusterState) -> dict[str, dict[str, float]]:
    """Each instance's process-group usage and its worker's NIXL counts (from /metrics)."""
    out = {}
    for info in state.instances:
        usage = group_usage(info.pid)
        samples = scrape(info.url)
        for what in ("registrations", "registered_bytes", "xfer_handles", "remote_agents", "agents"):
            usage[f"nixl_{what}"] = samples.get(("vllm:qroute_nixl_live", (("what", what),)), 0.0)
        out[info.instance_id] = usage
    return out


def run_soak(spec: SoakSpec, log=print) -> dict[str, Any]:
    from openai import OpenAI

    from qroute.ops.demo_core import question_ids


    cluster = ClusterSpec(model_dir=spec.model_dir, corpus_dir=spec.corpus_dir, num_instances=spec.instances,
                          replicas=spec.replicas, transport=spec.transport, base_port=spec.base_port,
                          blocks_per_chunk=4)  # fmt: skip
    state = start_cluster(cluster, log=log)
    tally = _Tally()
    try:
        urls = {info.instance_id: info.url for info in state.instances}
        ids = list(urls)
        clients = [(ids[w % len(ids)], OpenAI(base_url=urls[ids[w % len(ids)]], api_key="soak", max_retries=0,
                                              timeout=120.0)) for w in range(spec.concurrency)]  # fmt: skip
        prompts = {q: question_ids(spec.model_dir, q) for q in QUESTIONS}
        jobs = [(q, kind) for q in QUESTIONS for kind in KINDS]
        log(f"qroute bench soak: warm-up {spec.warmup_s:.0f} s, {spec.concurrency} clients")
        _run_phase(clients, jobs, prompts, spec.warmup_s, spec.max_tokens, tally)
        time.sleep(2.0)  # nothing in flight: the instances settle
        before = measure(state)
        warm = sum(tally.requests.values())
        log(f"qroute bench soak: main run {spec.minutes:g} min")
        started = time.monotonic()
        measured = [before]
        for _ in range(2):
            _run_phase(clients, jobs, prompts, spec.minutes * 30, spec.max_tokens, tally)
            time.sleep(2.0)
            measured.append(measure(state))
        elapsed = time.monotonic() - started - 2.0
    finally:
        stop_cluster(state)
    return _report(spec, tally, warm, elapsed, *measured)


def _report(spec: SoakSpec, tally: _Tally, warm: int, elapsed: float, before: dict, mid: dict,
            after: dict) -> dict[str, Any]:  # fmt: skip
    lat = sorted(tally.latencies_s)
    instances = {}
    for name in before:
        b, m, a = before[name], mid[name], after[name]
        growth = (a["rss_mib"] - b["rss_mib"]) / b["rss_mib"]
        leaks = {count: a[count] - m[count] for count in LEAK_COUNTS if a[count] > m[count]}
        instances[name] = {"before": b, "mid": m, "after": a, "rss_growth": growth, "leaks": leaks}
    total = sum(tally.requests.values())
    return {
        "spec": {k: str(v) if isinstance(v, Path) else v for k, v in vars(spec).items()},
        "requests": total, "requests_main_run": total - warm, "by_kind": tally.requests,
        "requests_per_s": round((total - warm) / elapsed, 2) if elapsed else None,
        "errors": tally.error_count, "first_errors": tally.errors,
        "mismatches": len(tally.mismatches), "first_mismatches": tally.mismatches[:5],
        "latency_s": {"p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}
        if lat else {},
        "instances": instances,
        "passed": tally.error_count == 0 and not tally.mismatches and total > warm
        and all(r["rss_growth"] < RSS_GROWTH_MAX and not r["leaks"] for r in instances.values()),
    }  # fmt: skip


def _print(report: dict[str, Any]) -> None:
    print(f"requests {report['requests']} ({report['requests_main_run']} in the main run, "
          f"{report['requests_per_s']}/s), by kind {report['by_kind']}")
    print(f"errors {report['errors']}, token mismatches {report['mismatches']}, latency p50 "
          f"{report['latency_s'].get('p50', 0):.2f} s p99 {report['latency_s'].get('p99', 0):.2f} s")
    for line in report["first_errors"] + report["first_mismatches"]:
        print(f"  {line}")
    counts = ("processes", "rss_mib", *LEAK_COUNTS, "nixl_registered_bytes", "nixl_agents")
    print("per instance: after warm-up / after the first half / at the end")
    for name, r in report["instances"].items():
        print(f"{name}: RSS {100 * r['rss_growth']:+.2f} % over the main run"
              + (f"; LEAKS over the second half {r['leaks']}" if r["leaks"] else "; nothing grew over the second half"))
        for c in counts:
            print(f"    {c:22s} {r['before'][c]:>14.1f} {r['mid'][c]:>14.1f} {r['after'][c]:>14.1f}")
    print("PASS" if report["passed"] else "FAIL")


def _run(args: argparse.Namespace) -> int:
    from qroute.ops.cluster_cli import model_dir_or_tiny
    from qroute.ops.demo_core import default_corpus

    corpus = Path(args.corpus).resolve() if args.corpus else default_corpus()
    spec = SoakSpec(corpus_dir=corpus, model_dir=model_dir_or_tiny(args.model_dir),
                    minutes=args.minutes, warmup_s=args.warmup_s, concurrency=args.concurrency,
                    instances=args.instances, replicas=args.replicas, transport=args.transport,
                    max_tokens=args.max_tokens, base_port=args.base_port)  # fmt: skip
    report = run_soak(spec, log=(lambda *_: None) if args.json else print)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0 if report["passed"] else 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    from qroute.bench import bench_group

    parser = bench_group(sub).add_parser(
        "soak", help="a cluster under full concurrency for a long time: errors, wrong tokens, leaks")
    parser.add_argument("--corpus", help="corpus directory (default: the demo's corpus)")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--transport", choices=CLUSTER_TRANSPORTS, default="nixl+tcp")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--base-port", type=int, default=8900)
    parser.add_argument("--model-dir")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run)
