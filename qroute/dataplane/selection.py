"""Which corpus blocks a request attends to, per layer: every block (``dense``), the top-k by key summaries
(``summary``), or the blocks of DeepSeek-V3.2's indexer output (``indexer``).

- ``BlockSummaries``: per layer and corpus block, the element-wise min and max of its latent rows ``[c | k_pe]``
  (Quest's key bounds), built when the corpus is stored. For a query ``q = [q_nope | q_pe]`` (roped at its corpus
  position), ``sum_d max(q_d * min_d, q_d * max_d)`` bounds ``q . k`` from above for every key of the block, so a
  block holding a high-scoring key has a high bound.
- ``summary_top_k``: a request's ``k`` blocks with the highest bound, over its rows and heads (the max: a block is
  worth reading if any head of any of its rows would weigh it), plus the ``window`` most recent blocks it sees
  (DSA's local window). Per request, not per row: a decode request has one row anyway, and a request's rows then
  share one selection and so one message per owner. Deterministic: ties go to the lower block id, so every
  instance holding the same summaries picks the same blocks for the same query.
- ``indexer_blocks``: DSA's ``topk_indices`` rows (request-local logical token positions, -1 padding) mapped to
  the corpus blocks they fall in; positions past the corpus are the request's own tokens, which its own part
  always attends to.

Selection only narrows the corpus part; the own part is always whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qroute.errors import ConfigError

__all__ = ["SELECTORS", "BlockSummaries", "Selection", "indexer_blocks", "summary_top_k"]

SELECTORS = ("dense", "summary", "indexer")


@dataclass(frozen=True)
class Selection:
    """How a request selects its corpus blocks: ``selector`` (one of ``SELECTORS``), ``topk`` blocks per layer
    (``summary``), and ``window`` most recent corpus blocks always included."""

    selector: str = "dense"
    topk: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise ConfigError(f"selector {self.selector!r} is not one of {SELECTORS}")
        if self.selector == "summary" and self.topk < 1:
            raise ConfigError(f"selector 'summary' needs topk >= 1 blocks, got {self.topk}")
        if self.topk < 0 or self.window < 0:
            raise ConfigError(f"topk and window must be >= 0, got topk={self.topk} window={self.window}")

    @property
    def dense(self) -> bool:
        return self.selector == "dense"


class BlockSummaries:
    """Per-block key bounds of one layer: ``low``/``high`` ``[num_blocks, width]`` float32. A block not summarised
    yet has ``low = +inf``, ``high = -inf`` (``ready`` is False for it)."""

    def __init__(self, num_blocks: int, width: int):
        self.low = torch.full((num_blocks, width), float("inf"))
        self.high = torch.full((num_blocks, width), float("-inf"))

    @property
    def ready(self) -> torch.Tensor:
        """``[num_blocks]`` bool: the blocks whose rows have been summarised."""
        return (self.low <= self.high).all(dim=1)

    def add(self, block_ids: Sequence[int], rows: Sequence[torch.Tensor]) -> None:
        """Summarise blocks from their latent rows (each ``[tokens of the block, width]``)."""
        for block_id, block_rows in zip(block_ids, rows, strict=True):
            block_rows = block_rows.float()
            self.low[block_id] = block_rows.amin(dim=0)
            self.high[block_id] = block_rows.amax(dim=0)

    def bounds(self, q_nope: torch.Tensor, q_pe: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """``[num_blocks]`` float32: each of the first ``num_blocks`` blocks' upper bound on ``q . k`` over every
        row and head of ``q_nope [T, H, R]`` / ``q_pe [T, H, P]`` (roped at corpus positions)."""
        q = torch.cat([q_nope.float(), q_pe.float()], dim=-1).reshape(-1, self.low.shape[1])  # [T*H, W]
        low, high = self.low[:num_blocks], self.high[:num_blocks]
        return (q.clamp_min(0) @ high.T + q.clamp_max(0) @ low.T).amax(dim=0)


def summary_top_k(bounds: torch.Tensor, k: int, *, window: int = 0) -> tuple[int, ...]:
    """The ``k`` blocks with the highest ``bounds`` (ties: lower block id first) and the last ``window`` blocks,
    in block order."""
    num_blocks = bounds.shape[0]
    if k >= num_blocks:
        return tuple(range(num_blocks))
    # a stable sort of -bounds keeps equal bounds in block order: the lower id wins a tie, on every instance
    order = torch.sort(-bounds.double(), stable=True).indices[:k].tolist()
    chosen = set(order) | set(range(max(0, num_blocks - window), num_blocks))
    return tuple(sorted(chosen))


def indexer_blocks(indices: torch.Tensor, corpus_tokens: int, block_size: int) -> tuple[int, ...]:
    """Corpus blocks holding any of DSA's selected positions ``indices`` (any shape of request-local logical token
    positions, ``-1`` padding), in block order. Positions ``>= corpus_tokens`` are the request's own tokens."""
    if indices.dtype.is_floating_point:
        raise ConfigError(f"indexer indices must be integers, got {indices.dtype}")
    flat = indices.reshape(-1).long()
    flat = flat[(flat >= 0) & (flat < corpus_tokens)]
    return tuple(torch.unique(flat // block_size).tolist())
