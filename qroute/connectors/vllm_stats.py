"""qroute's Prometheus metrics, exported through vLLM's own ``/metrics`` by vLLM's KV-connector stats path.

That path (vLLM 0.32, ``distributed/kv_transfer/kv_connector/v1/metrics.py``): after each engine step the model
runner asks the worker's connector for ``get_kv_connector_stats()``; the engine core sums the workers' stats
(``aggregate``) into its ``SchedulerStats`` and sends them to the API server, whose Prometheus logger passes them to
the connector class's ``build_prom_metrics(...).observe(data, engine_idx)``. qroute's series are therefore in the
same registry as vLLM's, named ``vllm:qroute_*``, with vLLM's ``model_name`` and ``engine`` labels first.

A worker's stats are what changed since its previous step (``StatsSampler``): labelled counts of the router's and
the owner's ``qroute.metrics.Metrics`` as differences, their observations drained, and a gauge per peer. Owner-side
series (what this instance answered for its peers) are sampled at this instance's own steps: the routes an idle
instance answers appear at its next step. Aggregation: counters add and histograms merge, across workers of an
engine (``aggregate``) and, in PromQL, across engines and instances (``sum by (owner)``); a gauge is the last value
sent (qroute runs one worker per engine: tensor parallel size 1).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from qroute.metrics import Metrics
from qroute.transport.nixl_agent import live_counts

__all__ = ["SERIES", "QRouteConnectorStats", "QRoutePromMetrics", "Series", "StatsSampler", "series_key"]

_SECONDS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Series:
    """One exported metric: Prometheus name, kind, help text, its own labels (after vLLM's), histogram buckets."""

    name: str
    kind: type[Counter] | type[Gauge] | type[Histogram]
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


SERIES = {s.name: s for s in (
    Series("vllm:qroute_corpus_parts", Counter, "Owner-layer corpus parts this instance attended, by owner of the "
           "blocks and decision (local: its own rows, or the owner's rows from the block cache).",
           ("owner", "decision")),
    Series("vllm:qroute_bytes_moved", Counter, "Bytes this instance moved to attend to an owner's blocks (route "
           "request and reply, or the rows fetched).", ("owner",)),
    Series("vllm:qroute_fallbacks", Counter, "Corpus parts that failed at this owner and went to the next replica "
           "or to a fetch.", ("owner",)),
    Series("vllm:qroute_deadline_misses", Counter, "Routes or fetches to this owner that ran past timeout_s.",
           ("owner",)),
    Series("vllm:qroute_predictions", Counter, "Corpus parts decided by the cost model's predicate (mode auto).",
           ("decision",)),
    Series("vllm:qroute_mispredictions", Counter, "Predicted parts whose measured time exceeded the time predicted "
           "for the mode the predicate rejected.", ("decision",)),
    Series("vllm:qroute_round_trip_seconds", Histogram, "Round trip of one route (owner compute included) or one "
           "fetch read, by fabric of the link.", ("fabric", "kind"), _SECONDS),
    Series("vllm:qroute_part_seconds", Histogram, "Time of one corpus part as this instance waited for it, by "
           "decision.", ("decision",), _SECONDS),
    Series("vllm:qroute_owner_routes", Counter, "Route requests this instance answered as an owner."),
    Series("vllm:qroute_owner_bytes", Counter, "Route payload bytes this instance received and sent as an owner.",
           ("direction",)),
    Series("vllm:qroute_owner_refusals", Counter, "Route requests this instance refused as an owner, by error "
           "code.", ("code",)),
    Series("vllm:qroute_owner_batch_size", Histogram, "Route requests answered by one attention as an owner.",
           (), _SIZES),
    Series("vllm:qroute_owner_queue_depth", Histogram, "Calls the transport handed the owner together.", (), _SIZES),
    Series("vllm:qroute_owner_handle_seconds", Histogram, "Owner time per route request (decode, attention, "
           "encode).", (), _SECONDS),
    Series("vllm:qroute_peer_up", Gauge, "1 while this instance can route to and read from the peer, else 0.",
           ("peer",)),
    Series("vllm:qroute_nixl_live", Gauge, "What the worker holds in NIXL now: registrations, registered_bytes, "
           "xfer_handles, remote_agents; agents: created so far (a leak is a count that keeps growing).",
           ("what",)),
)}  # fmt: skip


def series_key(name: str, *labels: str) -> str:
    """The key of one labelled series in the stats data (JSON: labels may hold any character)."""
    return json.dumps([name, *labels])


_PARTS = ("route", "fetch", "local")  # router counters by owner -> vllm:qroute_corpus_parts{owner, decision}
_BY_OWNER = {"bytes_moved": "vllm:qroute_bytes_moved", "fallbacks": "vllm:qroute_fallbacks",
             "deadline_misses": "vllm:qroute_deadline_misses"}  # fmt: skip
_BY_DECISION = {"predictions": "vllm:qroute_predictions", "mispredictions": "vllm:qroute_mispredictions"}
_ROUTER_OBSERVED = {"route_s": ("vllm:qroute_round_trip_seconds", lambda fabric: (fabric, "route")),
                    "fetch_s": ("vllm:qroute_round_trip_seconds", lambda fabric: (fabric, "fetch")),
                    "part_s": ("vllm:qroute_part_seconds", lambda decision: (decision,))}  # fmt: skip
_OWNER_OBSERVED = {"batch_size": "vllm:qroute_owner_batch_size", "queue_depth": "vllm:qroute_owner_queue_depth",
                   "route_handle_s": "vllm:qroute_owner_handle_seconds"}  # fmt: skip


class StatsSampler:
    """What changed in a router's and an owner's ``Metrics`` since the last ``take``, as connector stats data."""

    def __init__(self, router: Metrics, owner: Metrics, peers_up: Callable[[], Mapping[str, bool]]):
        self.router, self.owner, self.peers_up = router, owner, peers_up
        self._last: dict[str, int] = {}  # series key -> cumulative count at the last take
        self._last_gauges: dict[str, float] = {}

    def _cumulative(self) -> dict[str, int]:
        router, owner = self.router.snapshot(timings=False), self.owner.snapshot(timings=False)
        totals: dict[str, int] = {}
        for kind in _PARTS:
            for instance, n in router.labelled.get(kind, {}).items():
                totals[series_key("vllm:qroute_corpus_parts", instance, kind)] = n
        for counter, name in {**_BY_OWNER, **_BY_DECISION}.items():  # labelled by owner, or by decision
            for label, n in router.labelled.get(counter, {}).items():
                totals[series_key(name, label)] = n
        totals[series_key("vllm:qroute_owner_routes")] = owner["routes"]
        for direction in ("in", "out"):
            totals[series_key("vllm:qroute_owner_bytes", direction)] = owner[f"bytes_{direction}"]
        for code, n in owner.errors.items():
            totals[series_key("vllm:qroute_owner_refusals", code)] = n
        return totals

    def take(self) -> dict[str, Any]:
        """``{"counters": {key: increase}, "observed": {key: [values]}, "gauges": {key: value}}``."""
        totals = self._cumulative()
        counters = {key: n - self._last.get(key, 0) for key, n in totals.items() if n != self._last.get(key, 0)}
        self._last = totals
        observed: dict[str, list[float]] = {}
        for name, label, value in self.router.drain_observed():
            series, labels = _ROUTER_OBSERVED[name]
            observed.setdefault(series_key(series, *labels(label or "")), []).append(value)
        for name, _, value in self.owner.drain_observed():
            observed.setdefault(series_key(_OWNER_OBSERVED[name]), []).append(value)
        gauges = {series_key("vllm:qroute_peer_up", peer): float(up) for peer, up in self.peers_up().items()}
        gauges.update({series_key("vllm:qroute_nixl_live", what): float(n) for what, n in live_counts().items()})
        changed = {key: value for key, value in gauges.items() if self._last_gauges.get(key) != value}
        self._last_gauges = gauges  # a gauge keeps its value on /metrics: only changes are sent
        return {"counters": counters, "observed": observed, "gauges": changed}


class QRouteConnectorStats(KVConnectorStats):
    """One interval of qroute's stats (``StatsSampler.take``'s data); plain dicts and lists, so serializable."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {"counters": {}, "observed": {}, "gauges": {}}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, n in other.data["counters"].items():
            self.data["counters"][key] = self.data["counters"].get(key, 0) + n
        for key, values in other.data["observed"].items():
            self.data["observed"].setdefault(key, []).extend(values)
        self.data["gauges"].update(other.data["gauges"])
        return self

    def reduce(self) -> dict[str, int | float]:
        """Totals for vLLM's periodic log line: parts by decision, bytes moved, fallbacks, deadline misses."""
        totals: dict[str, int | float] = {}
        for key, n in self.data["counters"].items():
            name, *labels = json.loads(key)
            short = name.removeprefix("vllm:qroute_")
            if name == "vllm:qroute_corpus_parts":
                short = labels[1]
            if short in ("route", "fetch", "local", "bytes_moved", "fallbacks", "deadline_misses", "owner_routes"):
                totals[short] = totals.get(short, 0) + n
        return totals

    def is_empty(self) -> bool:
        return not (self.data["counters"] or self.data["observed"] or self.data["gauges"])


class QRoutePromMetrics(KVConnectorPromMetrics):
    """The ``SERIES``, registered once per API server, and ``observe`` of one engine's interval."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):  # fmt: skip
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}
        for series in SERIES.values():
            kwargs: dict[str, Any] = {"buckets": series.buckets} if series.kind is Histogram else {}
            self._metrics[series.name] = metric_types[series.kind](
                name=series.name, documentation=series.doc, labelnames=[*labelnames, *series.labels], **kwargs)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        engine = self.per_engine_labelvalues[engine_idx]
        for key, n in transfer_stats_data.get("counters", {}).items():
            name, *labels = json.loads(key)
            self._metrics[name].labels(*engine, *labels).inc(n)
        for key, values in transfer_stats_data.get("observed", {}).items():
            name, *labels = json.loads(key)
            child = self._metrics[name].labels(*engine, *labels)
            for value in values:
                child.observe(value)
        for key, value in transfer_stats_data.get("gauges", {}).items():
            name, *labels = json.loads(key)
            self._metrics[name].labels(*engine, *labels).set(value)
