"""Block selection: summary bounds checked against brute-force scores, deterministic top-k, the DSA indexer
adapter on synthetic indices."""

from __future__ import annotations

import pytest
import torch

from qroute.dataplane.selection import BlockSummaries, Selection, indexer_blocks, summary_top_k
from qroute.errors import ConfigError

BLOCK, WIDTH, RANK = 16, 576, 512


def _corpus(num_blocks: int, seed: int) -> torch.Tensor:
    """Rows whose blocks differ in direction (as a codebase's files do), not only noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_blocks, 1, WIDTH, generator=g)
    return (centres + 0.3 * torch.randn(num_blocks, BLOCK, WIDTH, generator=g)).reshape(-1, WIDTH)


def _summaries(rows: torch.Tensor) -> BlockSummaries:
    num_blocks = rows.shape[0] // BLOCK
    s = BlockSummaries(num_blocks, WIDTH)
    s.add(range(num_blocks), list(rows.split(BLOCK)))
    return s


def _brute_force(rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per block, the highest score of any of its keys for any row and head of q ``[T, H, W]``."""
    scores = q.reshape(-1, WIDTH) @ rows.T  # [T*H, tokens]
    return scores.amax(dim=0).reshape(-1, BLOCK).amax(dim=1)


def test_the_bound_holds_for_every_key_and_the_top_blocks_are_the_brute_force_ones():
    rows = _corpus(32, seed=0)
    summaries = _summaries(rows)
    assert bool(summaries.ready.all())
    hits = 0
    for trial in range(20):
        q = torch.randn(1, 4, WIDTH, generator=torch.Generator().manual_seed(100 + trial))
        bounds = summaries.bounds(q[..., :RANK], q[..., RANK:], 32)
        truth = _brute_force(rows, q)
        assert (bounds >= truth - 1e-3).all()  # an upper bound, block by block
        best = int(truth.argmax())
        hits += best in summary_top_k(bounds, 4)
    assert hits >= 18, hits  # the block with the best key is nearly always among the 4 of 32 selected


def test_a_planted_key_is_selected():
    rows = _corpus(32, seed=1)
    q = torch.randn(1, 4, WIDTH, generator=torch.Generator().manual_seed(7))
    rows[20 * BLOCK + 5] = 3.0 * q[0, 2] / q[0, 2].norm() * rows.norm(dim=1).mean()  # one key aligned with head 2
    bounds = _summaries(rows).bounds(q[..., :RANK], q[..., RANK:], 32)
    assert int(_brute_force(rows, q).argmax()) == 20
    assert summary_top_k(bounds, 1) == (20,)


def test_top_k_is_deterministic_ties_go_to_the_lower_id_and_the_window_is_added():
    bounds = torch.tensor([1.0, 5.0, 5.0, 0.0, 5.0, 2.0])
    assert summary_top_k(bounds, 2) == (1, 2)  # three tie at 5: blocks 1 and 2 win
    assert summary_top_k(bounds, 2, window=2) == (1, 2, 4, 5)
    assert summary_top_k(bounds, 10) == tuple(range(6))


def test_unsummarised_blocks_are_not_ready():
    s = BlockSummaries(4, WIDTH)
    s.add([0, 2], [torch.zeros(BLOCK, WIDTH), torch.ones(3, WIDTH)])
    assert s.ready.tolist() == [True, False, True, False]


def test_indexer_indices_map_to_corpus_blocks():
    corpus_tokens = 100  # blocks 0..6, the last one partial
    indices = torch.tensor([[3, 17, -1, 18, 99, 100, 130], [-1, -1, 64, 0, 5, -1, -1]], dtype=torch.int32)
    # 100 and 130 are the request's own tokens (its own part has them); -1 is padding
    assert indexer_blocks(indices, corpus_tokens, BLOCK) == (0, 1, 4, 6)
    assert indexer_blocks(torch.full((2, 8), -1), corpus_tokens, BLOCK) == ()
    with pytest.raises(ConfigError, match="integers"):
        indexer_blocks(torch.zeros(3), corpus_tokens, BLOCK)


def test_selection_config_is_checked():
    assert Selection().dense and not Selection("summary", topk=4).dense
    with pytest.raises(ConfigError, match="not one of"):
        Selection("quest")
    with pytest.raises(ConfigError, match="topk >= 1"):
        Selection("summary")
