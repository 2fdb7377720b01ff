"""The connector's scheduler side and row -> request mapping, with fake scheduler outputs (no engine).

The worker finds a request's query rows by the slot of its first scheduled token; here a batch of a new
prefill, a running decode and a request without a step is laid out the way vLLM's model runner does.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

BLOCK = 16


@pytest.fixture(scope="module")
def sides(vllm, tiny_model_dir, sample_corpus):
    from qroute.connectors import vllm_meta, vllm_scheduler
    from qroute.core.config import QRouteConfig, load_directory

    extra = {"instance_id": "a", "instances": {"a": "127.0.0.1:7001", "b": "127.0.0.1:7002"},
             "corpus": {"name": "repo", "path": str(sample_corpus), "blocks_per_chunk": 2}}  # fmt: skip
    config = QRouteConfig.from_extra_config(extra)
    tokens, directory = load_directory(config, tiny_model_dir)
    return SimpleNamespace(meta=vllm_meta, sched=vllm_scheduler, config=config, tokens=tokens, directory=directory)


def _request(req_id, prompt, qroute=None):
    return SimpleNamespace(request_id=req_id, prompt_token_ids=prompt,
                           kv_transfer_params=None if qroute is None else {"qroute": qroute})  # fmt: skip


def test_first_slot_and_map_rows(sides):
    m = sides.meta
    assert m.first_slot([7, 3], 0, BLOCK) == 7 * BLOCK
    assert m.first_slot([7, 3], 17, BLOCK) == 3 * BLOCK + 1
    step_a = m.RequestStep("a", "repo", "auto", 10, 10, 0)
    step_c = m.RequestStep("c", "repo", "route", 10, 10, 20)
    # rows: a = 3 prefill rows in block 7; b = 1 decode row (no step); c = 1 decode row at position 20 in block 3
    slot_mapping = [112, 113, 114, 45, 3 * BLOCK + 4]
    query_start_loc = [0, 3, 4, 5]
    rows = m.map_rows(slot_mapping, query_start_loc, {112: step_a, 52: step_c})
    assert rows == [(0, 3, step_a), (4, 5, step_c)]


def test_scheduler_steps_map_back_to_their_rows(sides):
    side = sides.sched.QRouteSchedulerSide(sides.config, sides.tokens, sides.directory, BLOCK)
    blocks = {"new": [5, 9], "run": [2, 4, 6], "off": [1]}
    side.bind_kv_cache_manager(SimpleNamespace(get_block_ids=lambda req_id: (blocks[req_id],)))
    side.on_new_request(_request("new", [1, 2, 3], {"mode": "route"}))
    side.on_new_request(_request("run", [4] * 40))  # no qroute params: configured corpus and mode
    side.on_new_request(_request("off", [7], {"corpus": None}))  # opted out
    out = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id="new", block_ids=(blocks["new"],), num_computed_tokens=0)],
        scheduled_cached_reqs=SimpleNamespace(req_ids=["run", "off"], num_computed_tokens=[40, 3]),
    )
    meta = side.build_connector_meta(out)
    n = sides.directory.num_tokens
    got = {s.req_id: (s.mode, s.visible_tokens, s.position_shift, s.first_pos, s.store_chunk)
           for s in meta.requests.values()}  # fmt: skip
    assert got == {"new": ("route", n, n, 0, None), "run": ("auto", n, n, 40, None)}
    # The model runner's rows: new (3 prefill rows), run (1 decode row), off (1 decode row).
    slot_mapping = [5 * BLOCK, 5 * BLOCK + 1, 5 * BLOCK + 2, 6 * BLOCK + 8, 1 * BLOCK + 3]
    rows = sides.meta.map_rows(slot_mapping, [0, 3, 4, 5], meta.requests)
    assert [(a, b, s.req_id) for a, b, s in rows] == [(0, 3, "new"), (3, 4, "run")]


def test_prefill_chunk_requests_are_checked_not_raised(sides):
    side = sides.sched.QRouteSchedulerSide(sides.config, sides.tokens, sides.directory, BLOCK)
    d, ids = sides.directory, sides.tokens
    mine = next(c for c in d.chunks if c.chunk_id > 0 and "a" in c.owners)
    theirs = next(c for c in d.chunks if "a" not in c.owners)
    side.on_new_request(_request("ok", ids[mine.start : mine.end].tolist(), {"prefill_chunk": mine.chunk_id}))
    side.on_new_request(_request("wrong", [1, 2], {"prefill_chunk": mine.chunk_id}))
    side.on_new_request(_request("notmine", ids[theirs.start : theirs.end].tolist(),
                                 {"prefill_chunk": theirs.chunk_id}))  # fmt: skip
    side.on_new_request(_request("range", [1], {"prefill_chunk": 10_000}))
    side.on_new_request(_request("unknown", [1], {"corpus": "nope"}))
    side.on_new_request(_request("badmode", [1], {"mode": "fast"}))
    new = [SimpleNamespace(req_id=r, block_ids=([i],), num_computed_tokens=0)
           for i, r in enumerate(["ok", "wrong", "notmine", "range", "unknown", "badmode"])]  # fmt: skip
    meta = side.build_connector_meta(SimpleNamespace(scheduled_new_reqs=new,
                                                     scheduled_cached_reqs=SimpleNamespace(req_ids=[],
                                                                                           num_computed_tokens=[])))
    (step,) = meta.requests.values()
    assert (step.req_id, step.store_chunk, step.visible_tokens, step.position_shift) == (
        "ok", mine.chunk_id, mine.start, mine.start)  # fmt: skip
    errors = {r: side.request_finished(_request(r, []))["qroute"].get("error", "") for r in
              ["wrong", "notmine", "range", "unknown", "badmode"]}  # fmt: skip
    assert "not the token ids" in errors["wrong"] and "does not own" in errors["notmine"]
    assert "not a chunk" in errors["range"] and "unknown corpus" in errors["unknown"] and "mode" in errors["badmode"]


def test_last_step_counts_complete_the_finished_response(sides):
    """request_finished runs before the last step's worker counts arrive (vllm 0.32 update_from_output)."""
    side = sides.sched.QRouteSchedulerSide(sides.config, sides.tokens, sides.directory, BLOCK)
    side.on_new_request(_request("r", [1, 2], {"mode": "fetch"}))
    side.update_connector_output(sides.meta.QRouteWorkerMeta(counts={"r": [0, 2, 2, 100]}))
    params = side.request_finished(_request("r", [1, 2]))
    assert params["qroute"] == {"corpus": "repo", "mode": "fetch", "route": 0, "fetch": 2, "local": 2,
                                "bytes_moved": 100, "shared": 0}  # fmt: skip
    side.update_connector_output(sides.meta.QRouteWorkerMeta(counts={"r": [0, 2, 2, 50]}, stored={}))
    assert params["qroute"]["fetch"] == 4 and params["qroute"]["bytes_moved"] == 150  # same dict, completed
    assert side.request_finished(_request("r", [])) is None  # exactly once


def test_worker_meta_aggregates(sides):
    m = sides.meta.QRouteWorkerMeta
    total = m(counts={"r": [1, 0, 1, 10]}, errors={"r": "x"}).aggregate(m(counts={"r": [1, 1, 0, 5]}, stored={"p": 3}))
    assert total.counts == {"r": [2, 1, 1, 15]} and total.stored == {"p": 3} and total.errors == {"r": "x"}
    assert not m() and m(stored={"p": 0})


def test_validator_refuses_unknown_corpus_with_value_error(vllm, monkeypatch):
    from vllm import SamplingParams

    from qroute.plugin import vllm_validate

    monkeypatch.setenv("QROUTE_CORPORA", "repo, docs")
    vllm_validate.known_corpora.cache_clear()
    try:
        check = vllm_validate.CorpusValidator.validate_params

        def params(qroute):
            return SamplingParams(extra_args={"kv_transfer_params": {"qroute": qroute}})

        check(params({"corpus": "docs", "mode": "route"}))
        check(SamplingParams())
        cases = [({"corpus": "nope"}, "unknown corpus"), ({"mode": "x"}, "mode"),
                 ({"prefill_chunk": -1}, "prefill_chunk"), ({"corpus": 3}, "corpus"), ("x", "object")]
        for bad, match in cases:
            with pytest.raises(ValueError, match=match):
                check(params(bad))
    finally:
        vllm_validate.known_corpora.cache_clear()


def test_a_worker_error_ends_corpus_attention_for_the_request(sides):
    side = sides.sched.QRouteSchedulerSide(sides.config, sides.tokens, sides.directory, BLOCK)
    side.on_new_request(_request("r", [1, 2]))
    out = SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id="r", block_ids=([3],), num_computed_tokens=0)],
                          scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]))  # fmt: skip
    assert len(side.build_connector_meta(out).requests) == 1
    side.update_connector_output(sides.meta.QRouteWorkerMeta(errors={"r": "owner 'b' unavailable"}))
    assert side.build_connector_meta(out).requests == {}
    assert side.request_finished(_request("r", []))["qroute"]["error"] == "owner 'b' unavailable"


def test_a_failed_request_reports_a_computed_block_for_vllm_to_fail_it(sides):
    """After an error, each later step carries the block of the request's last computed token (policy "fail")."""
    side = sides.sched.QRouteSchedulerSide(sides.config, sides.tokens, sides.directory, BLOCK)
    side.bind_kv_cache_manager(SimpleNamespace(get_block_ids=lambda req_id: ([3, 8],)))
    side.on_new_request(_request("r", [1] * 20))
    running = SimpleNamespace(req_ids=["r"], num_computed_tokens=[20])
    cached = SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=running)
    (step,) = side.build_connector_meta(cached).requests.values()
    assert (step.computed_block, step.failed) == (8, False)  # token 19 is in the request's block 1
    side.update_connector_output(sides.meta.QRouteWorkerMeta(errors={"r": "owner 'b' unavailable"}))
    (step,) = side.build_connector_meta(cached).requests.values()
    assert (step.computed_block, step.failed) == (8, True)
    refused = sides.sched.QRouteSchedulerSide(sides.config, sides.tokens, sides.directory, BLOCK, fail_requests=False)
    refused.bind_kv_cache_manager(side._kv_cache_manager)
    refused.on_new_request(_request("r", [1] * 20, {"mode": "fast"}))
    assert refused.build_connector_meta(cached).requests == {}  # policy "recompute": no failure reported
