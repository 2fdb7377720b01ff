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
from qroute.numerics.attention import AttentionParams
from qroute.numerics.rowformat import RowFormat

SECRET = b"links-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mesh():
    instances = {"a": f"127.0.0.1:{_free_port()}", "b": f"127.0.0.1:{_free_port()}"}
    directory = build_directory("c", np.arange(200), instances=["a", "b"], model_fingerprint="f" * 32,
                                blocks_per_chunk=2)  # fmt: skip
    params = AttentionParams(0.1, 512, torch.ones(32), True)
    made: list[OwnerLinks] = []

    def make(name: str, connected: list) -> OwnerLinks:
        config = QRouteConfig.from_extra_config({"instance_id": name, "instances": instances, "timeout_s": 1.0,
                                                 "corpus": {"name": "c", "path": "/unused"}})  # fmt: skip
        rows = shard_layout(directory, name)
        num = sum(n for _, n in rows.values())
        shard = CorpusShard(directory, name, [torch.zeros(num, 576)], rows, RowFormat("float32", 512, 64))
        service = OwnerService({"c": shard}, params, instance_id=name, model_fingerprint="f" * 32, secret=SECRET)
        links = OwnerLinks(config, service, directory, compat=compat_for("f" * 32, directory, 576, torch.float32),
                           on_connect=lambda peer, conn: connected.append(peer))  # fmt: skip
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
