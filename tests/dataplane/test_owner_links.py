"""qroute.dataplane.owner_links over real TCP: owners on their configured ports, peers that start late,
bounded waits, and reconnection after a peer restarts. Engine-free (runs without vLLM)."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch

from qroute.core.config import QRouteConfig
from qroute.core.placement import build_directory
from qroute.dataplane.owner import OwnerService
from qroute.dataplane.owner_links import OwnerLinks
from qroute.dataplane.shard import CorpusShard, compat_for, shard_layout
from qroute.errors import ConfigError
from qroute.numerics.attention import AttentionParams
from qroute.numerics.rowformat import RowFormat

SECRET = b"links-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _links(name: str, instances: dict, directory, on_connect, timeout_s: float) -> OwnerLinks:
    """Instance ``name``'s links over a zero-filled shard of ``directory``."""
    config = QRouteConfig.from_extra_config({"instance_id": name, "instances": instances, "timeout_s": timeout_s,
                                             "corpus": {"name": "c", "path": "/unused"}})  # fmt: skip
    rows = shard_layout(directory, name)
    num = sum(n for _, n in rows.values())
    shard = CorpusShard(directory, name, [torch.zeros(num, 576)], rows, RowFormat("float32", 512, 64))
    params = AttentionParams(0.1, 512, torch.ones(32), True)
    service = OwnerService({"c": shard}, params, instance_id=name, model_fingerprint="f" * 32, secret=SECRET)
    return OwnerLinks(config, service, directory, compat=compat_for("f" * 32, directory, 576, "float32"),
                      on_connect=on_connect)  # fmt: skip


@pytest.fixture
def mesh():
    instances = {"a": f"127.0.0.1:{_free_port()}", "b": f"127.0.0.1:{_free_port()}"}
    directory = build_directory("c", np.arange(200), instances=["a", "b"], model_fingerprint="f" * 32,
                                blocks_per_chunk=2)  # fmt: skip
    made: list[OwnerLinks] = []

    def make(name: str, connected: list) -> OwnerLinks:
        links = _links(name, instances, directory, lambda peer, conn, *_: connected.append(peer), 1.0)
        made.append(links)
        return links

    yield instances, make
    for links in made:
        links.close()


def test_owners_listen_on_their_ports_and_find_late_peers(mesh):
    instances, make = mesh
    seen_a: list[str] = []
    a = make("a", seen_a)
    assert a.start() == instances["a"]
    assert a.wait_for([("b",)], 0.3) == [("b",)]  # b is not up: bounded wait, then reported missing
    assert a.wait_for([("a",)], 0.0) == []  # an instance never waits for itself
    b = make("b", [])
    b.start()
    assert a.wait_for([("b",)], 10.0) == [] and seen_a == ["b"]


def test_reconnect_after_a_peer_restarts(mesh):
    instances, make = mesh
    seen_a: list[str] = []
    a, b = make("a", seen_a), make("b", [])
    a.start()
    b.start()
    assert a.wait_for([("b",)], 10.0) == []
    b.close()
    a.reconnect("b")
    assert a.wait_for([("b",)], 0.0) == []  # reached before: a lost peer never holds a step up
    b2 = make("b", [])
    b2.start()  # same configured port
    for _ in range(100):
        if seen_a == ["b", "b"]:
            break
        time.sleep(0.1)
    assert seen_a == ["b", "b"]


def test_two_transports_at_once_each_peer_over_the_faster_link(tmp_path):
    """a and b serve NIXL and TCP, c TCP only: a reaches b over both, keeps the one whose probed round trip is lower
    and closes the other; it reaches c over TCP. Real transports, three meshes in this process."""
    pytest.importorskip("nixl")
    ports = {name: (_free_port(), _free_port()) for name in "abc"}
    instances = {"a": [f"nixl://127.0.0.1:{ports['a'][0]}", f"tcp://127.0.0.1:{ports['a'][1]}"],
                 "b": [f"nixl://127.0.0.1:{ports['b'][0]}", f"tcp://127.0.0.1:{ports['b'][1]}"],
                 "c": f"tcp://127.0.0.1:{ports['c'][1]}"}  # fmt: skip
    directory = build_directory("c", np.arange(300), instances=list(instances), model_fingerprint="f" * 32,
                                blocks_per_chunk=2)  # fmt: skip
    connected: dict[str, list] = {name: [] for name in instances}
    made: list[OwnerLinks] = []
    try:
        for name in instances:
            links = _links(name, instances, directory, lambda *args, seen=connected[name]: seen.append(args), 2.0)
            made.append(links)
            links.start()
        a = made[0]
        assert a.wait_for([("b",), ("c",)], 20.0) == []
        assert set(a.link_round_trips["b"]) == {"nixl", "tcp"} and set(a.link_round_trips["c"]) == {"tcp"}
        trips = a.link_round_trips["b"]
        assert a.link_transports["b"] == min(trips, key=trips.get) and a.link_transports["c"] == "tcp"
        by_peer = {peer: (conn, fabric, probed) for peer, conn, fabric, probed in connected["a"]}
        conn_b, fabric_b, probed_b = by_peer["b"]
        assert fabric_b.name == f"loopback-{a.link_transports['b']}"  # priced over the kept link's transport
        assert probed_b.probe_us == pytest.approx(trips[a.link_transports["b"]])
        assert by_peer["c"][1].name == "loopback-tcp"
        assert conn_b.region_sizes  # the kept connection works; the other was closed
    finally:
        for links in made:
            links.close()


def test_peers_without_a_common_transport_are_refused_at_start():
    instances = {"a": "nixl://127.0.0.1:7001", "b": "tcp://127.0.0.1:7002"}
    config = QRouteConfig.from_extra_config({"instance_id": "a", "instances": instances,
                                             "corpus": {"name": "c", "path": "/unused"}})  # fmt: skip
    directory = build_directory("c", np.arange(100), instances=["a", "b"], model_fingerprint="f" * 32)
    with pytest.raises(ConfigError, match="no transport reaches it"):
        OwnerLinks(config, None, directory, compat="x", on_connect=lambda *_: None)
