"""One stats type for every qroute component: router, owner, transport server and block cache.

A ``Metrics`` holds named integer counters, named timings (recent durations in seconds, bounded) and the
latest error texts, all updated under one lock from any thread. Each component declares its names once
(``ROUTER``, ``OWNER``, ...); an undeclared name is a programming error (``KeyError``), so that an
exporter can rely on a fixed set of series. ``snapshot()`` returns a frozen, JSON-ready copy: what
``qroute status``, the benchmarks and a Prometheus exporter read (counters map to Prometheus counters,
timings to summaries with count, sum, median and p99).

Engine-free and torch-free: every layer may import it.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["CACHE", "OWNER", "ROUTER", "SERVER", "Metrics", "MetricsSnapshot", "Schema"]

TIMINGS_KEPT = 8192  # recent durations kept per timing (median and p99 are over these)
ERRORS_KEPT = 64  # latest error texts kept, for logs and `qroute status`


@dataclass(frozen=True)
class Schema:
    """The names one component counts and times."""

    component: str
    counters: tuple[str, ...]
    timings: tuple[str, ...] = ()


# Requester side: owner-group operations by kind, fallbacks taken, bytes moved over the fabric.
ROUTER = Schema("router", ("route", "fetch", "local", "fallbacks", "bytes_moved"), ("route_s", "fetch_s"))
# Owner side: requests answered by kind, payload bytes in and out, refusals by error code (``error:<code>``).
OWNER = Schema("owner", ("routes", "route_batches", "bytes_in", "bytes_out"), ("route_handle_s",))
# Transport server: connections and calls; ``reads`` stays 0 where reads bypass the owner's CPU (NIXL).
SERVER = Schema("server", ("connections", "open_connections", "handshake_failures", "calls", "handler_errors",
                           "refused", "protocol_errors", "reads", "read_bytes"))  # fmt: skip
# Block cache of fetched rows.
CACHE = Schema("cache", ("hits", "misses", "inserts", "evictions"))


@dataclass(frozen=True)
class MetricsSnapshot:
    """A point-in-time copy. ``counters[name]`` (also ``snapshot[name]``); ``errors``: counts by label."""

    component: str
    counters: Mapping[str, int]
    timings: Mapping[str, tuple[float, ...]]
    errors: Mapping[str, int]
    recent_errors: tuple[str, ...]

    def __getitem__(self, name: str) -> int:
        return self.counters[name]

    def timing_us(self, name: str) -> dict[str, float | int | None]:
        """``count``, ``median_us`` and ``p99_us`` (nearest rank) of the kept durations of ``name``."""
        times = sorted(self.timings[name])
        if not times:
            return {"count": 0, "median_us": None, "p99_us": None}
        p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
        return {"count": len(times), "median_us": statistics.median(times) * 1e6, "p99_us": p99 * 1e6}

    def as_dict(self) -> dict:
        """JSON-ready: counters, timing summaries in microseconds, error counts."""
        return {
            **self.counters,
            **{name: self.timing_us(name) for name in self.timings},
            "errors": dict(self.errors),
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

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n  # KeyError for an undeclared name

    def add_many(self, values: Mapping[str, int]) -> None:
        with self._lock:
            for name, n in values.items():
                self._counters[name] += n

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self._timings[name].append(seconds)

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

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(
                self.schema.component,
                dict(self._counters),
                {name: tuple(times) for name, times in self._timings.items()},
                dict(self._errors),
                tuple(self._recent),
            )
