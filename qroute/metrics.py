"""One stats type for every qroute component: router, owner, transport server and block cache.

A ``Metrics`` holds named integer counters, named timings (recent observed values, bounded: durations in
seconds, or sizes such as a batch's) and the latest error texts, all updated under one lock from any thread.
Each component declares its names once (``ROUTER``, ``OWNER``, ...); an undeclared name is a programming error
(``KeyError``), so that an exporter can rely on a fixed set of series. A count or an observation may carry a
``label`` (the owner it concerns, the fabric it crossed): the total is kept as before, and per label too.
``snapshot()`` returns a frozen, JSON-ready copy: what ``qroute status`` and the benchmarks read.
``drain_observed()`` hands the observations made since its last call to one exporter (the vLLM connector's
Prometheus stats, ``qroute.connectors.vllm_stats``), which turns them into histograms.

Engine-free and torch-free: every layer may import it.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["CACHE", "OWNER", "ROUTER", "SERVER", "Metrics", "MetricsSnapshot", "Schema"]

TIMINGS_KEPT = 8192  # recent durations kept per timing (median and p99 are over these)
FRESH_KEPT = 65536  # observations kept for drain_observed between two drains (an exporter drains every step)
ERRORS_KEPT = 64  # latest error texts kept, for logs and `qroute status`


@dataclass(frozen=True)
class Schema:
    """The names one component counts and times."""

    component: str
    counters: tuple[str, ...]
    timings: tuple[str, ...] = ()


# Requester side: owner-group operations by kind, fallbacks taken, bytes moved over the fabric.
# ``deadline_misses``: owner failures that were timeouts. ``predictions``: parts the predicate decided (mode auto);
# ``mispredictions``: those whose measured time exceeded the rejected mode's predicted time. ``part_s``: a part's
# time as the requester sees it (its wait; overlapping routes absorb each other's latency).
ROUTER = Schema("router", ("route", "fetch", "local", "fallbacks", "bytes_moved", "deadline_misses", "predictions",
                           "mispredictions"), ("route_s", "fetch_s", "part_s"))  # fmt: skip
# Owner side: requests answered by kind, payload bytes in and out, refusals by error code (``error:<code>``).
# ``batch_size``: routes answered by one attention; ``queue_depth``: calls the transport handed over together.
OWNER = Schema("owner", ("routes", "route_batches", "bytes_in", "bytes_out"),
               ("route_handle_s", "batch_size", "queue_depth"))  # fmt: skip
# Transport server: connections and calls; ``reads`` stays 0 where reads bypass the owner's CPU (NIXL).
SERVER = Schema("server", ("connections", "open_connections", "handshake_failures", "calls", "handler_errors",
                           "refused", "protocol_errors", "reads", "read_bytes"))  # fmt: skip
# Block cache of fetched rows.
CACHE = Schema("cache", ("hits", "misses", "inserts", "evictions"))


@dataclass(frozen=True)
class MetricsSnapshot:
    """A point-in-time copy. ``counters[name]`` (also ``snapshot[name]``); ``labelled[name][label]``: the counts
    that carried a label; ``errors``: counts by label."""

    component: str
    counters: Mapping[str, int]
    timings: Mapping[str, tuple[float, ...]]
    errors: Mapping[str, int]
    recent_errors: tuple[str, ...]
    labelled: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return self.counters[name]

    def timing_us(self, name: str) -> dict[str, float | int | None]:
        """``count``, ``median_us`` and ``p99_us`` (nearest rank) of the kept durations of ``name``."""
        summary = self.summary(name, scale=1e6)
        return {"count": summary["count"], "median_us": summary["median"], "p99_us": summary["p99"]}

    def summary(self, name: str, *, scale: float = 1.0) -> dict[str, float | int | None]:
        """``count``, ``median`` and ``p99`` (nearest rank) of the kept values of ``name``, times ``scale``."""
        values = sorted(self.timings[name])
        if not values:
            return {"count": 0, "median": None, "p99": None}
        p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
        return {"count": len(values), "median": statistics.median(values) * scale, "p99": p99 * scale}

    def as_dict(self) -> dict:
        """JSON-ready: counters, summaries of timings (``*_s``, in microseconds) and of other values, error
        counts, and the labelled counts."""
        return {
            **self.counters,
            **{name: self.timing_us(name) if name.endswith("_s") else self.summary(name) for name in self.timings},
            "errors": dict(self.errors),
            "by_label": {name: dict(by_label) for name, by_label in self.labelled.items()},
        }


class Metrics:
    """Thread-safe counters, timings and errors of one component (see the module docstring)."""

    def __init__(self, schema: Schema, *, timings_kept: int = TIMINGS_KEPT):
        self.schema = schema
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(schema.counters, 0)
        self._timings = {name: deque(maxlen=timings_kept) for name in schema.timings}
        self._errors: dict[str, int] = {}
        self._recent: deque[str] = deque(maxlen=ERRORS_KEPT)
        self._labelled: dict[str, dict[str, int]] = {}
        self._fresh: deque[tuple[str, str | None, float]] = deque(maxlen=FRESH_KEPT)

    def add(self, name: str, n: int = 1, *, label: str | None = None) -> None:
        with self._lock:
            self._counters[name] += n  # KeyError for an undeclared name
            if label is not None:
                by_label = self._labelled.setdefault(name, {})
                by_label[label] = by_label.get(label, 0) + n

    def add_many(self, values: Mapping[str, int]) -> None:
        with self._lock:
            for name, n in values.items():
                self._counters[name] += n

    def observe(self, name: str, value: float, *, label: str | None = None) -> None:
        with self._lock:
            self._timings[name].append(value)
            self._fresh.append((name, label, value))

    def drain_observed(self) -> list[tuple[str, str | None, float]]:
        """``(name, label, value)`` of every observation since the last drain (at most ``FRESH_KEPT``)."""
        with self._lock:
            fresh = list(self._fresh)
            self._fresh.clear()
            return fresh

    def error(self, label: str, text: str = "") -> None:
        """Count one error under ``label`` (e.g. an error code or a peer) and keep its text."""
        with self._lock:
            self._errors[label] = self._errors.get(label, 0) + 1
            if text:
                self._recent.append(text)

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counters[name]

    def values(self, names: Iterable[str]) -> tuple[int, ...]:
        """Several counters read at one instant."""
        with self._lock:
            return tuple(self._counters[name] for name in names)

    def snapshot(self, *, timings: bool = True) -> MetricsSnapshot:
        """A copy of everything; ``timings=False`` leaves the kept timings out (each holds up to ``TIMINGS_KEPT``
        values: an exporter that reads the counts every engine step need not copy them)."""
        with self._lock:
            return MetricsSnapshot(
                self.schema.component,
                dict(self._counters),
                {name: tuple(times) for name, times in self._timings.items()} if timings else {},
                dict(self._errors),
                tuple(self._recent),
                {name: dict(by_label) for name, by_label in self._labelled.items()},
            )
