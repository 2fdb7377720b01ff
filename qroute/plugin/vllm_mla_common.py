"""What qroute's two MLA attention backends for vLLM share (CPU: ``vllm_backend``, CUDA: ``vllm_cuda_backend``).

- ``AllRowsAbsorbed``: a metadata-builder mixin that sends every query row, prefill included, down the absorbed
  ``forward_mqa`` path (``query_len_support = VARLEN``, ``reorder_batch_threshold = 1 << 30``,
  docs/vllm-internals.md (a)) with ``QRouteDecodeMetadata``: the step's ``query_start_loc`` on the host and a slot
  for the backend's own-part plan, made on the step's first layer and reused by the others.
- ``CorpusMerge``: an impl mixin for ``forward_mqa``: the step's metadata checked, the layer's index from its name,
  and the corpus part of every request of the step merged into the own part in one call per layer
  (``CorpusAttention.attend_step``, the connector's worker side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonDecodeMetadata,
    MLACommonMetadata,
    QueryLenSupport,
)

from qroute.errors import ConfigError
from qroute.numerics.attention import Part
from qroute.plugin.vllm import CorpusAttention, CorpusAttentionProvider

__all__ = ["AllRowsAbsorbed", "CorpusMerge", "QRouteDecodeMetadata", "corpus_attention"]


@dataclass
class QRouteDecodeMetadata(MLACommonDecodeMetadata):
    """Stock decode metadata plus what multi-row requests need: ``query_start_loc [num_reqs + 1]`` (host)."""

    query_start_loc: torch.Tensor | None = None
    max_query_len: int = 1
    own_plan: object | None = None  # the backend's own-part plan for this step, made on its first layer


class AllRowsAbsorbed:
    """Mixin for an ``MLACommonMetadataBuilder``: every row, prefill included, takes ``forward_mqa``."""

    query_len_support = QueryLenSupport.VARLEN
    reorder_batch_threshold = 1 << 30

    def _build_decode(
        self,
        block_table_tensor: torch.Tensor,
        seq_lens_device: torch.Tensor,
        max_seq_len: int,
        query_start_loc_cpu: torch.Tensor,
        query_start_loc_device: torch.Tensor,
        num_decode_tokens: int,
        max_query_len: int,
        dcp_tot_seq_lens_device: torch.Tensor | None,
    ) -> QRouteDecodeMetadata:
        return QRouteDecodeMetadata(
            block_table=block_table_tensor,
            seq_lens=seq_lens_device,
            dcp_tot_seq_lens=dcp_tot_seq_lens_device,
            query_start_loc=query_start_loc_cpu,
            max_query_len=max_query_len,
        )


def corpus_attention() -> CorpusAttention | None:
    """The connector's worker side, or None (no connector yet, e.g. during vLLM's profiling run)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    if not isinstance(connector, CorpusAttentionProvider):
        raise ConfigError(f"qroute's attention backend needs the QRouteConnector, got {type(connector).__name__}")
    return connector.corpus_attention


class CorpusMerge:
    """Mixin for a qroute MLA impl: what its ``forward_mqa`` does around its own part."""

    _layer_index: dict[str, int]

    def _layer(self, layer: object) -> int:
        if not hasattr(self, "_layer_index"):
            self._layer_index = {}
        name = layer.layer_name
        if name not in self._layer_index:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer_index[name] = extract_layer_index(name)
        return self._layer_index[name]

    @staticmethod
    def _step_metadata(attn_metadata: MLACommonMetadata) -> QRouteDecodeMetadata:
        decode = attn_metadata.decode
        if not isinstance(decode, QRouteDecodeMetadata):
            raise ConfigError("qroute's attention impl got stock MLA metadata: the QRouteMLAMetadataBuilder is "
                              "not in use (was get_builder_cls() called outside the instance's vLLM config?)")
        return decode

    def _with_corpus(self, layer: object, q_nope: torch.Tensor, q_pe: torch.Tensor, own: Part) -> Part:
        """Every request's corpus part merged into its rows of ``own`` (one call for the whole step)."""
        corpus = corpus_attention()
        if corpus is None:
            return own
        device = own[0].device
        if device.type == "cpu":
            return corpus.attend_step(self._layer(layer), q_nope, q_pe, own)
        # The corpus store and its data plane live in host memory (a store in GPU memory registered with NIXL as
        # VRAM is not built yet): the corpus part runs on host copies, and the merged rows come back.
        out, lse = corpus.attend_step(self._layer(layer), q_nope.cpu(), q_pe.cpu(), (own[0].cpu(), own[1].cpu()))
        return out.to(device), lse.to(device)
