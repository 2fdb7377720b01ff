"""``qroute bench transport`` end to end with a few iterations: structure and positivity, not speed."""

import json

import pytest

from qroute.errors import ConfigError
from qroute.ops.cli import main


def _have_nixl() -> bool:
    from qroute.transport.nixl_agent import require_nixl

    try:
        require_nixl()
    except ConfigError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _have_nixl(), reason="the benchmark compares against NIXL; not installed")

KEYS = {
    "raw_nixl_rtt_us", "raw_nixl_rtt_p99_us", "route_rtt_us", "route_rtt_p99_us", "fetch_us", "fetch_p99_us",
    "tcp_route_rtt_us", "tcp_route_rtt_p99_us", "tcp_fetch_us", "tcp_fetch_p99_us", "route_over_raw",
    "fetch_over_raw", "tcp_route_over_nixl_route", "tcp_fetch_over_nixl_fetch", "owner_compute_us",
}  # fmt: skip


def test_bench_transport_json(capsys):
    assert main(["bench", "transport", "--json", "--iters", "20", "--tokens", "32", "--heads", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert KEYS <= set(report)
    for key in KEYS:
        assert report[key] > 0, key
    for key in ("raw_nixl_rtt_us", "route_rtt_us", "fetch_us", "tcp_route_rtt_us", "tcp_fetch_us"):
        assert report[key.replace("_us", "_p99_us")] >= report[key]
    assert report["interleaved"]["route_rtt_us"] > 0 and report["interleaved"]["raw_nixl_rtt_us"] > 0
    assert report["route_over_raw"] == pytest.approx(report["route_rtt_us"] / report["raw_nixl_rtt_us"])
    assert report["raw_rtt_us"] == report["raw_nixl_rtt_us"]
    assert report["route_overhead_over_raw"] == pytest.approx(
        (report["route_rtt_us"] - report["owner_compute_us"]) / report["raw_rtt_us"])  # fmt: skip
    assert (report["heads"], report["tokens"], report["iters"]) == (2, 32, 20)
    assert report["fetch_bytes"] == 32 * 576 * 4
    assert set(report["breakdown_us"]) >= {"encode", "owner_handle_in_owner", "owner_compute", "decode", "raw_nixl_rtt"}
    assert report["breakdown_us"]["owner_handle_in_owner"] > 0  # the owner process timed its own routes


def test_bench_transport_text(capsys):
    assert main(["bench", "transport", "--iters", "10", "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "raw NIXL notification round trip" in out and "route / raw NIXL round trip" in out


def test_bench_refuses_tokens_off_the_block_size(capsys):
    assert main(["bench", "transport", "--tokens", "20"]) == 2
    assert "multiple of the block size" in capsys.readouterr().err
