"""qroute's Prometheus series: a real router and owners over loopback, sampled as vLLM's connector-stats path samples
them after each step, exported into a registry of the test's own and read back in the Prometheus text format.
(The same series on a real ``vllm serve``'s /metrics: tests/ops/test_cluster_check.py.)"""

import dataclasses
import functools
import types

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qroute.connectors.vllm_stats import QRouteConnectorStats, QRoutePromMetrics, StatsSampler
from qroute.core.costmodel import Decision
from qroute.dataplane.peering import connect_owners, serve_owner
from qroute.ops.scrape import Samples
from qroute.transport.loopback import LoopbackTransport
from tests.dataplane.test_router import SECRET, make_router, prepared, random_queries  # noqa: F401 - fixture

ENGINE = ["tiny", "0"]  # vLLM's model_name and engine label values


@pytest.fixture
def owners(prepared):  # noqa: F811 - the imported fixture
    """Owners b and c on loopback, their services kept so that their stats can be read."""
    transport = LoopbackTransport()
    services = {name: prepared.owner_service(name, SECRET) for name in ("b", "c")}
    servers = {name: serve_owner(transport, service) for name, service in services.items()}
    addresses = {name: server.start() for name, server in servers.items()}
    connections = connect_owners(
        transport, addresses, instance_id="a", directory=prepared.directory,
        model_fingerprint=prepared.fingerprint, compat=prepared.compat, secret=SECRET,
    )  # fmt: skip
    yield services, connections
    for connection in connections.values():
        connection.close()
    for server in servers.values():
        server.stop()


def export(*intervals: dict) -> Samples:
    """The intervals observed by qroute's Prometheus metrics in a fresh registry, read back as a scraper would."""
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    metric_types = {kind: functools.partial(kind, registry=registry) for kind in (Counter, Gauge, Histogram)}
    config = types.SimpleNamespace(kv_transfer_config=None)  # all the base class reads of a VllmConfig
    prom = QRoutePromMetrics(config, metric_types, ["model_name", "engine"], {0: ENGINE})
    for data in intervals:
        prom.observe(data, 0)
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            assert s.labels.get("model_name") == "tiny", s
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine")))
            samples[(s.name, labels)] = s.value
    return samples


def run_layers(router, prepared, mode=None, layers=2):  # noqa: F811
    q_nope, q_pe = random_queries(prepared)
    plan = router.plan(q_nope.shape[0], mode=mode)
    for layer in range(layers):
        router.run(layer, q_nope, q_pe, plan)
    return plan


def test_exported_counts_equal_what_the_router_and_owners_did(prepared, owners):  # noqa: F811
    services, connections = owners
    router = make_router(prepared, connections, mode="route")
    sampler = StatsSampler(router.stats, services["b"].stats, lambda: {"b": True, "c": False})
    run_layers(router, prepared, "route")
    first = sampler.take()
    run_layers(router, prepared, "fetch")
    second = sampler.take()
    samples = export(first, second)

    stats = router.stats.snapshot()
    for kind in ("route", "fetch", "local"):
        exported = sum(v for (name, labels), v in samples.items()
                       if name == "vllm:qroute_corpus_parts_total" and ("decision", kind) in labels)  # fmt: skip
        assert exported == stats[kind] > 0, kind
    for owner in ("b", "c"):  # per owner: the router's counts carried that owner's label
        assert samples[("vllm:qroute_corpus_parts_total", (("decision", "route"), ("owner", owner)))] \
            == stats.labelled["route"][owner] > 0
        assert samples[("vllm:qroute_bytes_moved_total", (("owner", owner),))] == stats.labelled["bytes_moved"][owner]
    assert samples[("vllm:qroute_corpus_parts_total", (("decision", "local"), ("owner", "a")))] == stats["local"]
    assert sum(v for (n, _), v in samples.items() if n == "vllm:qroute_bytes_moved_total") == stats["bytes_moved"]
    # every route and fetch observed once, by the fabric of its link and its kind
    assert samples[("vllm:qroute_round_trip_seconds_count", (("fabric", "loopback-tcp"), ("kind", "route")))] \
        == stats["route"]
    assert samples[("vllm:qroute_round_trip_seconds_count", (("fabric", "loopback-tcp"), ("kind", "fetch")))] \
        == stats["fetch"]
    # the owner side: b's answers, one attention each (the calls came one at a time)
    owner = services["b"].stats.snapshot()
    assert samples[("vllm:qroute_owner_routes_total", ())] == owner["routes"] == stats.labelled["route"]["b"]
    assert samples[("vllm:qroute_owner_batch_size_count", ())] == owner["route_batches"]
    assert samples[("vllm:qroute_owner_bytes_total", (("direction", "in"),))] == owner["bytes_in"] > 0
    assert samples[("vllm:qroute_peer_up", (("peer", "b"),))] == 1.0
    assert samples[("vllm:qroute_peer_up", (("peer", "c"),))] == 0.0


def test_an_interval_without_change_exports_nothing_new(prepared, owners):  # noqa: F811
    services, connections = owners
    router = make_router(prepared, connections, mode="route")
    sampler = StatsSampler(router.stats, services["b"].stats, dict)
    run_layers(router, prepared)
    assert sampler.take()["counters"]
    idle = sampler.take()
    assert idle == {"counters": {}, "observed": {}, "gauges": {}}
    assert QRouteConnectorStats(idle).is_empty()


def test_workers_stats_aggregate_by_adding_counts_and_merging_observations(prepared, owners):  # noqa: F811
    services, connections = owners
    one, two = (make_router(prepared, connections, mode="route") for _ in range(2))
    samplers = [StatsSampler(r.stats, services["b"].stats, dict) for r in (one, two)]
    run_layers(one, prepared)
    run_layers(two, prepared, layers=1)
    merged = QRouteConnectorStats(samplers[0].take()).aggregate(QRouteConnectorStats(samplers[1].take()))
    samples = export(merged.data)
    routes = sum(v for (n, labels), v in samples.items()
                 if n == "vllm:qroute_corpus_parts_total" and ("decision", "route") in labels)  # fmt: skip
    assert routes == one.stats["route"] + two.stats["route"]
    assert merged.reduce()["route"] == routes


def test_mispredictions_count_parts_slower_than_the_rejected_prediction(prepared, owners):  # noqa: F811
    """A predicted part is mispredicted when it took longer than the mode it beat was predicted to take."""
    _, connections = owners
    router = make_router(prepared, connections, mode="auto")
    q_nope, q_pe = random_queries(prepared)
    plan = router.plan(q_nope.shape[0])
    remote = [p for p in plan.parts if p.decision is not Decision.LOCAL]
    assert remote and all(p.alternative_us is not None for p in remote)  # auto: the predicate chose each
    # one part with a rejected mode predicted free (any measured time exceeds it), the others never beaten
    parts = [dataclasses.replace(p, alternative_us=0.0 if p is remote[0] else 1e12) if p in remote else p
             for p in plan.parts]  # fmt: skip
    router.run(0, q_nope, q_pe, dataclasses.replace(plan, parts=tuple(parts)))
    stats = router.stats.snapshot()
    assert stats["predictions"] == len(remote)
    assert stats["mispredictions"] == 1
    assert stats.labelled["mispredictions"] == {remote[0].decision.value: 1}
    forced = router.plan(q_nope.shape[0], mode="route")  # a forced mode is no prediction
    assert all(p.alternative_us is None for p in forced.parts)


def test_the_grafana_dashboard_queries_only_exported_series():
    import json
    import re
    from pathlib import Path

    from qroute.connectors.vllm_stats import SERIES

    dashboard = json.loads((Path(__file__).parents[2] / "examples" / "grafana-qroute.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {re.sub(r"_(total|bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"vllm:qroute_\w+", e)}
    assert names and names <= set(SERIES), names - set(SERIES)
    assert len(names) >= 10  # every group of series has a panel
