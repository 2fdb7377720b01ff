"""qroute's MLA attention backend for SGLang (``--attention-backend qroute``), on SGLang's torch-native backend.

SGLang's DeepSeek code hands it the absorbed query split (``q`` = ``q_nope`` [T, H * R], ``q_rope`` [T, H * P]) and
the new tokens' latent rows (``k`` = ``k_nope``, ``k_rope``), because the plugin put its name in
``FORWARD_ABSORB_CORE_ATTENTION_BACKENDS``; the concatenated form (576-wide ``q`` and ``k``) is taken too. Per
forward it writes the new rows into the ``MLATokenToKVPool`` as the torch-native backend does, then computes each
request's own part with qroute's ``own_parts`` (causal, natural-log LSE) over the request's slots in
``req_to_token``, planned once per forward for every layer: the part that merges exactly with corpus parts from
other instances. Where the instance configures a corpus (``QROUTE_SGLANG_CONFIG``), each layer then stores a
corpus prefill's new rows and merges every request's corpus part into its own (``qroute.plugin.sglang_corpus``).
Returns the latent output ``[T, H * R]`` in the query's dtype, as the stock backend does.

Not built yet (issue 13): the DSA indexer's metadata (DeepSeek-V3.2's sparse selection on SGLang).
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from qroute.core.config import QRouteConfig
from qroute.numerics.own_rows import OwnRows, own_parts
from qroute.plugin.sglang_corpus import SGLangCorpus, corpus_for

__all__ = ["QRouteSGLangBackend"]


class QRouteSGLangBackend(TorchNativeAttnBackend):
    """The torch-native backend's KV writes, qroute's own part (see the module docstring)."""

    def __init__(self, model_runner: Any, config: QRouteConfig | None = None) -> None:
        super().__init__(model_runner)
        self._planned: tuple[Any, tuple[OwnRows, ...]] | None = None  # (forward batch, its requests' OwnRows)
        self.corpus: SGLangCorpus | None = corpus_for(config, model_runner) if config is not None else None

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        self._planned = None  # a new forward: its page table may have changed since the last
        self._own_rows(forward_batch)
        if self.corpus is not None:
            self.corpus.plan(forward_batch)

    def _own_rows(self, forward_batch: Any) -> tuple[OwnRows, ...]:
        """Every request's ``OwnRows`` of this forward, planned once (``init_forward_metadata``) for all layers."""
        if self._planned is None or self._planned[0] is not forward_batch:
            mode = forward_batch.forward_mode
            seq_lens = forward_batch.seq_lens.tolist()
            query_lens = forward_batch.extend_seq_lens.tolist() if mode.is_extend() else [1] * len(seq_lens)
            table = self.req_to_token_pool.req_to_token
            planned, start = [], 0
            for req, seq_len, qlen in zip(forward_batch.req_pool_indices.tolist(), seq_lens, query_lens,
                                          strict=True):  # fmt: skip
                planned.append(OwnRows.causal(start, qlen, table[req, :seq_len].long()))
                start += qlen
            self._planned = (forward_batch, tuple(planned))
        return self._planned[1]

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any,
                       save_kv_cache: bool = True, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any,
                       save_kv_cache: bool = True, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def _forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer: Any,
                 forward_batch: Any, save_kv_cache: bool, q_rope: torch.Tensor | None = None,
                 k_rope: torch.Tensor | None = None, **_: Any) -> torch.Tensor:  # fmt: skip
        heads, rank, width = layer.tp_q_head_num, layer.v_head_dim, layer.qk_head_dim
        if q_rope is not None:  # split absorbed inputs
            q = torch.cat([q.view(-1, heads, rank), q_rope.view(-1, heads, width - rank)], dim=-1)
            if k is not None and k_rope is not None:
                k = torch.cat([k.view(-1, 1, rank), k_rope.view(-1, 1, width - rank)], dim=-1)
        q = q.view(-1, heads, width)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc),
                                                k, v)  # fmt: skip
        cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)  # [slots, 1, R + P]: paged with pages of 1
        q_nope, q_pe = q[..., :rank], q[..., rank:]
        own = own_parts(q_nope, q_pe, cache, self._own_rows(forward_batch), layer.scaling)
        if self.corpus is not None:
            self.corpus.store(layer.layer_id, cache)
            own = self.corpus.attend(layer.layer_id, q_nope, q_pe, own)
            if layer.layer_id == self.corpus.num_layers - 1:
                self.corpus.end_forward()
        return own[0].to(q.dtype).reshape(-1, heads * rank)
