"""qroute's MLA attention backend for SGLang (``--attention-backend qroute``), on SGLang's torch-native backend.

SGLang's DeepSeek code hands it the absorbed query split (``q`` = ``q_nope`` [T, H * R], ``q_rope`` [T, H * P]) and
the new tokens' latent rows (``k`` = ``k_nope``, ``k_rope``), because the plugin put its name in
``FORWARD_ABSORB_CORE_ATTENTION_BACKENDS``; the concatenated form (576-wide ``q`` and ``k``) is taken too. Per
forward it writes the new rows into the ``MLATokenToKVPool`` as the torch-native backend does, then computes each
request's own part with qroute's ``partial_attention`` (causal, natural-log LSE) over the request's slots in
``req_to_token``: the part that merges exactly with corpus parts from other instances. Returns the latent
output ``[T, H * R]`` in the query's dtype, as the stock backend does.

Not built yet (issue 13): the corpus part (placement, prefill and the owner service over the pool, the router and
its merge), the DSA indexer's metadata; the plugin refuses a configured instance until then.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from qroute.numerics.attention import Part, partial_attention

__all__ = ["QRouteSGLangBackend", "own_parts"]


def own_parts(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, slots_of: list[torch.Tensor],
              query_lens: list[int], scale: float) -> Part:  # fmt: skip
    """Causal attention of every request's rows over its own tokens: ``slots_of[i]`` the cache rows of request
    ``i``'s tokens in order, its last ``query_lens[i]`` the rows' own positions. ``(out [T, H, R], lse [T, H])``."""
    num_rows, num_heads, rank = q_nope.shape
    out = torch.empty(num_rows, num_heads, rank, dtype=torch.float32, device=q_nope.device)
    lse = torch.empty(num_rows, num_heads, dtype=torch.float32, device=q_nope.device)
    start = 0
    for slots, qlen in zip(slots_of, query_lens, strict=True):
        rows = slice(start, start + qlen)
        seq_len = slots.shape[0]
        causal = {}
        if qlen > 1:  # one row sees every own token: no mask
            causal = dict(q_positions=torch.arange(seq_len - qlen, seq_len), kv_positions=torch.arange(seq_len))
        out[rows], lse[rows] = partial_attention(q_nope[rows], q_pe[rows], cache, slots, scale, rank, **causal)
        start += qlen
    return out, lse


class QRouteSGLangBackend(TorchNativeAttnBackend):
    """The torch-native backend's KV writes, qroute's own part (see the module docstring)."""

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any,
                       save_kv_cache: bool = True, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        lens = forward_batch.extend_seq_lens.tolist()
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, lens, **kwargs)

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Any, forward_batch: Any,
                       save_kv_cache: bool = True, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        lens = [1] * forward_batch.seq_lens.shape[0]
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, lens, **kwargs)

    def _forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer: Any,
                 forward_batch: Any, save_kv_cache: bool, query_lens: list[int], q_rope: torch.Tensor | None = None,
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
        cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id).view(-1, width)
        table = self.req_to_token_pool.req_to_token
        slots_of = [table[int(i), :int(n)].long()
                    for i, n in zip(forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist(),
                                    strict=True)]  # fmt: skip
        out, _lse = own_parts(q[..., :rank], q[..., rank:], cache, slots_of, query_lens, layer.scaling)
        return out.to(q.dtype).reshape(-1, heads * rank)
