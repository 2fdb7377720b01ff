"""A corpus made ready for the engine-free data plane: tokenized, placed, prefilled by the reference
model, and cut into owner shards.

This is what the owner processes, the calibration, the transport benchmark and the core demo share.
The engine-backed version (the vLLM connector) prefills with the engine instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qroute.core.corpus import place_model_corpus
from qroute.core.geometry import MLAGeometry, geometry_from_config
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.owner import OwnerService
from qroute.dataplane.shard import CorpusShard, compat_for, corpus_positions, shard_layout
from qroute.errors import ConfigError, CorpusError
from qroute.numerics.attention import AttentionParams, merge, partial_attention
from qroute.numerics.rowformat import RowFormat, row_format
from qroute.reference.refmodel import Attend, RefMLAModel


@dataclass
class PreparedCorpus:
    model: RefMLAModel
    fingerprint: str
    geometry: MLAGeometry
    params: AttentionParams
    token_ids: torch.Tensor  # [num_tokens] int64
    directory: CorpusDirectory
    all_rows: list[torch.Tensor]  # per layer [num_tokens, width] float32, exact-mode prefill

    @property
    def compat(self) -> str:
        return self.compat_of()

    def compat_of(self, row_format: str | None = None) -> str:
        """The compat hash of owners storing rows in ``row_format`` (default: dense, the rows' dtype)."""
        width = self.geometry.latent_width
        return compat_for(self.fingerprint, self.directory, width, self.row_format(row_format).name)

    def row_format(self, name: str | None = None) -> RowFormat:
        """The store format ``name`` (default: dense, the rows' own dtype) for this model's rows."""
        return row_format(name or self.all_rows[0].dtype, self.params.kv_lora_rank,
                          self.geometry.latent_width - self.params.kv_lora_rank)  # fmt: skip

    def shard(self, instance: str, row_format: str | None = None) -> CorpusShard:
        return build_shard(self.all_rows, self.directory, instance, self.row_format(row_format))

    def owner_service(self, instance: str, secret: bytes, *, row_format: str | None = None,
                      **options) -> OwnerService:
        return OwnerService(
            {self.directory.name: self.shard(instance, row_format)},
            self.params,
            instance_id=instance,
            model_fingerprint=self.fingerprint,
            secret=secret,
            **options,
        )


def prepare_corpus(
    model_dir: str | Path,
    corpus_dir: str | Path,
    *,
    instances: list[str],
    name: str = "corpus",
    replicas: int = 1,
    block_size: int = 16,
    blocks_per_chunk: int = 4,
    max_tokens: int | None = None,
) -> PreparedCorpus:
    """Tokenize ``corpus_dir`` with the model's tokenizer, place it on ``instances`` and prefill it.

    ``max_tokens`` keeps only the first tokens (the reference forward is quadratic in a chunk only,
    but the demo and tests stay small on a 2-core machine).
    """
    model = RefMLAModel.from_dir(model_dir)
    token_ids, directory = place_model_corpus(
        model_dir, corpus_dir, name=name, instances=instances, replicas=replicas, block_size=block_size,
        blocks_per_chunk=blocks_per_chunk, max_tokens=max_tokens,
    )  # fmt: skip
    token_ids = torch.tensor(token_ids, dtype=torch.int64)
    return PreparedCorpus(
        model=model,
        fingerprint=directory.model_fingerprint,
        geometry=geometry_from_config(model_dir, cache_dtype="float32", dtype="float32"),
        params=AttentionParams.from_config(model.config),
        token_ids=token_ids,
        directory=directory,
        all_rows=prefill_corpus(model, token_ids, directory),
    )


def prefix_attend(model: RefMLAModel, prefix_rows: Sequence[torch.Tensor | None]) -> Attend:
    """``attend`` of one instance holding a resident prefix: each layer's own tokens causally, merged with all
    of ``prefix_rows[layer]`` (``[num_rows, width]``, roped at their positions; None: the own part only)."""

    def attend(layer, q_nope, q_pe, own, q_positions):
        part = model.self_attention(layer, q_nope, q_pe, own, q_positions)
        rows = prefix_rows[layer]
        if rows is None:
            return part
        slots = torch.arange(rows.shape[0])
        return merge([part, partial_attention(q_nope, q_pe, rows, slots, model.scale, model.kv_lora_rank)])

    return attend


@torch.no_grad()
def prefill_corpus(model: RefMLAModel, token_ids: torch.Tensor, directory: CorpusDirectory) -> list[torch.Tensor]:
    """Every layer's latent rows ``[num_tokens, width]`` of the whole corpus, exact mode.

    Chunk by chunk, each at its global positions, attending causally to itself and to all earlier
    chunks: the same result as one forward over the whole corpus, in memory bounded by a chunk.
    """
    if token_ids.shape != (directory.num_tokens,):
        raise CorpusError(
            f"corpus {directory.name!r}: {tuple(token_ids.shape)} token ids for a directory of {directory.num_tokens}"
        )
    layers: list[list[torch.Tensor]] = [[] for _ in range(model.num_layers)]
    for chunk in directory.chunks:
        earlier = [torch.cat(rows) if rows else None for rows in layers]
        positions = torch.arange(chunk.start, chunk.end)
        _, rows = model.forward_collect(token_ids[chunk.start : chunk.end], positions, prefix_attend(model, earlier))
        for layer, r in enumerate(rows):
            layers[layer].append(r)
    return [torch.cat(rows).contiguous() for rows in layers]


def build_shard(all_rows: list[torch.Tensor], directory: CorpusDirectory, instance: str,
                fmt: RowFormat) -> CorpusShard:
    """Cut an instance's share out of the whole corpus's rows (``prefill_corpus``), stored in ``fmt``."""
    if instance not in directory.instances:
        raise ConfigError(
            f"instance {instance!r} is not in corpus {directory.name!r}'s directory {directory.instances}"
        )
    block_rows = shard_layout(directory, instance)
    order = sorted(block_rows, key=lambda b: block_rows[b][0])
    positions = corpus_positions(directory, order)
    layers = [fmt.encode(rows.index_select(0, positions)) for rows in all_rows]
    return CorpusShard(directory=directory, instance=instance, layers=layers, block_rows=block_rows, format=fmt)
