"""A bounded LRU cache of fetched corpus blocks, with reuse accounting.

Keyed by (corpus, layer, block id); holds each block's latent rows ``[num_tokens, width]``. A block
found here is resident, so the predicate prices it as local. ``hits`` over ``inserts`` is the
observed reuse the cost model's ``reuse`` should track.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

Key = tuple[str, int, int]  # (corpus, layer, block id)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0

    @property
    def observed_reuse(self) -> float:
        """Average uses per fetched block so far (1 = never reused)."""
        return (self.hits + self.inserts) / self.inserts if self.inserts else 1.0


class BlockCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._rows: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, key: Key) -> bool:
        return key in self._rows

    def holds_all(self, corpus: str, layer: int, block_ids: tuple[int, ...]) -> bool:
        return all((corpus, layer, b) in self._rows for b in block_ids)

    def get(self, corpus: str, layer: int, block_ids: tuple[int, ...]) -> torch.Tensor | None:
        """Rows of all ``block_ids`` concatenated in order, or None if any is missing."""
        with self._lock:
            keys = [(corpus, layer, b) for b in block_ids]
            if not all(k in self._rows for k in keys):
                self.stats.misses += 1
                return None
            for k in keys:
                self._rows.move_to_end(k)
            self.stats.hits += 1
            return torch.cat([self._rows[k] for k in keys])

    def put(self, corpus: str, layer: int, block_ids: tuple[int, ...], rows: list[torch.Tensor]) -> None:
        """Keep each block's rows; evicts least recently used blocks beyond ``max_bytes``."""
        with self._lock:
            for block_id, block_rows in zip(block_ids, rows, strict=True):
                size = block_rows.numel() * block_rows.element_size()
                if size > self.max_bytes:
                    continue
                key = (corpus, layer, block_id)
                old = self._rows.pop(key, None)
                if old is not None:
                    self._bytes -= old.numel() * old.element_size()
                self._rows[key] = block_rows.clone()
                self._bytes += size
                self.stats.inserts += 1
            while self._bytes > self.max_bytes:
                _, evicted = self._rows.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
                self.stats.evictions += 1
