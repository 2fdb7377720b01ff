"""Stand-in ``sgl_kernel`` for SGLang on a CPU without SGLang's CPU kernels (see the parent package).

Only what the model runner, scheduler and torch-native attention reach is implemented, in torch; the speculative-
decoding and cache-move ops raise, naming themselves, so that nothing runs silently wrong."""

from __future__ import annotations

import torch


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor, out_cache_loc: torch.Tensor,
                                 pool_len: int) -> None:  # fmt: skip
    """``req_to_token[req, start:end] = the request's run of out_cache_loc``, requests' runs back to back (what the
    Triton kernel ``assign_req_to_token_pool`` does on a GPU)."""
    taken = 0
    for req, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist(), strict=True):
        req_to_token[req, start:end] = out_cache_loc[taken:taken + end - start].to(req_to_token.dtype)
        taken += end - start


def _not_here(name: str):
    def op(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"sgl_kernel.{name} is not in qroute's CPU stand-in (speculative decoding and "
                                  "cache moves are not supported on this path)")  # fmt: skip

    op.__name__ = name
    return op


copy_all_layer_kv_cache_cpu = _not_here("copy_all_layer_kv_cache_cpu")
rotate_input_ids_cpu = _not_here("rotate_input_ids_cpu")
fill_accept_out_cache_loc_cpu = _not_here("fill_accept_out_cache_loc_cpu")
fill_bonus_tokens_cpu = _not_here("fill_bonus_tokens_cpu")
assign_draft_cache_locs_contiguous_cpu = _not_here("assign_draft_cache_locs_contiguous_cpu")
assign_extend_cache_locs_cpu = _not_here("assign_extend_cache_locs_cpu")
build_tree_kernel_efficient_cpu = _not_here("build_tree_kernel_efficient_cpu")
verify_tree_greedy_cpu = _not_here("verify_tree_greedy_cpu")
