"""What qroute's two MLA attention backends for vLLM share (CPU: ``vllm_backend``, CUDA: ``vllm_cuda_backend``).

- ``AllRowsAbsorbed``: a metadata-builder mixin that sends every query row, prefill included, down the absorbed
  ``forward_mqa`` path (``query_len_support = VARLEN``, ``reorder_batch_threshold = 1 << 30``,
  docs/vllm-internals.md (a)) with ``QRouteDecodeMetadata``: the step's ``query_start_loc`` on the host and a slot
  for the backend's own-part plan, made on the step's first layer and reused by the others.
- ``configured_class``: what a backend's ``get_impl_cls`` / ``get_builder_cls`` hand out: qroute's class where
  this instance configures qroute, vLLM's stock class elsewhere.
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
from qroute.plugin.vllm import CorpusAttention, CorpusAttentionProvider, ensure_active, qroute_configured

__all__ = ["AllRowsAbsorbed", "CorpusMerge", "QRouteDecodeMetadata", "configured_class", "corpus_attention"]


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


def configured_class(qroute_cls: type, stock_cls: type, *, activate: bool = False) -> type:
    """``qroute_cls`` where the current vLLM config names qroute (after ``ensure_active`` when ``activate``), else
    ``stock_cls``. vLLM asks for the impl while it builds the model and for the builder in the worker's
    ``initialize_from_config``, both under ``set_current_vllm_config``; a capability query outside that context
    gets the stock class, which has the same capabilities (and qroute's impl refuses stock metadata loudly)."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    if not qroute_configured(vllm_config):
        return stock_cls
    if activate:
        ensure_active(vllm_config)
    return qroute_cls


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
    """Mixin for a qroute MLA impl: ``forward_mqa`` for every row, own part (``_own_part``, the backend's) and
    corpus part merged; returns ``(out in the query dtype, lse float32 natural log)``."""

    _layer_index: dict[str, int]
    kv_lora_rank: int
    qk_rope_head_dim: int

    def _own_part(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                  attn_metadata: MLACommonMetadata, decode: QRouteDecodeMetadata, layer: object) -> Part:  # fmt: skip
        """Causal attention of every row over its request's own tokens: ``(out [T, H, R], lse [T, H])`` float32."""
        raise NotImplementedError

    def forward_mqa(
        self,
        q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        kv_c_and_k_pe_cache: torch.Tensor,
        attn_metadata: MLACommonMetadata,
        layer: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q_nope, q_pe = q if isinstance(q, tuple) else q.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        decode = attn_metadata.decode
        if not isinstance(decode, QRouteDecodeMetadata):
            raise ConfigError("qroute's attention impl got stock MLA metadata: the QRouteMLAMetadataBuilder is "
                              "not in use (was get_builder_cls() called outside the instance's vLLM config?)")
        own = self._own_part(q_nope, q_pe, kv_c_and_k_pe_cache, attn_metadata, decode, layer)
        out, lse = self._with_corpus(layer, q_nope, q_pe, own)
        return out.to(q_nope.dtype), lse

    def _layer(self, layer: object) -> int:
        if not hasattr(self, "_layer_index"):
            self._layer_index = {}
        name = layer.layer_name
        if name not in self._layer_index:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer_index[name] = extract_layer_index(name)
        return self._layer_index[name]

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
