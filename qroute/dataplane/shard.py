"""An owner's resident share of a corpus: its latent rows per layer and where each block sits.

The layout is a pure function of the corpus directory and the instance id (the instance's chunks in
chunk order, their blocks in order), so a requester computes the byte ranges of a one-sided READ
itself, without asking the owner.

Tensors: each layer's rows are ``[num_rows, kv_lora_rank + rope_dim]``, contiguous, on the host;
``k_pe`` is roped at the token's global corpus position. These tensors are the only memory an owner
registers with a transport (``regions()``).

Readiness: ``ready`` (uint8 per corpus block, also a region) says which held blocks have their rows stored. An
owner whose rows are given at construction is ready at once; an engine's store starts empty and marks each chunk
when its prefill has written every layer (``mark_ready``). A block that is not ready is never answered from: the
owner refuses routes to it (``NOT_READY``) and a requester reads the flags before it trusts a fetch (the router).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from qroute.core.handshake import compat_key
from qroute.core.placement import CorpusDirectory
from qroute.errors import ConfigError, CorpusError
from qroute.numerics.rowformat import RowFormat

BlockRows = dict[int, tuple[int, int]]  # block id -> (first row in the shard, number of tokens)
SLOTS_KEPT = 256  # block lists whose rows a shard keeps (``CorpusShard.slots``)


def block_range(directory: CorpusDirectory, block_id: int) -> tuple[int, int]:
    """Global token range ``[start, end)`` of a corpus block (the last one may be partial)."""
    start = block_id * directory.block_size
    return start, min(start + directory.block_size, directory.num_tokens)


def block_tokens(directory: CorpusDirectory, block_id: int) -> int:
    """Tokens in a corpus block (``block_size``, fewer for the last one)."""
    start, end = block_range(directory, block_id)
    return end - start


def chunk_blocks(directory: CorpusDirectory, chunk) -> range:
    """The ids of the blocks a corpus chunk spans."""
    return range(chunk.start // directory.block_size, -(-chunk.end // directory.block_size))


def shard_layout(directory: CorpusDirectory, instance: str) -> BlockRows:
    """Where each block ``instance`` holds sits in its shard: its chunks in chunk order."""
    return chunk_layout(directory, [c.chunk_id for c in directory.chunks_of(instance)])


def chunk_layout(directory: CorpusDirectory, chunk_ids: Sequence[int], first_row: int = 0) -> BlockRows:
    """Where each block of ``chunk_ids`` sits in a store that holds those chunks in that order from ``first_row``
    (a store that gains chunks when membership changes appends them: ``CorpusShard.add_chunks``)."""
    rows: BlockRows = {}
    next_row = first_row
    for chunk_id in chunk_ids:
        for block_id in chunk_blocks(directory, directory.chunk(chunk_id)):
            start, end = block_range(directory, block_id)
            rows[block_id] = (next_row, end - start)
            next_row += end - start
    return rows


def region_name(corpus: str, layer: int) -> str:
    """Name of the transport region holding one corpus layer's rows on an owner."""
    return f"{corpus}/layer{layer}"


def ready_region_name(corpus: str) -> str:
    """Name of the transport region holding an owner's per-block ready flags (``CorpusShard.ready``)."""
    return f"{corpus}/ready"


def summary_region_name(corpus: str, layer: int) -> str:
    """Name of the transport region holding one layer's block summaries (``selection.BlockSummaries``)."""
    return f"{corpus}/summary{layer}"


def byte_ranges(block_rows: BlockRows, block_ids: Sequence[int], row_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) byte ranges of ``block_ids``' rows in one layer's region, adjacent ones merged."""
    ranges: list[tuple[int, int]] = []
    for block_id in block_ids:
        try:
            row, count = block_rows[block_id]
        except KeyError:
            raise CorpusError(f"block {block_id} is not held by this owner") from None
        offset, length = row * row_bytes, count * row_bytes
        if ranges and ranges[-1][0] + ranges[-1][1] == offset:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
        else:
            ranges.append((offset, length))
    return ranges


def compat_for(model_fingerprint: str, directory: CorpusDirectory, width: int, row_format: str | torch.dtype,
               rope: str = "interleaved") -> str:  # fmt: skip
    """What two instances must agree on before exchanging rows: model, latent width, block size, row format
    (a ``RowFormat`` name; a torch dtype names the dense one), RoPE pair layout (``handshake.compat_key``)."""
    return compat_key(model_fingerprint, width, directory.block_size, str(row_format).removeprefix("torch."),
                      rope=rope)  # fmt: skip


@dataclass
class CorpusShard:
    """The blocks of one corpus that one instance holds, for every layer, stored in ``format``."""

    directory: CorpusDirectory
    instance: str
    layers: list[torch.Tensor]  # per layer [num_rows, format.storage_width] of format.storage_dtype, contiguous
    block_rows: BlockRows
    format: RowFormat
    # per layer [num_blocks, 2, width] float32: every corpus block's key bounds (selection), exposed as regions
    summaries: list[torch.Tensor] | None = None
    # uint8 [num_blocks]: 1 where this shard's rows of the block are stored; None: every held block (rows given)
    ready: torch.Tensor | None = None
    rope: str = "interleaved"  # pair layout of the rows' RoPE half, "interleaved" or "neox" (part of compat_key)
    _slots_kept: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _all_ready: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        num_rows = self.used_rows
        fmt = self.format
        for layer, rows in enumerate(self.layers):  # rows past the held blocks' are room for chunks gained later
            if rows.ndim != 2 or rows.shape[0] < num_rows or rows.shape[1] != fmt.storage_width \
                    or rows.dtype != fmt.storage_dtype or not rows.is_contiguous():
                raise ConfigError(f"shard layer {layer}: rows {rows.dtype} {tuple(rows.shape)} must be contiguous "
                                  f"[>= {num_rows}, {fmt.storage_width}] {fmt.storage_dtype} ({fmt.name})")
        if self.ready is None:  # rows given at construction: every held block is ready
            self.ready = torch.zeros(self.directory.num_blocks, dtype=torch.uint8)
            self.ready[list(self.block_rows)] = 1
        self._all_ready = bool(self.ready[list(self.block_rows)].all())

    @property
    def used_rows(self) -> int:
        return max((row + count for row, count in self.block_rows.values()), default=0)

    @property
    def capacity_rows(self) -> int:
        return self.layers[0].shape[0] if self.layers else 0

    def store_chunks(self) -> list[int]:
        """The chunks held, in the order of their rows (what ``chunk_layout`` needs to find them)."""
        order: list[int] = []
        for block_id in sorted(self.block_rows, key=lambda b: self.block_rows[b][0]):
            chunk_id = self.directory.chunk_for_block(block_id).chunk_id
            if not order or order[-1] != chunk_id:
                order.append(chunk_id)
        return order

    def add_chunks(self, chunk_ids: Sequence[int]) -> None:
        """Hold ``chunk_ids`` too, in the rows after the used ones (not ready until ``mark_ready``); raises
        CorpusError when the store has no room for them."""
        added = chunk_layout(self.directory, [c for c in chunk_ids if c not in self.store_chunks()], self.used_rows)
        need = max((row + count for row, count in added.values()), default=0)
        if need > self.capacity_rows:
            raise CorpusError(f"corpus {self.directory.name!r}: instance {self.instance!r} has no room for chunks "
                              f"{list(chunk_ids)[:8]} ({need} rows needed, {self.capacity_rows} allocated)")
        for block_id in added:
            self.ready[block_id] = 0
        self.block_rows = {**self.block_rows, **added}  # one assignment: the owner's threads see old or new
        self._slots_kept.clear()
        self._all_ready = False

    def mark_ready(self, block_ids: Sequence[int]) -> None:
        """The rows of ``block_ids`` are stored, every layer: serve them from now on."""
        self.ready[list(block_ids)] = 1
        self._all_ready = bool(self.ready[list(self.block_rows)].all())

    def not_ready(self, block_ids: Sequence[int]) -> list[int]:
        """The blocks among ``block_ids`` whose rows are not stored."""
        if self._all_ready:
            return []
        return [b for b in block_ids if not self.ready[b]]

    @property
    def width(self) -> int:
        """Latent row width ``R + P``."""
        return self.format.width

    @property
    def row_bytes(self) -> int:
        return self.format.row_bytes

    def compat_key(self, model_fingerprint: str) -> str:
        return compat_for(model_fingerprint, self.directory, self.width, self.format.name, self.rope)

    def holds(self, block_ids: Sequence[int]) -> bool:
        if isinstance(block_ids, tuple) and block_ids in self._slots_kept:
            return True
        return all(b in self.block_rows for b in block_ids)

    def slots(self, block_ids: Sequence[int]) -> torch.Tensor | range:
        """Rows of ``block_ids`` in order: a ``range`` where they are adjacent (read in place), else int64
        ``[num_tokens]``. Kept for tuples of ids: an owner is asked for the same few block lists by every
        requester, every layer and every step."""
        if not isinstance(block_ids, tuple):
            return self._slots(block_ids)
        slots = self._slots_kept.get(block_ids)
        if slots is None:
            if len(self._slots_kept) >= SLOTS_KEPT:
                self._slots_kept.clear()
            slots = self._slots_kept[block_ids] = self._slots(block_ids)
        return slots

    def _slots(self, block_ids: Sequence[int]) -> torch.Tensor | range:
        try:
            pairs = [self.block_rows[b] for b in block_ids]
        except KeyError as exc:
            raise CorpusError(
                f"corpus {self.directory.name!r}: block {exc.args[0]} is not held by instance {self.instance!r}"
            ) from None
        if not pairs:
            return torch.empty(0, dtype=torch.int64)
        # vectorised (a torch.arange per block costs microseconds each): row = start of its block + offset in it
        starts, counts = np.array(pairs, dtype=np.int64).T
        if (starts[1:] == starts[:-1] + counts[:-1]).all():  # each block right after the one before
            return range(int(starts[0]), int(starts[-1] + counts[-1]))
        ends = np.cumsum(counts)
        return torch.from_numpy(np.arange(ends[-1]) + np.repeat(starts - (ends - counts), counts))

    def regions(self) -> dict[str, torch.Tensor]:
        regions = {region_name(self.directory.name, layer): rows for layer, rows in enumerate(self.layers)}
        for layer, table in enumerate(self.summaries or ()):
            regions[summary_region_name(self.directory.name, layer)] = table
        regions[ready_region_name(self.directory.name)] = self.ready
        return regions

    @property
    def nbytes(self) -> int:
        return sum(rows.numel() * rows.element_size() for rows in self.layers)


def corpus_positions(directory: CorpusDirectory, block_ids: Sequence[int]) -> torch.Tensor:
    """Global positions of the tokens of ``block_ids``, in order, int64."""
    parts = [torch.arange(*block_range(directory, b)) for b in block_ids]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
