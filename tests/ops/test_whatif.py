"""``qroute whatif``: the cluster-scale predictions are assembled from the cost model's own terms as documented
(shares, bytes, sessions), degenerate where they must be, and the sweep's crossing agrees with its rows."""

import math
from pathlib import Path

import pytest

from qroute.core.costmodel import Workload, costs, load_fabric
from qroute.core.geometry import geometry_from_config
from qroute.ops.whatif import Scenario, predict, sweep_topk

MODELS = Path(__file__).parents[2] / "configs" / "models"


@pytest.fixture(scope="module")
def geometry():
    return geometry_from_config(MODELS / "deepseek-v3.2.json")


def test_one_instance_has_nothing_remote(geometry):
    fabric = load_fabric("ibgda-cx7")
    r = predict(geometry, fabric, Scenario(instances=1, corpus_tokens=100_000, topk=16, concurrency=4))
    local = fabric.compute_us(4, geometry.num_heads, 16 * 64) * geometry.num_layers / 1e3
    assert r["step_ms"]["route"] == r["step_ms"]["fetch"] == pytest.approx(local)
    assert r["bytes_per_decoded_token"]["route"] == r["bytes_per_decoded_token"]["fetch"] == 0


def test_terms_follow_the_geometry_and_the_owner_predicate(geometry):
    fabric = load_fabric("ibgda-cx7")
    s = Scenario(instances=8, corpus_tokens=2_000_000, topk=32, concurrency=16)
    r = predict(geometry, fabric, s)
    share = math.ceil(32 * 64 / 8)
    assert r["owner_share_tokens"] == share
    per_head = geometry.query_row_bytes + geometry.return_row_bytes
    assert r["bytes_per_decoded_token"]["route"] == 7 * geometry.num_heads * per_head * geometry.num_layers
    fetched = 7 * share * geometry.latent_bytes_per_token * geometry.num_layers
    assert r["bytes_per_decoded_token"]["fetch"] == fetched / 16  # the 16 requests share the blocks read
    owner = costs(geometry, fabric, Workload(batch=16, heads=geometry.num_heads, tokens=share, block_size=64))
    assert r["owner_decision"] == owner.decision.value
    assert r["step_ms"]["auto"] == r["step_ms"][owner.decision.value]
    corpus = 2_000_000 * geometry.latent_bytes_per_token_all_layers
    assert r["corpus_gb"] == corpus / 1e9 and not r["corpus_fits_one_instance"]
    session = 4096 * geometry.latent_bytes_per_token_all_layers
    assert r["sessions_per_instance"] == {"stock": 0, "qroute": math.floor((40e9 - corpus / 8) / session)}


def test_the_crossing_is_the_first_top_k_where_route_is_faster(geometry):
    fabric = load_fabric("h100-nvlink")
    sweep = sweep_topk(geometry, fabric, Scenario(instances=4, corpus_tokens=500_000, topk=1, concurrency=64),
                       [2**i for i in range(12)])  # fmt: skip
    rows = sweep["by_topk"]
    crossing = sweep["route_faster_from_topk"]
    for k, ms in rows.items():
        if crossing is None or int(k) < crossing:
            assert ms["route"] >= ms["fetch"], (k, ms)
    if crossing is not None:
        assert rows[str(crossing)]["route"] < rows[str(crossing)]["fetch"]


def test_bad_scenarios_are_refused():
    with pytest.raises(ValueError, match="replicas"):
        Scenario(instances=2, corpus_tokens=10, topk=1, concurrency=1, replicas=3)
    with pytest.raises(ValueError, match=">= 1"):
        Scenario(instances=0, corpus_tokens=10, topk=1, concurrency=1)


def test_the_cli_writes_its_plot(tmp_path):
    from qroute.ops.cli import main

    out = tmp_path / "whatif.png"
    assert main(["whatif", "--model", str(MODELS / "glm-5.1.json"), "--fabric", "h100-nvlink", "--instances", "4",
                 "--corpus-tokens", "1000000", "--topk", "16", "--concurrency", "8", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
