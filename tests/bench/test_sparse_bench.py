"""``qroute bench sparse`` judges auto's decisions against what route and fetch measured on the same parts."""

from __future__ import annotations

import pytest

from qroute.bench.sparse import mispredictions


def _record(mode, decision, seconds, *, tokens=64, layer=0, topk=4, fell_back=False):
    return {"mode": mode, "selector": "summary", "topk": topk, "layer": layer, "owner": "i1", "tokens": tokens,
            "rows": 4, "decision": decision, "seconds": seconds, "fell_back": fell_back}  # fmt: skip


def test_an_auto_decision_is_wrong_where_the_other_option_measured_faster():
    records = [
        # part A (64 tokens): route measured 1.0 / 1.2, fetch 2.0: route is faster
        _record("route", "route", 1.0), _record("route", "route", 1.2), _record("fetch", "fetch", 2.0),
        # part B (16 tokens): fetch is faster
        _record("route", "route", 3.0, tokens=16), _record("fetch", "fetch", 1.0, tokens=16),
        _record("auto", "route", 9.9),  # A: right
        _record("auto", "route", 9.9, tokens=16),  # B: wrong, lost 3.0 - 1.0
        _record("auto", "fetch", 9.9, tokens=16),  # B: right
        _record("auto", "fetch", 9.9, tokens=999),  # never measured both ways: not judged
        _record("fetch", "fetch", 0.1, tokens=16, fell_back=True),  # fell back: not a measure
    ]  # fmt: skip
    got = mispredictions(records)
    assert got["decisions_judged"] == 3 and got["decisions_unmatched"] == 1
    assert got["mispredicted_fraction"] == pytest.approx(1 / 3)
    assert got["mispredicted_excess"] == pytest.approx(2.0 / (1.1 + 1.0 + 1.0))
    assert got["mispredicted_by_topk"] == {"4": pytest.approx(1 / 3)}
    assert got["auto_routed_fraction"] == pytest.approx(2 / 4)


def test_no_auto_decisions_is_no_figure_not_zero():
    got = mispredictions([_record("route", "route", 1.0)])
    assert got["mispredicted_fraction"] is None and got["decisions_judged"] == 0


def test_cli_registers_bench_sparse():
    from qroute.ops.cli import build_parser

    args = build_parser().parse_args(["bench", "sparse", "--json", "--topk", "1", "64"])
    assert args.topk == [1, 64] and args.transport == "nixl" and callable(args.handler)
