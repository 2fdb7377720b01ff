"""A corpus made ready for the engine-free data plane: tokenized, placed, prefilled by the reference
model, and cut into owner shards.

This is what the owner processes, the calibration, the transport benchmark and the core demo share.
The engine-backed version (the vLLM connector) prefills with the engine instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qroute.core.corpus import CorpusDirectory, place_model_corpus
from qroute.core.geometry import MLAGeometry, geometry_from_config
from qroute.dataplane.owner import AttentionParams, OwnerService, compat_for
from qroute.dataplane.shard import CorpusShard, build_shard, prefill_corpus
from qroute.reference.refmodel import RefMLAModel


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
        return compat_for(self.fingerprint, self.directory, self.geometry.latent_width, self.all_rows[0].dtype)

    def shard(self, instance: str) -> CorpusShard:
        return build_shard(self.all_rows, self.directory, instance)

    def owner_service(self, instance: str, secret: bytes, **options) -> OwnerService:
        return OwnerService(
            {self.directory.name: self.shard(instance)},
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
    token_ids, directory, fingerprint = plan_corpus(
        model_dir, corpus_dir, instances=instances, name=name, replicas=replicas, block_size=block_size,
        blocks_per_chunk=blocks_per_chunk, max_tokens=max_tokens,
    )  # fmt: skip
    return PreparedCorpus(
        model=model,
        fingerprint=fingerprint,
        geometry=geometry_from_config(model_dir, cache_dtype="float32", dtype="float32"),
        params=AttentionParams.from_config(model.config),
        token_ids=token_ids,
        directory=directory,
        all_rows=prefill_corpus(model, token_ids, directory),
    )


def plan_corpus(
    model_dir: str | Path,
    corpus_dir: str | Path,
    *,
    instances: list[str],
    name: str = "corpus",
    replicas: int = 1,
    block_size: int = 16,
    blocks_per_chunk: int = 4,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, CorpusDirectory, str]:
    """Tokenize and place without the prefill: ``(token_ids [num_tokens] int64, directory, model fingerprint)``.

    Enough for a requester that holds no share (it needs the directory for the handshake, not the rows).
    """
    token_ids, directory = place_model_corpus(
        model_dir, corpus_dir, name=name, instances=instances, replicas=replicas, block_size=block_size,
        blocks_per_chunk=blocks_per_chunk, max_tokens=max_tokens,
    )  # fmt: skip
    return torch.tensor(token_ids, dtype=torch.int64), directory, directory.model_fingerprint
