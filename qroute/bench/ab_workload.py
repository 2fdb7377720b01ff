"""The A/B workload: many agents over one codebase, and the client that drives it through an OpenAI endpoint.

A workload is ``sessions`` concurrent sessions, session ``i`` asking question ``i mod len(questions)`` about the
corpus and decoding exactly ``max_tokens`` tokens (greedy), arriving ``arrival_rate`` per second (0: all at once).
A workload file is JSONL in ``vllm bench serve``'s custom-dataset shape, ``{"prompt": QUESTION, "output_tokens":
N}`` per line, so the same file drives either harness (docs/ab.md). Each session is one streamed completion with
the official ``openai`` client; what it records is its TTFT, its inter-token gaps and its token ids.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qroute.errors import ConfigError

__all__ = ["SessionResult", "Workload", "drive", "latency_summary", "percentiles", "warm_up"]

DEFAULT_QUESTIONS = (
    "Which function opens a connection, and what does it return?",
    "Where are adapters for new types registered?",
    "What does the row factory change about fetched rows?",
    "How is a date converted when it is read back?",
)


@dataclass(frozen=True)
class Workload:
    questions: tuple[str, ...] = DEFAULT_QUESTIONS
    sessions: int = 8
    max_tokens: int = 32
    arrival_rate: float = 0.0  # sessions per second; 0: all at once

    def __post_init__(self) -> None:
        if not self.questions or self.sessions < 1 or self.max_tokens < 2 or self.arrival_rate < 0:
            raise ConfigError(f"a workload needs questions, sessions >= 1, max_tokens >= 2 and arrival_rate >= 0: "
                              f"{self}")  # fmt: skip

    @classmethod
    def from_jsonl(cls, path: Path, *, sessions: int | None = None, arrival_rate: float = 0.0) -> Workload:
        """``vllm bench serve``'s custom-dataset JSONL: one session per line unless ``sessions`` says otherwise;
        every line's ``output_tokens`` must agree (the harness compares equal-length outputs)."""
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if not rows or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
            raise ConfigError(f"{path}: every line must be a JSON object with a string 'prompt'")
        lengths = {int(r.get("output_tokens", 32)) for r in rows}
        if len(lengths) != 1:
            raise ConfigError(f"{path}: every line needs the same output_tokens, got {sorted(lengths)}")
        return cls(tuple(r["prompt"] for r in rows), sessions or len(rows), lengths.pop(), arrival_rate)


@dataclass
class SessionResult:
    session: int
    question: int
    endpoint: str
    ttft_s: float = float("nan")
    gaps_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    started_s: float = 0.0  # since the run's start
    first_token_s: float = 0.0
    ended_s: float = 0.0
    error: str | None = None

    @property
    def tpot_s(self) -> float:
        """(end - first token) / (tokens - 1), as ``vllm bench serve`` counts it: tokens a stream delivers together
        do not make it look faster."""
        if len(self.tokens) < 2:
            return float("nan")
        return (self.ended_s - self.first_token_s) / (len(self.tokens) - 1)


def _one(client, prompt: list[int], max_tokens: int, extra: dict, result: SessionResult, t0: float) -> None:
    from qroute.ops.http_client import token_ids_of

    start = time.perf_counter()
    result.started_s = start - t0
    last = None
    body = {"return_tokens_as_token_ids": True, "min_tokens": max_tokens, **extra}
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                       logprobs=1, stream=True, extra_body=body)  # fmt: skip
    for chunk in stream:
        if not chunk.choices or chunk.choices[0].logprobs is None or not chunk.choices[0].logprobs.tokens:
            continue
        now = time.perf_counter()
        new = token_ids_of(chunk.choices[0].logprobs.tokens)
        if last is None:
            result.ttft_s, result.first_token_s = now - start, now - t0
        else:
            result.gaps_s.extend([(now - last) / len(new)] * len(new))
        last = now
        result.tokens += new
        result.ended_s = now - t0  # the last token's arrival


def drive(endpoints: Sequence[str], workload: Workload,
          request_for: Callable[[int], tuple[list[int], dict]]) -> list[SessionResult]:  # fmt: skip
    """Run every session of ``workload`` (session ``i`` on ``endpoints[i mod len]``); ``request_for(question)`` gives
    the prompt token ids and extra body of a question's request on this configuration."""
    from openai import OpenAI

    clients = {url: OpenAI(base_url=url, api_key="qroute-bench", max_retries=0, timeout=1800.0) for url in endpoints}
    results = [SessionResult(i, i % len(workload.questions), endpoints[i % len(endpoints)])
               for i in range(workload.sessions)]  # fmt: skip
    t0 = time.perf_counter()

    def session(result: SessionResult) -> None:
        if workload.arrival_rate:
            time.sleep(max(0.0, result.session / workload.arrival_rate - (time.perf_counter() - t0)))
        prompt, extra = request_for(result.question)
        try:
            _one(clients[result.endpoint], prompt, workload.max_tokens, extra, result, t0)
        except Exception as exc:  # noqa: BLE001 - a failed session is reported, the others go on
            result.error = f"{type(exc).__name__}: {exc}"[:300]

    threads = [threading.Thread(target=session, args=(r,)) for r in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def warm_up(endpoints: Sequence[str], questions: Sequence[str], request_for: Callable[[int], tuple[list[int], dict]]
            ) -> None:  # fmt: skip
    """One short request per endpoint, not counted: an instance's first request also connects it to its peers."""
    drive(endpoints, Workload(tuple(questions[:1]), len(endpoints), 2), request_for)


def percentiles(values: Sequence[float], scale: float = 1e3) -> dict[str, float]:
    """p50 / p90 / p99 of ``values`` times ``scale`` (seconds to milliseconds by default), nearest rank."""
    ordered = sorted(v for v in values if v == v)
    if not ordered:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    def pick(q: float) -> float:  # the ceil(q * n)-th smallest (rounded first: 0.9 * 100 is 90.00000000000001)
        return ordered[max(0, math.ceil(round(q * len(ordered), 9)) - 1)]

    return {f"p{round(q * 100)}": round(pick(q) * scale, 3) for q in (0.5, 0.9, 0.99)}


def latency_summary(results: Sequence[SessionResult]) -> dict[str, object]:
    """TTFT, TPOT (per session) and ITL (every gap) percentiles in ms, and output throughput in tokens/s."""
    done = [r for r in results if r.error is None]
    tokens = sum(len(r.tokens) for r in done)
    span = max((r.ended_s for r in done), default=0.0) - min((r.started_s for r in done), default=0.0)
    return {
        "ttft_ms": percentiles([r.ttft_s for r in done]),
        "tpot_ms": percentiles([r.tpot_s for r in done]),
        "itl_ms": percentiles([g for r in done for g in r.gaps_s]),
        "throughput_tok_s": round(tokens / span, 2) if span > 0 else float("nan"),
        "decoded_tokens": tokens,
        "errors": [r.error for r in results if r.error is not None],
    }
