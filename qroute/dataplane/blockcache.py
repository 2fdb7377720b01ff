"""A bounded LRU cache of fetched corpus blocks.

Keyed by (corpus, layer, block id); holds each block's latent rows ``[num_tokens, width]``. The router
looks here before it fetches an owner group: a group whose blocks are all cached is attended locally,
without a transfer. The predicate does not price cached blocks yet (it still decides fetch or route for
the group); the ``qroute.metrics.CACHE`` counters (hits, misses, inserts, evictions) are what a
reuse-aware predicate would read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from qroute.metrics import CACHE, Metrics

Key = tuple[str, int, int]  # (corpus, layer, block id)


class BlockCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.stats = Metrics(CACHE)
        self._rows: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, corpus: str, layer: int, block_ids: tuple[int, ...]) -> torch.Tensor | None:
        """Rows of all ``block_ids`` concatenated in order, or None if any is missing."""
        with self._lock:
            keys = [(corpus, layer, b) for b in block_ids]
            if not all(k in self._rows for k in keys):
                self.stats.add("misses")
                return None
            for k in keys:
                self._rows.move_to_end(k)
            self.stats.add("hits")
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
                self.stats.add("inserts")
            while self._bytes > self.max_bytes:
                _, evicted = self._rows.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
                self.stats.add("evictions")
