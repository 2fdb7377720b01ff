"""Worker side of the qroute connector (runs in vLLM's Worker process, next to the model and KV cache): vLLM's
adapter to the engine-free ``CorpusWorker`` (``qroute.dataplane.corpus_worker``, which says what each phase does).

- ``register_kv_caches`` (once): checks vLLM's paged caches against the model and the corpus, maps their names to
  layer indices, opens the store (``open_store``) and the metrics sampler.
- ``start_step`` (once per step, from ``bind_connector_metadata``): maps query rows to requests by the slot of
  their first scheduled token (``map_rows``: nothing in vLLM's forward context carries request ids), then
  ``plan_step``.
- ``attend_step`` (once per layer, from the attention backend): ``CorpusWorker.attend_step``.
- ``save_layer`` (once per layer, from ``save_kv_layer``): ``store_layer`` over the paged cache as rows.

Failures never raise into the engine: a request whose corpus part cannot be computed gets none, an ERROR
line, and ``"error"`` in its response (see ``QRouteWorkerMeta``). Under ``kv_load_failure_policy`` "fail"
(vLLM's default) it is also failed through vLLM's KV-load-failure path: ``take_load_errors`` (the connector's
``get_block_ids_with_load_errors``) returns one of its already computed paged-cache blocks
(``RequestStep.computed_block``), in this step if it has one, else in each of its next steps (``failed``),
and vLLM's scheduler finishes it with FINISHED_ERROR. A request that fails on its first step (prefill) and
ends there (``max_tokens=1``) returns normally, with ``"error"``, which ``qroute.plugin.vllm_http``'s middleware
turns into HTTP 500 (a streamed one it serves unstreamed for that: vLLM streams no ``kv_transfer_params``).
"""

from __future__ import annotations

import logging

import torch

from qroute.connectors.vllm_meta import QRouteStepMeta, QRouteWorkerMeta, map_rows
from qroute.connectors.vllm_stats import QRouteConnectorStats, StatsSampler
from qroute.core.config import QRouteConfig
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.corpus_worker import CorpusWorker
from qroute.dataplane.membership import Membership
from qroute.errors import ConfigError

__all__ = ["QRouteWorkerSide"]

logger = logging.getLogger("vllm.qroute")


class QRouteWorkerSide(CorpusWorker):
    report_class = QRouteWorkerMeta

    def __init__(self, config: QRouteConfig, directory: CorpusDirectory, model_dir: str, model_dtype: torch.dtype,
                 membership: Membership | None = None):  # fmt: skip
        # vLLM ropes DeepSeek with is_neox_style=False whatever the checkpoint's rope_interleave says, and casts its
        # cos/sin table to the model dtype.
        super().__init__(config, directory, model_dir, model_dtype, membership, log=logger, interleaved=True)
        self.sampler: StatsSampler | None = None  # what /metrics gets after each step
        self.layer_index: dict[str, int] = {}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        self.layer_index = {name: extract_layer_index(name) for name in kv_caches}
        num_layers = self.geometry.num_layers
        if sorted(self.layer_index.values()) != list(range(num_layers)):
            raise ConfigError(f"qroute: expected KV caches for layers 0..{num_layers - 1}, got {sorted(kv_caches)}")
        for name, cache in kv_caches.items():
            if cache.dtype != self.store_dtype:
                raise ConfigError(f"qroute: KV cache {name} is {cache.dtype}; qroute needs the cache in the model "
                                  f"dtype {self.store_dtype} (--kv-cache-dtype auto)")  # fmt: skip
            if cache.shape[-1] != self.width or cache.shape[-2] != self.directory.block_size:
                raise ConfigError(f"qroute: KV cache {name} has shape {tuple(cache.shape)}; expected blocks of "
                                  f"{self.directory.block_size} rows of {self.width}")  # fmt: skip
        self.open_store()
        self.sampler = StatsSampler(self.router.stats, self.service.stats, lambda: {
            p: p in self.router.peers and self.router.peers[p].alive for p in self.links.peers})  # fmt: skip

    def start_step(self, meta: QRouteStepMeta, slot_mapping: torch.Tensor, query_start_loc: torch.Tensor) -> None:
        """Plan this step: ``slot_mapping [T]`` and ``query_start_loc [num_reqs + 1]`` of the forward."""
        slots = slot_mapping.to(device="cpu", dtype=torch.int64)
        placed = map_rows(slots.tolist(), query_start_loc.tolist(), meta.requests) if meta.requests else []
        self.plan_step(placed, slots)

    def save_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        """Copy corpus-prefill rows of this layer from the paged cache into the store (global RoPE)."""
        layer = self.layer_index.get(layer_name)
        if layer is not None:
            self.store_layer(layer, kv_layer.reshape(-1, self.width))

    def take_stats(self) -> QRouteConnectorStats | None:
        """This step's metrics for vLLM's /metrics (``vllm_stats``); None before the store exists or when idle."""
        stats = QRouteConnectorStats(self.sampler.take()) if self.sampler is not None else None
        return None if stats is None or stats.is_empty() else stats
