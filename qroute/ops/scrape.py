"""Reading qroute's series from a ``vllm serve`` instance's ``/metrics`` (Prometheus text format), as a scraper
would: for ``qroute check``, ``qroute status`` and the tests that check the exported counts."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Mapping

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Samples", "delta", "scrape", "total", "wait_for"]

# (sample name, its labels but vLLM's model_name and engine, sorted) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
_ENGINE_LABELS = ("model_name", "engine")


def scrape(url: str, *, prefix: str = "vllm:qroute_", timeout_s: float = 10.0) -> Samples:
    """The samples of ``url``'s ``/metrics`` (``url`` ends in ``/v1`` or not) whose names start with ``prefix``,
    summed over vLLM's engine labels."""
    base = url.removesuffix("/").removesuffix("/v1")
    with urllib.request.urlopen(base + "/metrics", timeout=timeout_s) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in _ENGINE_LABELS))
                key = (sample.name, labels)
                samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def total(samples: Mapping, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(value for (sample, have), value in samples.items()
               if sample == name and set(labels.items()) <= set(have))  # fmt: skip


def delta(after: Samples, before: Samples) -> Samples:
    """What each series gained between two scrapes (series new in ``after`` count from 0)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def wait_for(read: Callable[[], Samples], done: Callable[[Samples], bool], timeout_s: float = 15.0) -> Samples:
    """``read()`` again until ``done`` holds of it or ``timeout_s`` passes; the last read either way. An engine
    step's stats reach the API server just after that step's tokens, so a scrape right after a response may lag
    it by a step."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = read()
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.25)
