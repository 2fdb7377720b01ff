"""``qroute bench sparse`` judges auto's decisions against the route/fetch assignment that measured fastest."""

from __future__ import annotations

from qroute.bench.sparse import assignments, mispredictions


def _record(decision, *, owner="i1", topk=4, mode="auto", fell_back=False):
    return {"mode": mode, "selector": "summary", "topk": topk, "layer": 0, "owner": owner, "tokens": 64, "rows": 1,
            "decision": decision, "seconds": 1e-4, "fell_back": fell_back}  # fmt: skip


def test_every_way_to_decide_the_peers_is_an_assignment():
    ways = assignments(["i1", "i2"])
    assert ways == {"i1=route,i2=route": {"i1": "route", "i2": "route"},
                    "i1=route,i2=fetch": {"i1": "route", "i2": "fetch"},
                    "i1=fetch,i2=route": {"i1": "fetch", "i2": "route"},
                    "i1=fetch,i2=fetch": {"i1": "fetch", "i2": "fetch"}}  # fmt: skip


def test_an_auto_decision_is_wrong_where_the_best_assignment_decides_otherwise():
    best = {"4": {"i1": "route", "i2": "fetch"}, "64": {"i1": "route", "i2": "route"}}
    records = [
        _record("route"), _record("route"), _record("fetch"),  # i1 at 4: one wrong of 3
        _record("fetch", owner="i2"),  # right
        _record("fetch", owner="i2", topk=64),  # wrong
        _record("route", mode="route"),  # not auto: not judged
        _record("fetch", fell_back=True),  # fell back: not a measure of its decision
        _record("fetch", topk=16),  # no assignment measured at 16: counted, not judged
    ]  # fmt: skip
    got = mispredictions(records, best)
    assert got["decisions_judged"] == 5
    assert got["mispredicted_fraction"] == 2 / 5
    assert got["mispredicted_by_topk"] == {"4": 1 / 4, "64": 1.0}
    assert got["auto_decisions"]["4"] == {"i1": {"route": 2, "fetch": 1}, "i2": {"fetch": 1}}
    assert got["auto_decisions"]["16"] == {"i1": {"fetch": 1}}


def test_no_auto_decisions_is_no_figure_not_zero():
    got = mispredictions([_record("route", mode="route")], {"4": {"i1": "route"}})
    assert got["mispredicted_fraction"] is None and got["decisions_judged"] == 0


def test_cli_registers_bench_sparse():
    from qroute.ops.cli import build_parser

    args = build_parser().parse_args(["bench", "sparse", "--json", "--topk", "1", "64"])
    assert args.topk == [1, 64] and args.transport == "nixl" and callable(args.handler)
