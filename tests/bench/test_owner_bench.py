"""``qroute bench owner`` end to end with a few rounds: structure and consistency, not speed."""

import json

import pytest

from qroute.ops.cli import main


def test_bench_owner_json(capsys):
    assert main(["bench", "owner", "--json", "--rounds", "2", "--tokens", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["concurrency"]) == set(report["batched_over_unbatched"]) == {"1", "4", "16", "64"}
    assert set(report["attention_together_over_alone"]) == {"1", "4", "16", "64"}
    for c, row in report["concurrency"].items():
        assert row["batched_rows_per_s"] > 0 and row["unbatched_rows_per_s"] > 0
        assert report["batched_over_unbatched"][c] == pytest.approx(
            row["batched_rows_per_s"] / row["unbatched_rows_per_s"])  # fmt: skip
        assert report["attention_together_over_alone"][c] == pytest.approx(
            row["attention_together_rows_per_s"] / row["attention_alone_rows_per_s"])  # fmt: skip
        assert row["batched_rows_per_s"] == pytest.approx(int(c) / (row["batched_ms"] / 1e3))
    assert (report["tokens"], report["rounds"], report["target_at_16"]) == (64, 2, 4.0)


def test_bench_owner_refuses_a_partial_block(capsys):
    assert main(["bench", "owner", "--tokens", "20"]) == 2
    assert "multiple of the block size" in capsys.readouterr().err
