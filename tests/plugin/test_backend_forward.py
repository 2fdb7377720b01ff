"""QRouteCPUMLAImpl.forward_mqa against a dense reference: a mixed batch (prefill, decode, extend) over the
paged cache, alone and merged with a corpus part."""

from __future__ import annotations

import types

import pytest
import torch

from qroute.numerics.attention import merge, partial_attention

HEADS, RANK, ROPE, BLOCK = 4, 512, 64, 16
SCALE = 128**-0.5
# (seq_len, query_len) per request: a prefill, a decode, an extend of 17 rows after 16 cached tokens.
REQUESTS = [(5, 5), (40, 1), (33, 17)]


@pytest.fixture(scope="module")
def backend(vllm):
    from qroute.plugin import vllm as plugin
    from qroute.plugin import vllm_backend

    plugin.register()
    return vllm_backend


def _impl(backend):
    from vllm.v1.attention.backend import AttentionType

    mla = dict(q_lora_rank=128, kv_lora_rank=RANK, qk_nope_head_dim=64, qk_rope_head_dim=ROPE, qk_head_dim=128,
               v_head_dim=64, kv_b_proj=None)  # fmt: skip
    return backend.QRouteCPUMLAImpl(HEADS, RANK + ROPE, SCALE, 1, None, None, "auto", None, AttentionType.DECODER,
                                    None, **mla)  # fmt: skip


def _batch(backend, dtype, seed=0):
    from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadata

    g = torch.Generator().manual_seed(seed)
    num_blocks = 16
    cache = torch.randn(num_blocks, BLOCK, RANK + ROPE, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables, used = [], 0
    for seq_len, _ in REQUESTS:
        n = -(-seq_len // BLOCK)
        tables.append(torch.cat([perm[used : used + n], torch.zeros(4 - n, dtype=torch.int64)]))
        used += n
    qlens = [q for _, q in REQUESTS]
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    num_tokens = int(qsl[-1])
    decode = backend.QRouteDecodeMetadata(
        block_table=torch.stack(tables).to(torch.int32), seq_lens=torch.tensor([s for s, _ in REQUESTS],
        dtype=torch.int32), dcp_tot_seq_lens=None, query_start_loc=qsl, max_query_len=max(qlens),
    )  # fmt: skip
    meta = MLACommonMetadata(
        num_reqs=len(REQUESTS), max_query_len=max(qlens), max_seq_len=40, num_actual_tokens=num_tokens,
        query_start_loc=qsl, slot_mapping=torch.zeros(num_tokens), num_decodes=len(REQUESTS),
        num_decode_tokens=num_tokens, num_prefills=0, decode=decode,
    )
    q_nope = torch.randn(num_tokens, HEADS, RANK, generator=g).to(dtype)
    q_pe = torch.randn(num_tokens, HEADS, ROPE, generator=g).to(dtype)
    return cache, meta, q_nope, q_pe


def _dense(cache, meta, q_nope, q_pe, corpus=None):
    """Row by row: softmax over the row's visible own tokens (+ every corpus row), in float64."""
    outs, lses = [], []
    flat = cache.reshape(-1, RANK + ROPE).double()
    for r, (seq_len, qlen) in enumerate(REQUESTS):
        table = meta.decode.block_table[r].long()
        slots = [int(table[p // BLOCK]) * BLOCK + p % BLOCK for p in range(seq_len)]
        for j in range(qlen):
            t = int(meta.query_start_loc[r]) + j
            keys = flat[slots[: seq_len - qlen + j + 1]]
            if corpus is not None and r in corpus[1]:
                keys = torch.cat([keys, corpus[0].double()])
            scores = (keys[:, :RANK] @ q_nope[t].double().T + keys[:, RANK:] @ q_pe[t].double().T).T * SCALE
            lses.append(torch.logsumexp(scores, -1))
            outs.append(torch.softmax(scores, -1) @ keys[:, :RANK])
    return torch.stack(outs), torch.stack(lses)


LAYER = types.SimpleNamespace(layer_name="model.layers.1.self_attn.attn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_own_part_matches_dense_causal_attention(backend, dtype, monkeypatch):
    monkeypatch.setattr("qroute.plugin.vllm_mla_common.corpus_attention", lambda: None)
    cache, meta, q_nope, q_pe = _batch(backend, dtype)
    out, lse = _impl(backend).forward_mqa((q_nope, q_pe), cache, meta, LAYER)
    want_out, want_lse = _dense(cache, meta, q_nope, q_pe)
    assert out.dtype == dtype and lse.dtype == torch.float32
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse.double(), want_lse, atol=atol, rtol=0)
    torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=0)


def test_corpus_part_is_merged_once_per_layer_for_the_whole_step(backend, monkeypatch):
    cache, meta, q_nope, q_pe = _batch(backend, torch.float32, seed=1)
    corpus_rows = torch.randn(50, RANK + ROPE, generator=torch.Generator().manual_seed(2))
    attends = {1, 2}  # request 0 has no corpus this step
    bounds = meta.query_start_loc.tolist()
    calls = []

    class FakeWorker:
        def attend_step(self, layer, qn, qp, own):  # as QRouteWorkerSide: own merged with each row's corpus part
            calls.append((layer, qn.shape[0]))
            out, lse = own
            for r in attends:
                rows = slice(bounds[r], bounds[r + 1])
                corpus = partial_attention(qn[rows], qp[rows], corpus_rows, torch.arange(50), SCALE, RANK)
                out[rows], lse[rows] = merge([(out[rows], lse[rows]), corpus])
            return out, lse

    monkeypatch.setattr("qroute.plugin.vllm_mla_common.corpus_attention", FakeWorker)
    impl = _impl(backend)
    for _ in range(2):  # two layers of one step: the own rows are planned on the first, reused by the second
        out, lse = impl.forward_mqa((q_nope, q_pe), cache, meta, LAYER)
        want_out, want_lse = _dense(cache, meta, q_nope, q_pe, corpus=(corpus_rows, attends))
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=0)
    planned = meta.decode.own_plan
    assert [(rows.start, rows.stop) for rows in planned] == [(0, 5), (5, 6), (6, 23)]
    assert planned[1].q_positions is None  # the single decode row needs no mask
    assert calls == [(1, 23), (1, 23)]  # layer index from the layer name, one call per layer for all requests


def test_stock_metadata_is_refused(backend, monkeypatch):
    from vllm.model_executor.layers.attention.mla_attention import MLACommonDecodeMetadata

    from qroute.errors import ConfigError

    monkeypatch.setattr("qroute.plugin.vllm_mla_common.corpus_attention", lambda: None)
    cache, meta, q_nope, q_pe = _batch(backend, torch.float32)
    meta.decode = MLACommonDecodeMetadata(meta.decode.block_table, meta.decode.seq_lens, None)
    with pytest.raises(ConfigError, match="QRouteMLAMetadataBuilder"):
        _impl(backend).forward_mqa((q_nope, q_pe), cache, meta, LAYER)
