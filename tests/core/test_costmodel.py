import json
import math

import pytest

from qroute.core.costmodel import (
    Decision,
    FabricProfile,
    Workload,
    costs,
    crossover_tokens,
    list_fabrics,
    load_fabric,
    save_fabric,
)
from qroute.core.geometry import MODELS_DIR, geometry_from_config
from qroute.errors import ConfigError
from qroute.ops.cli import main

V32 = geometry_from_config(MODELS_DIR / "deepseek-v3.2.json")  # 656 B/token, 1152 B query, 2052 B return

# Round numbers so every term can be computed by hand below.
FABRIC = FabricProfile(
    name="hand", probe_us=10.0, bandwidth_gbps=1.0, gather_us_per_desc=2.0, splice_us=50.0,
    compute_us_fixed=3.0, compute_ns_per_token_head=1000.0, merge_us_fixed=4.0, merge_ns_per_head_row=500.0,
)


def test_terms_equal_hand_computed_values():
    # B=2, H=4, n=100, block 64: 1 GB/s is 1000 bytes per microsecond.
    c = costs(V32, FABRIC, Workload(batch=2, heads=4, tokens=100, block_size=64))
    compute = 3.0 + 1.0 * 2 * 4 * 100  # fixed + 1 ns... 1000 ns = 1 us per row-head-token
    assert c.route == pytest.approx({
        "probe": 10.0,
        "transfer": 2 * 4 * 1152 / 1000,
        "compute": compute,
        "return": 2 * 4 * 2052 / 1000,
        "merge": 4.0 + 0.5 * 8,
    })
    assert c.fetch == pytest.approx({
        "probe": 10.0,
        "transfer": 100 * 656 / 1000,
        "gather": 2.0 * 2,  # ceil(100 / 64) descriptors
        "splice": 50.0,
        "compute": compute,
    })
    assert c.local_us == pytest.approx(compute)
    assert c.route_us == pytest.approx(10 + 9.216 + compute + 16.416 + 8)
    assert c.decision is Decision.ROUTE  # route 43.6 + compute < fetch 129.6 + compute


def test_fetch_bandwidth_and_per_token_compute():
    # A separate READ bandwidth prices only the fetch's bytes; the per-token compute term is charged once
    # per selected token whatever the rows, on both sides.
    fabric = FabricProfile(
        name="split", probe_us=10.0, bandwidth_gbps=1.0, fetch_bandwidth_gbps=4.0, compute_us_fixed=3.0,
        compute_ns_per_token=2000.0, compute_ns_per_token_head=1000.0,
    )  # fmt: skip
    c = costs(V32, fabric, Workload(batch=2, heads=4, tokens=100, block_size=64))
    compute = 3.0 + 2.0 * 100 + 1.0 * 2 * 4 * 100
    assert c.route["transfer"] == pytest.approx(2 * 4 * 1152 / 1000)  # route bytes at bandwidth_gbps
    assert c.fetch["transfer"] == pytest.approx(100 * 656 / 4000)  # fetch bytes at fetch_bandwidth_gbps
    assert c.route["compute"] == c.fetch["compute"] == c.local_us == pytest.approx(compute)
    # absent, the fetch bandwidth is the route's (older profiles keep their meaning)
    same = FabricProfile(name="one", probe_us=10.0, bandwidth_gbps=1.0)
    assert same.read_bandwidth_gbps == 1.0
    n_star = crossover_tokens(V32, fabric, batch=1, heads=128)
    assert n_star == pytest.approx(128 * (1152 + 2052) / 1000 / (656 / 4000))
    with pytest.raises(ConfigError, match="fetch_bandwidth_gbps"):
        FabricProfile(name="bad", probe_us=1.0, bandwidth_gbps=1.0, fetch_bandwidth_gbps=0.0)


def test_reuse_amortises_only_the_fetch_movement():
    one = costs(V32, FABRIC, Workload(batch=1, heads=1, tokens=64, block_size=64))
    four = costs(V32, FABRIC, Workload(batch=1, heads=1, tokens=64, block_size=64, reuse=4))
    for key in ("probe", "transfer", "gather", "splice"):
        assert four.fetch[key] == pytest.approx(one.fetch[key] / 4)
    assert four.fetch["compute"] == one.fetch["compute"]
    assert four.route == one.route


def test_decision_local_when_resident_or_empty():
    assert costs(V32, FABRIC, Workload(batch=1, heads=128, tokens=2048, resident=True)).decision is Decision.LOCAL
    assert costs(V32, FABRIC, Workload(batch=1, heads=128, tokens=0)).decision is Decision.LOCAL


@pytest.mark.parametrize("fabric_name", list_fabrics())
@pytest.mark.parametrize("batch, heads, reuse", [(1, 16, 1.0), (1, 128, 1.0), (4, 128, 1.0), (1, 128, 8.0)])
def test_crossover_separates_fetch_from_route(fabric_name, batch, heads, reuse):
    fabric = load_fabric(fabric_name)
    n_star = crossover_tokens(V32, fabric, batch=batch, heads=heads, reuse=reuse, block_size=64)
    assert n_star is not None and n_star > 0
    # Away from the boundary (where the continuous descriptor count and ceil differ), the closed
    # form and the full terms agree.
    below = Workload(batch=batch, heads=heads, tokens=max(1, math.floor(n_star * 0.8)), reuse=reuse)
    above = Workload(batch=batch, heads=heads, tokens=math.ceil(n_star * 1.25) + 64, reuse=reuse)
    assert costs(V32, fabric, below).decision is Decision.FETCH
    assert costs(V32, fabric, above).decision is Decision.ROUTE


def test_crossover_is_about_4_9_heads_on_rdma():
    # DESIGN.md section 4: route wins above ~H*(s_q+s_r)/b tokens when the probe terms cancel (equal probes, no
    # splice) and bandwidth dominates. DESIGN's 3.3*H for V3.2 counts a bf16 return row; owners return float32 (an
    # exact merge), so s_r is 2052 B and the crossover about 4.9*H.
    # terms cancel (equal probes, no splice) and bandwidth dominates.
    pure = FabricProfile(name="pure", probe_us=5.0, bandwidth_gbps=45.0)
    n_star = crossover_tokens(V32, pure, batch=1, heads=128)
    assert n_star == pytest.approx(128 * (1152 + 2052) / 656)
    assert 4.85 * 128 < n_star < 4.9 * 128


def test_fabric_files_load_and_round_trip(tmp_path):
    assert {"h100-nvlink", "ibgda-cx7", "ib-verbs-proxy", "tcp-100gbe", "loopback-nixl", "loopback-tcp",
            "loopback-nixl-calibrated", "loopback-tcp-calibrated"} <= set(list_fabrics())
    for name in list_fabrics():
        profile = load_fabric(name)
        assert profile.source, f"{name} must say where its numbers come from"
        save_fabric(profile, tmp_path / f"{name}.yaml")
        assert load_fabric(tmp_path / f"{name}.yaml") == profile


def test_bad_fabrics_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown fabric"):
        load_fabric("no-such-fabric")
    bad = tmp_path / "bad.yaml"
    bad.write_text("probe_us: 1\nbandwidth_gbps: 1\nlatency: 3\n")
    with pytest.raises(ConfigError, match="latency"):
        load_fabric(bad)
    bad.write_text("probe_us: -1\nbandwidth_gbps: 1\n")
    with pytest.raises(ConfigError, match="probe_us"):
        load_fabric(bad)
    with pytest.raises(ConfigError, match="reuse"):
        Workload(batch=1, heads=1, tokens=1, reuse=0.5)


def test_plan_cli_json_for_v32_over_ibgda(capsys):
    assert main(["plan", "--model", str(MODELS_DIR / "deepseek-v3.2.json"), "--fabric", "ibgda-cx7",
                 "--batch", "1", "--tokens", "2048", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decision"] == "route"
    assert report["route_us"] < report["fetch_us"]
    assert set(report["route_terms_us"]) == {"probe", "transfer", "compute", "return", "merge"}
    assert report["crossover_tokens"] == pytest.approx(
        crossover_tokens(V32, load_fabric("ibgda-cx7"), batch=1, heads=128)
    )
    assert main(["plan", "--model", str(MODELS_DIR / "deepseek-v3.2.json"), "--fabric", "ibgda-cx7",
                 "--tokens", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "fetch"


def test_plan_cli_reports_errors(capsys):
    assert main(["plan", "--model", str(MODELS_DIR / "deepseek-v3.2.json"), "--fabric", "nope"]) == 2
    assert "unknown fabric" in capsys.readouterr().err
