"""The worker side's step: requests that attend to the same blocks share one route message per owner and layer,
planned once per step; each row equals the single-request answer (to float32 rounding) and the dense reference.

Two real worker sides ("a" requests, "b" owns the rest) in this process, connected over real TCP sockets; their
stores hold random latent rows (the numerics, not the model, are under test here; the engine runs are in
tests/ops). No engine runs: the step's rows are laid out as vLLM's model runner lays them out.
"""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch

from qroute.dataplane.owner import BATCH_ATOL
from qroute.numerics.attention import merge, partial_attention
from qroute.numerics.rope import PositionShift

LAYER_NAME = "model.layers.{}.self_attn.attn"
# (first slot, own positions already computed, rows this step, mode); None: a row without a corpus step
REQUESTS = [(100, 0, 3, "route"), (200, 7, 1, "fetch"), None, (400, 2, 1, "route")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_sides(model_dir, corpus_dir, dtype: torch.dtype, **extra) -> dict:
    from qroute.connectors.vllm_worker import QRouteWorkerSide
    from qroute.core.config import QRouteConfig, load_directory

    instances = {name: f"127.0.0.1:{_free_port()}" for name in ("a", "b")}
    built = {}
    for name in instances:
        config = QRouteConfig.from_extra_config({
            "instance_id": name, "instances": instances, "secret_env": "QROUTE_SECRET",
            "corpus": {"name": "repo", "path": str(corpus_dir), "blocks_per_chunk": 1}, **extra,
        })  # fmt: skip
        _, directory = load_directory(config, model_dir)
        side = QRouteWorkerSide(config, directory, str(model_dir), dtype)
        caches = {LAYER_NAME.format(i): torch.zeros(8, directory.block_size, side.width, dtype=dtype)
                  for i in range(side.geometry.num_layers)}  # fmt: skip
        side.register_kv_caches(caches)
        g = torch.Generator().manual_seed(ord(name))
        for rows in side.shard.layers:
            rows.copy_(torch.randn(rows.shape, generator=g))
        for chunk in directory.chunks_of(name):  # as if prefilled
            side.chunk_stored(chunk)
        built[name] = side
    return built


@pytest.fixture(scope="module")
def sides(vllm, tiny_fp32_model, sample_corpus):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QROUTE_SECRET", "worker-step-test")
        built = _make_sides(tiny_fp32_model, sample_corpus, torch.float32)
        try:
            yield built
        finally:
            for side in built.values():
                side.close()


def _full_corpus(sides, layer: int) -> torch.Tensor:
    """Every corpus row of ``layer`` at its global position, assembled from both stores."""
    a = sides["a"]
    d = a.directory
    full = torch.full((d.num_tokens, a.width), float("nan"))
    for side in sides.values():
        for block, (row, count) in side.shard.block_rows.items():
            full[block * d.block_size:block * d.block_size + count] = side.shard.layers[layer][row:row + count]
    assert not full.isnan().any()
    return full


def _step(side, requests):
    from qroute.connectors.vllm_meta import QRouteStepMeta, RequestStep

    n = side.directory.num_tokens
    steps, slot_mapping, starts = {}, [], [0]
    for k, request in enumerate(requests):
        if request is None:
            slot_mapping.append(900 + k)
            starts.append(starts[-1] + 1)
            continue
        slot, first_pos, rows, mode = request
        steps[slot] = RequestStep(f"r{k}", "repo", mode, visible_tokens=n, position_shift=n, first_pos=first_pos)
        slot_mapping += [slot + i for i in range(rows)]
        starts.append(starts[-1] + rows)
    return QRouteStepMeta(steps), torch.tensor(slot_mapping), torch.tensor(starts)


def _inputs(side, num_rows: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    h, rank, rope = side.geometry.num_heads, side.params.kv_lora_rank, side.width - side.params.kv_lora_rank
    q_nope = torch.randn(num_rows, h, rank, generator=g).to(dtype)
    q_pe = torch.randn(num_rows, h, rope, generator=g).to(dtype)
    own = (torch.randn(num_rows, h, rank, generator=g), torch.randn(num_rows, h, generator=g))
    return q_nope, q_pe, own


def _attend(side, requests, q_nope, q_pe, own):
    """Every layer of one step: ``{layer: (out, lse)}`` and the step's per-request report."""
    side.start_step(*_step(side, requests))
    results = {}
    for layer in range(side.geometry.num_layers):
        own_copy = (own[0].clone(), own[1].clone())
        results[layer] = side.attend_step(layer, q_nope, q_pe, own_copy)
    side.end_step()
    return results, side.take_report()


def test_requests_of_a_step_share_one_route_per_owner_and_layer(sides, monkeypatch):
    a, b = sides["a"], sides["b"]
    assert a.directory.chunks_of("a") and a.directory.chunks_of("b")  # both hold part of the corpus
    num_rows = sum(1 if r is None else r[2] for r in REQUESTS)
    q_nope, q_pe, own = _inputs(a, num_rows, seed=7)
    plans = []
    real_plan = a.router.plan
    monkeypatch.setattr(a.router, "plan", lambda *args, **kw: plans.append(args) or real_plan(*args, **kw))
    routes_before = b.links.service.stats.snapshot()["routes"]
    moved_before = a.router.stats.snapshot()["bytes_moved"]
    batched, report = _attend(a, REQUESTS, q_nope, q_pe, own)
    moved = a.router.stats.snapshot()["bytes_moved"] - moved_before
    num_layers = a.geometry.num_layers

    # planned once per step per group (route: r0 + r3, fetch: r1), for all its rows; one route message per layer
    assert sorted(args[0] for args in plans) == [1, 4]
    assert b.links.service.stats.snapshot()["routes"] - routes_before == num_layers
    counts = {req_id: dict(zip(("route", "fetch", "local", "bytes_moved", "shared"), row, strict=True))
              for req_id, row in report.counts.items()}  # fmt: skip
    for req_id in ("r0", "r3"):  # each counts the shared route and local part as its own
        assert counts[req_id]["route"] == counts[req_id]["local"] == num_layers
        assert counts[req_id]["fetch"] == 0 and counts[req_id]["shared"] == 2 * num_layers
    assert counts["r1"]["fetch"] == counts["r1"]["local"] == num_layers and counts["r1"]["shared"] == 0
    assert sum(c["bytes_moved"] for c in counts.values()) == moved  # every byte is someone's
    share = counts["r0"]["bytes_moved"] / (counts["r0"]["bytes_moved"] + counts["r3"]["bytes_moved"])
    assert abs(share - 3 / 4) < 1e-3  # the route's bytes split by rows (3 and 1)
    assert "r2" not in counts

    # every row equals that request's step alone (to float32 rounding: owner.BATCH_ATOL) and the dense reference
    n = a.directory.num_tokens
    row = 0
    for k, request in enumerate(REQUESTS):
        if request is None:  # no corpus: the own part, untouched
            for layer in batched:
                assert torch.equal(batched[layer][0][row], own[0][row])
            row += 1
            continue
        _, first_pos, rows, _ = request
        span = slice(row, row + rows)
        alone, _ = _attend(a, [request], q_nope[span], q_pe[span], (own[0][span], own[1][span]))
        positions = torch.arange(first_pos, first_pos + rows)
        shift = PositionShift(positions, positions + n, a.params.inv_freq, interleaved=True)
        for layer, (out, lse) in batched.items():
            torch.testing.assert_close(out[span], alone[layer][0], atol=BATCH_ATOL, rtol=0, msg=f"{k} {layer}")
            torch.testing.assert_close(lse[span], alone[layer][1], atol=BATCH_ATOL, rtol=0, msg=f"{k} {layer}")
            corpus = partial_attention(q_nope[span], shift(q_pe[span]), _full_corpus(sides, layer), torch.arange(n),
                                       a.params.scale, a.params.kv_lora_rank)  # fmt: skip
            want_out, want_lse = merge([(own[0][span], own[1][span]), corpus])
            torch.testing.assert_close(out[span], want_out, atol=1e-5, rtol=0)
            torch.testing.assert_close(lse[span], want_lse, atol=1e-5, rtol=0)
        row += rows


def test_the_plan_is_reused_across_layers(sides, monkeypatch):
    """No layer walks block ids: the local rows and the READ ranges are prepared when the step is planned."""
    from qroute.dataplane import plan as plan_module
    from qroute.dataplane import router as router_module

    a = sides["a"]
    q_nope, q_pe, own = _inputs(a, 5, seed=8)
    a.start_step(*_step(a, [(100, 0, 3, "route"), (200, 7, 1, "fetch"), (400, 2, 1, "route")]))
    walks = []
    monkeypatch.setattr(a.shard, "slots", lambda ids: walks.append(("slots", ids)))
    real_ranges = router_module.byte_ranges
    for module in (plan_module, router_module):  # the plan's prepared ranges, and the router's unprepared ones
        monkeypatch.setattr(module, "byte_ranges", lambda *args: walks.append("ranges") or real_ranges(*args))
    for layer in range(a.geometry.num_layers):
        a.attend_step(layer, q_nope, q_pe, (own[0].clone(), own[1].clone()))
    a.end_step()
    assert walks == ["ranges"]  # the fetch part's ranges, on its first layer; never the local rows
    assert "error" not in str(a.take_report().errors)


def test_a_bf16_model_stores_and_moves_bf16_rows(vllm, tiny_fp32_model, sample_corpus, monkeypatch):
    """The store is the paged cache's dtype: half the memory of float32 and half the bytes per fetched row."""
    monkeypatch.setenv("QROUTE_SECRET", "worker-step-test")
    built = _make_sides(tiny_fp32_model, sample_corpus, torch.bfloat16)
    try:
        a = built["a"]
        assert all(rows.dtype == torch.bfloat16 for rows in a.shard.layers)
        assert a.shard.nbytes == sum(rows.shape[0] for rows in a.shard.layers) * a.width * 2
        remote_tokens = sum(count for count in (r[1] for r in built["b"].shard.block_rows.values()))
        q_nope, q_pe, own = _inputs(a, 2, seed=9, dtype=torch.bfloat16)
        requests = [(100, 0, 1, "fetch"), (200, 4, 1, "route")]
        results, report = _attend(a, requests, q_nope, q_pe, own)
        fetch, route = report.counts["r0"], report.counts["r1"]
        num_layers = a.geometry.num_layers
        assert fetch[1] == route[0] == num_layers
        assert fetch[3] == remote_tokens * a.width * 2 * num_layers  # bf16 rows: 1152 bytes per token
        n = a.directory.num_tokens
        for k, (_, first_pos, _, _) in enumerate(requests):
            positions = torch.tensor([first_pos])
            shift = PositionShift(positions, positions + n, a.params.inv_freq, interleaved=True,
                                  table_dtype=torch.bfloat16)  # fmt: skip
            for layer, (out, lse) in results.items():
                corpus = partial_attention(q_nope[k:k + 1], shift(q_pe[k:k + 1]), _full_corpus(built, layer),
                                           torch.arange(n), a.params.scale, a.params.kv_lora_rank)  # fmt: skip
                want_out, want_lse = merge([(own[0][k:k + 1], own[1][k:k + 1]), corpus])
                torch.testing.assert_close(lse[k:k + 1], want_lse, atol=1e-4, rtol=0)
                torch.testing.assert_close(out[k:k + 1], want_out, atol=1e-4, rtol=0)
    finally:
        for side in built.values():
            side.close()


def test_summary_selection_attends_each_requests_top_k_blocks(vllm, tiny_fp32_model, sample_corpus, monkeypatch):
    """Each request attends to the top-k blocks of its own queries' bounds, the other instance's blocks' summaries
    read from it; requests that picked the same blocks share one run; k = every block is the dense answer."""
    from qroute.dataplane.selection import BlockSummaries, summary_top_k
    from qroute.dataplane.shard import block_range, corpus_positions

    monkeypatch.setenv("QROUTE_SECRET", "worker-step-test")
    built = _make_sides(tiny_fp32_model, sample_corpus, torch.float32, selector="summary", topk=3)
    try:
        a, b = built["a"], built["b"]
        d, num_layers = a.directory, a.geometry.num_layers
        b_blocks = sorted(b.shard.block_rows)
        assert not a.summaries[0].ready[b_blocks].any()  # a knows only its own blocks' bounds so far
        q_nope, q_pe, own = _inputs(a, 4, seed=12)
        requests = [(100, 0, 2, "route"), (200, 5, 1, "route"), (300, 9, 1, "fetch")]
        results, report = _step_with_selection(a, requests, q_nope, q_pe, own, topk=3)
        for layer in range(a.geometry.num_layers):  # read from b, and equal to b's own
            assert torch.equal(a.summaries[layer].table[b_blocks], b.summaries[layer].table[b_blocks])
        n, row = d.num_tokens, 0
        for _, first_pos, rows, _ in requests:
            span = slice(row, row + rows)
            row += rows
            positions = torch.arange(first_pos, first_pos + rows)
            moved = PositionShift(positions, positions + n, a.params.inv_freq, interleaved=True)(q_pe[span])
            for layer, (out, lse) in results.items():
                full = _full_corpus(built, layer)
                truth = BlockSummaries(d.num_blocks, a.width)  # from the whole corpus, independently of a and b
                truth.add(range(d.num_blocks), [full[slice(*block_range(d, b))] for b in range(d.num_blocks)])
                chosen = summary_top_k(truth.bounds(q_nope[span], moved, d.num_blocks), 3)
                assert len(chosen) == 3
                keys = corpus_positions(d, chosen)
                corpus = partial_attention(q_nope[span], moved, full, keys, a.params.scale, a.params.kv_lora_rank)
                want_out, want_lse = merge([(own[0][span], own[1][span]), corpus])
                torch.testing.assert_close(lse[span], want_lse, atol=1e-5, rtol=0)
                torch.testing.assert_close(out[span], want_out, atol=1e-5, rtol=0)
        assert not report.errors
        assert all(sum(report.counts[f"r{k}"][:3]) >= num_layers for k in range(3))  # each attended every layer

        # k >= every block: the dense answer
        everything, _ = _step_with_selection(a, requests, q_nope, q_pe, own, topk=d.num_blocks)
        dense, _ = _step_with_selection(a, requests, q_nope, q_pe, own, topk=0)
        for layer in dense:
            torch.testing.assert_close(everything[layer][0], dense[layer][0], atol=1e-6, rtol=0)
            torch.testing.assert_close(everything[layer][1], dense[layer][1], atol=1e-6, rtol=0)
    finally:
        for side in built.values():
            side.close()


def _step_with_selection(side, requests, q_nope, q_pe, own, *, topk: int):
    """One step in which every request selects ``topk`` summary blocks (0: dense)."""
    from qroute.core.config import Selection

    meta, slot_mapping, starts = _step(side, requests)
    selection = Selection("summary", topk) if topk else Selection()
    meta.requests = {slot: dataclasses.replace(step, selection=selection) for slot, step in meta.requests.items()}
    side.start_step(meta, slot_mapping, starts)
    results = {layer: side.attend_step(layer, q_nope, q_pe, (own[0].clone(), own[1].clone()))
               for layer in range(side.geometry.num_layers)}  # fmt: skip
    side.end_step()
    return results, side.take_report()


def test_summary_selection_fails_clearly_where_it_cannot_be_right(sides, vllm, tiny_fp32_model, sample_corpus,
                                                                   monkeypatch):
    """No summaries kept (dense instance), or an owner that has not summarised its blocks yet: the request fails
    with the reason, it never attends to a selection made on wrong bounds."""
    q_nope, q_pe, own = _inputs(sides["a"], 1, seed=13)
    _, report = _step_with_selection(sides["a"], [(100, 0, 1, "route")], q_nope, q_pe, own, topk=2)
    assert "keeps no block summaries" in report.errors["r0"]

    monkeypatch.setenv("QROUTE_SECRET", "worker-step-test")
    built = _make_sides(tiny_fp32_model, sample_corpus, torch.float32, selector="summary", topk=2)
    try:
        b_blocks = sorted(built["b"].shard.block_rows)
        for summaries in built["b"].summaries:  # as if b had restarted and not been prefilled again
            summaries.table[b_blocks, 0], summaries.table[b_blocks, 1] = float("inf"), float("-inf")
        results, report = _step_with_selection(built["a"], [(100, 0, 1, "route")], q_nope, q_pe, own, topk=2)
        assert "are not known yet" in report.errors["r0"]
        assert torch.equal(results[0][0], own[0])  # its own part only, and the request is failed
    finally:
        for side in built.values():
            side.close()
