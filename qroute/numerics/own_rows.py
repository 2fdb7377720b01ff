"""Each request's own part: causal absorbed attention of its rows over its own tokens, wherever an engine keeps
them. The engine adapters (vLLM's CPU backend, SGLang's backend) say where each request's rows and own tokens sit
once per step (``OwnRows.causal``); every layer then runs ``own_parts`` over that plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qroute.numerics.attention import Part, partial_attention

__all__ = ["OwnRows", "own_parts"]


@dataclass(frozen=True)
class OwnRows:
    """Where one request's rows and own tokens are this step: the same for every layer.

    Rows ``[start, stop)`` are the request's last ``stop - start`` own tokens; row ``j`` sits at own position
    ``seq_len - n + j`` and sees own positions up to its own. ``slots``: the cache rows of its ``seq_len`` own
    tokens, in order. A single row sees every own token, so it needs no mask (and gets the fused kernel)."""

    start: int
    stop: int
    slots: torch.Tensor
    q_positions: torch.Tensor | None
    kv_positions: torch.Tensor | None

    @classmethod
    def causal(cls, start: int, num_rows: int, slots: torch.Tensor) -> OwnRows:
        seq_len = slots.shape[0]
        if num_rows == 1:
            return cls(start, start + 1, slots, None, None)
        return cls(start, start + num_rows, slots, torch.arange(seq_len - num_rows, seq_len), torch.arange(seq_len))


def own_parts(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, planned: Sequence[OwnRows],
              scale: float) -> Part:  # fmt: skip
    """Every planned request's own part, ``(out [T, H, R], lse [T, H])`` float32 natural log, over ``kv_cache``
    (``[num_slots, R + P]`` or paged ``[num_blocks, block_size, R + P]``). Rows no request plans are left as
    allocated (an engine plans every row it computes)."""
    num_rows, num_heads, rank = q_nope.shape
    out = torch.empty(num_rows, num_heads, rank, dtype=torch.float32, device=q_nope.device)
    lse = torch.empty(num_rows, num_heads, dtype=torch.float32, device=q_nope.device)
    for rows in planned:
        a, b = rows.start, rows.stop
        out[a:b], lse[a:b] = partial_attention(q_nope[a:b], q_pe[a:b], kv_cache, rows.slots.to(kv_cache.device),
                                               scale, rank, q_positions=rows.q_positions,
                                               kv_positions=rows.kv_positions)  # fmt: skip
    return out, lse
