"""``qroute bench ab``, reduced: every configuration on real ``vllm serve`` instances (one stock instance; one with
prefix caching, the CPU override lifted; vLLM's NixlConnector prefill/decode pair behind the proxy; two qroute
instances over NIXL in fetch, route and auto; three in auto), three sessions at once through the official client,
and one session alone. Asserts that every configuration produced its tokens, that they agree across configurations
and concurrency levels, that each side's counters are what the geometry says (the P/D pair: every prompt block's
latent rows, once per request; the prefix-cached instance: every request's corpus blocks from its cache), that
the qroute runs priced and timed their remote parts, and that the report files are written. About 5 minutes."""

from __future__ import annotations

import json

from qroute.bench.ab_workload import DEFAULT_QUESTIONS, Workload, percentiles


def test_percentiles_are_nearest_rank():
    values = [i / 1e3 for i in range(1, 101)]  # 1..100 ms
    assert percentiles(values) == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert percentiles([0.004]) == {"p50": 4.0, "p90": 4.0, "p99": 4.0}


def test_a_workload_file_in_vllm_bench_serves_shape(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "a?", "output_tokens": 5}\n{"prompt": "b?", "output_tokens": 5}\n')
    w = Workload.from_jsonl(path)
    assert (w.questions, w.sessions, w.max_tokens) == (("a?", "b?"), 2, 5)


def test_bench_ab_reduced(vllm, tiny_fp32_model, sample_corpus, tmp_path, monkeypatch):
    from qroute.bench.ab import run_ab
    from qroute.bench.ab_report import write_report
    from qroute.core.corpus import place_model_corpus
    from qroute.core.geometry import geometry_from_config, load_config
    from qroute.ops.demo_core import question_ids

    monkeypatch.setenv("QROUTE_STATE_DIR", str(tmp_path / "state"))
    workload = Workload(DEFAULT_QUESTIONS[:2], sessions=3, max_tokens=6)
    report = run_ab(tiny_fp32_model, sample_corpus, workload, base_port=8300, instances=2, wide_instances=3,
                    concurrency=(1,), transport="nixl", blocks_per_chunk=2, log=lambda *_: None)  # fmt: skip
    assert report["ok"], report["problems"]
    rows = report["configs"]
    assert set(rows) == {"stock-floor", "stock-prefix-cached", "stock-nixl-pd", "qroute-fetch", "qroute-route",
                         "qroute-auto", "qroute-auto-x3"}  # fmt: skip
    for name, row in rows.items():
        assert row["decoded_tokens"] == 3 * 6 and not row["errors"], (name, row["errors"])
        assert {"ttft_ms_p50", "tpot_ms_p50", "bytes_per_token"} <= set(row)
        assert set(row["by_concurrency"]) == {"1", "3"} and row["by_concurrency"]["1"]["errors"] == 0
    assert report["outputs_agree"]
    assert [rows[n]["instances"] for n in ("stock-prefix-cached", "qroute-auto", "qroute-auto-x3")] == [1, 2, 3]

    geometry = geometry_from_config(load_config(tiny_fp32_model), cache_dtype="float32", dtype="float32")
    corpus_ids, _ = place_model_corpus(tiny_fp32_model, sample_corpus, name="corpus", instances=["i0"])
    prompts = [len(corpus_ids) + len(question_ids(tiny_fp32_model, workload.questions[s % 2])) for s in range(3)]
    row_bytes = geometry.latent_width * 4 * geometry.num_layers
    pd = rows["stock-nixl-pd"]["moved"]
    assert pd["nixl_transfers"] == 3
    assert pd["bytes"] == sum(-(-n // 16) * 16 * row_bytes for n in prompts)  # every prompt block, once
    assert rows["stock-floor"]["moved"]["bytes"] == 0
    assert rows["stock-floor"]["moved"]["prefix_hit_tokens"] == 0  # the override holds for stock
    # the lifted instance: each request's corpus blocks (full ones) from its cache, never its last prompt token
    hits = rows["stock-prefix-cached"]["moved"]["prefix_hit_tokens"]
    assert 3 * (len(corpus_ids) // 16) * 16 <= hits <= sum((n - 1) // 16 * 16 for n in prompts)
    fetch, route = rows["qroute-fetch"]["moved"], rows["qroute-route"]["moved"]
    assert fetch["fetch"] > 0 and fetch["route"] == 0 and route["route"] > 0 and route["fetch"] == 0
    assert fetch["bytes"] > route["bytes"] > 0  # rows of the other instance's blocks against query rows
    # every remote part of the forced modes was priced by the cost model and timed
    assert rows["qroute-route"]["predicted"]["route"]["parts"] > 0 and "fetch" not in rows["qroute-route"]["predicted"]
    assert rows["qroute-fetch"]["predicted"]["fetch"]["parts"] > 0
    wide = rows["qroute-auto-x3"]["moved"]
    assert wide["predictions"] == wide["route"] + wide["fetch"] > 0  # auto decided every remote part

    write_report(report, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "ab.json").read_text())
    assert saved["configs"]["qroute-auto"]["tpot_ms_p50"] == rows["qroute-auto"]["tpot_ms_p50"]
    assert "| stock-nixl-pd |" in (tmp_path / "out" / "ab.md").read_text()
    assert "| qroute-auto-x3/stock-prefix-cached |" in (tmp_path / "out" / "ab.md").read_text()
    plots = ("latency_cdf.png", "bytes_per_token.png", "concurrency.png", "predicted.png")
    assert all((tmp_path / "out" / f).stat().st_size > 1000 for f in plots)


def test_sessions_decoding_at_once_count_overlapping_spans():
    from qroute.bench.ab_capacity import most_decoding_at_once, offer_levels
    from qroute.bench.ab_workload import SessionResult

    def span(first: float, end: float, error: str | None = None) -> SessionResult:
        return SessionResult(0, 0, "", tokens=[1, 2], first_token_s=first, ended_s=end, error=error)

    # 0-2 and 1-3 overlap; 3-4 starts as 1-3 ends (not together); a failed session does not count
    assert most_decoding_at_once([span(0, 2), span(1, 3), span(3, 4), span(1.5, 1.8, "failed")]) == 2
    assert most_decoding_at_once([span(0, 5), span(1, 2), span(1.5, 4)]) == 3
    assert offer_levels(96) == [4, 6, 9, 14, 21, 32, 48, 72, 96] and offer_levels(3) == [3]


def test_capacity_reduced(vllm, tiny_fp32_model, sample_corpus, tmp_path, monkeypatch):
    """``--capacity`` on real instances, reduced: two stock replicas with prefix caching, one stock instance with
    both budgets, two qroute instances whose store and KV cache together fit the same per-instance budget; every
    offer's sessions answer, the same for their question everywhere, and each instance had the budget it was set."""
    from qroute.bench.ab_capacity import BLOCK, run_capacity
    from qroute.core.corpus import place_model_corpus

    monkeypatch.setenv("QROUTE_STATE_DIR", str(tmp_path / "state"))
    report = run_capacity(tiny_fp32_model, sample_corpus, DEFAULT_QUESTIONS[:2], instances=2, extra_blocks=8,
                          sessions=6, max_tokens=16, base_port=8360, blocks_per_chunk=2, log=lambda *_: None)
    assert report["ok"], report["problems"]
    _, directory = place_model_corpus(tiny_fp32_model, sample_corpus, name="corpus", instances=["i0"])
    budget = directory.num_blocks + 8
    assert report["budget_blocks_per_instance"] == budget and set(report["store_blocks"]) == {"i0", "i1"}
    setups = report["setups"]
    assert setups["stock-prefix-cached-replicas"]["kv_blocks_each"] == [budget, budget]
    assert setups["stock-prefix-cached-one"]["kv_blocks_each"] == [2 * budget]
    stores = report["store_blocks"].values()
    assert setups["qroute-auto-x2"]["kv_blocks_each"] == [budget - max(stores)] * 2
    assert sum(stores) * BLOCK >= directory.num_tokens  # every corpus row is in some store
    for name, s in setups.items():
        assert s["levels"] and "4" in s["levels"], name  # offers began at 4 sessions
        for level, offer in s["levels"].items():
            assert not offer["errors"] and 0 < offer["running_at_once"] <= int(level), (name, level, offer)
            assert 0 < offer["decoding_at_once"] <= int(level), (name, level, offer)
    remote = setups["qroute-auto-x2"]["levels"]["4"]["moved"]
    assert remote["route"] + remote["fetch"] > 0 and remote["local"] > 0  # sharded: both kinds of part ran
