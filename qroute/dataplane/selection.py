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
- ``read_peer_summaries``: the summaries of blocks another instance holds, read one-sidedly from an owner's
  summary regions: every instance knows every block's bounds, so it picks the owners of its top-k without asking
  anyone per step.
- ``indexer_blocks``: DSA's ``topk_indices`` rows (request-local logical token positions, -1 padding) mapped to
  the corpus blocks they fall in; positions past the corpus are the request's own tokens, which its own part
  always attends to.

Selection only narrows the corpus part; the own part is always whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from qroute.core.config import SELECTORS, Selection
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.shard import CorpusShard, byte_ranges, summary_region_name
from qroute.errors import ConfigError, TransportError

__all__ = ["SELECTORS", "BlockSummaries", "Selection", "choose_blocks", "indexer_blocks", "read_peer_summaries",
           "summarise_shard", "summary_top_k"]


class BlockSummaries:
    """Per-block key bounds of one layer, one ``table [num_blocks, 2, width]`` float32 (``[:, 0]`` the element-wise
    min of the block's rows, ``[:, 1]`` the max): an owner's transport exposes it as a region, so that requesters
    read the summaries of the blocks they do not hold. A block not summarised yet is ``+inf`` / ``-inf``."""

    def __init__(self, num_blocks: int, width: int):
        self.table = torch.empty(num_blocks, 2, width)
        self.table[:, 0] = float("inf")
        self.table[:, 1] = float("-inf")

    @property
    def row_bytes(self) -> int:
        """Bytes of one block's summary in ``table``."""
        return self.table[0].numel() * self.table.element_size()

    @property
    def ready(self) -> torch.Tensor:
        """``[num_blocks]`` bool: the blocks whose rows have been summarised."""
        return (self.table[:, 0] <= self.table[:, 1]).all(dim=1)

    def add(self, block_ids: Sequence[int], rows: Sequence[torch.Tensor]) -> None:
        """Summarise blocks from their latent rows (each ``[tokens of the block, width]``)."""
        for block_id, block_rows in zip(block_ids, rows, strict=True):
            block_rows = block_rows.float()
            self.table[block_id, 0] = block_rows.amin(dim=0)
            self.table[block_id, 1] = block_rows.amax(dim=0)

    def bounds(self, q_nope: torch.Tensor, q_pe: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """``[num_blocks]`` float32: each of the first ``num_blocks`` blocks' upper bound on ``q . k`` over every
        row and head of ``q_nope [T, H, R]`` / ``q_pe [T, H, P]`` (roped at corpus positions)."""
        width = self.table.shape[2]
        q = torch.cat([q_nope.float(), q_pe.float()], dim=-1).reshape(-1, width)  # [T*H, W]
        low, high = self.table[:num_blocks, 0], self.table[:num_blocks, 1]
        return (q.clamp_min(0) @ high.T + q.clamp_max(0) @ low.T).amax(dim=0)


def summarise_shard(summaries: Sequence[BlockSummaries], shard: CorpusShard, block_ids: Sequence[int]) -> None:
    """Summarise blocks a shard holds, every layer, from its stored rows (dequantized where FP8)."""
    for layer, layer_summaries in enumerate(summaries):
        stored = shard.layers[layer]
        rows = [shard.format.decode(stored[row:row + count]) for row, count in (shard.block_rows[b] for b in block_ids)]
        layer_summaries.add(block_ids, rows)


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


def choose_blocks(summaries: BlockSummaries, q_nope: torch.Tensor, q_pe: torch.Tensor, num_blocks: int,
                  selection: Selection) -> tuple[int, ...]:
    """The blocks among the first ``num_blocks`` that one request's rows (``q_pe`` roped at corpus positions)
    attend to under a ``summary`` ``selection``: the one rule every instance (and the reference) applies."""
    bounds = summaries.bounds(q_nope, q_pe, num_blocks)
    return summary_top_k(bounds, selection.topk, window=selection.window)


def indexer_blocks(indices: torch.Tensor, corpus_tokens: int, block_size: int) -> tuple[int, ...]:
    """Corpus blocks holding any of DSA's selected positions ``indices`` (any shape of request-local logical token
    positions, ``-1`` padding), in block order. Positions ``>= corpus_tokens`` are the request's own tokens."""
    if indices.dtype.is_floating_point:
        raise ConfigError(f"indexer indices must be integers, got {indices.dtype}")
    flat = indices.reshape(-1).long()
    flat = flat[(flat >= 0) & (flat < corpus_tokens)]
    return tuple(torch.unique(flat // block_size).tolist())


def read_peer_summaries(summaries: Sequence[BlockSummaries], peers: Mapping[str, Any], directory: CorpusDirectory,
                        block_ids: Sequence[int], timeout_s: float) -> None:
    """Fill ``block_ids``' summaries (every layer) with one-sided reads of an owner's summary regions, trying each
    replica in turn (``peers``: instance id -> router ``Peer``). A block whose owners are unreachable, or have not
    summarised it yet (it reads back as not ready), stays not ready."""
    by_owners: dict[tuple[str, ...], list[int]] = {}
    for block_id in block_ids:
        by_owners.setdefault(directory.chunk_for_block(block_id).owners, []).append(block_id)
    row_bytes = summaries[0].row_bytes
    for owners, blocks in by_owners.items():
        ranges = byte_ranges({b: (b, 1) for b in blocks}, blocks, row_bytes)  # a block's summary is one row
        for owner in owners:
            peer = peers.get(owner)
            if peer is None:
                continue
            try:
                tables = []
                for layer in range(len(summaries)):
                    out = np.empty(len(blocks) * row_bytes, np.uint8)
                    peer.connection.read(summary_region_name(directory.name, layer), ranges, out, timeout_s)
                    tables.append(torch.from_numpy(out).view(torch.float32).view(len(blocks), 2, -1))
            except (TransportError, ConnectionError, ConfigError):
                continue
            for layer, table in enumerate(tables):
                summaries[layer].table[blocks] = table
            break
