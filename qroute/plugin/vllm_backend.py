"""qroute's MLA attention backend for vLLM's CPU platform, installed in the ``CPU_MLA`` slot.

The plugin (``qroute.plugin.vllm.register``) points ``AttentionBackendEnum.CPU_MLA`` here in every process
of every instance where qroute is installed, so this class must keep an instance that does not configure
qroute exactly stock: ``get_impl_cls()`` / ``get_builder_cls()`` then return vLLM's own ``CPUMLAImpl`` and
metadata builder; ``get_name()`` stays ``"CPU_MLA"``. Only an instance whose ``--kv-transfer-config`` names
``QRouteConnector`` gets the qroute classes, after ``ensure_active()`` has checked that qroute can run.

Where qroute is configured, **every** query row (prefill and decode) is absorbed and goes to
``forward_mqa`` (builder: ``query_len_support = VARLEN``, ``reorder_batch_threshold = 1 << 30``,
docs/vllm-internals.md (a)), which merges exactly, per row:

- the own part: causal absorbed attention over the request's own tokens in the paged cache (row ``j`` of
  a request with ``qlen`` rows and ``seq_len`` tokens sees own positions ``<= seq_len - qlen + j``); where
  each request's rows and own tokens sit is planned once per step (``own_rows``), not per layer;
- the corpus part from the connector's worker side, one call per layer for every request of the step
  (``attend_step``: the requests that attend to the same blocks share one message per owner).
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadata, MLACommonMetadataBuilder
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from qroute.numerics.attention import Part
from qroute.numerics.own_rows import OwnRows, own_parts
from qroute.plugin.vllm_mla_common import AllRowsAbsorbed, CorpusMerge, QRouteDecodeMetadata, configured_class

__all__ = ["QRouteCPUMLABackend", "QRouteCPUMLAImpl", "QRouteDecodeMetadata", "QRouteMLAMetadataBuilder"]


class QRouteMLAMetadataBuilder(AllRowsAbsorbed, MLACommonMetadataBuilder[MLACommonMetadata]):
    """Sends every row, prefill included, down the absorbed (``forward_mqa``) path."""


def own_rows(decode: QRouteDecodeMetadata, block_size: int) -> tuple[OwnRows, ...]:
    """Every request's ``OwnRows`` of this step, computed on the first layer and kept on the step's metadata."""
    if decode.own_plan is None:
        starts = decode.query_start_loc.tolist()
        seq_lens = decode.seq_lens.tolist()
        tables = decode.block_table.to("cpu", torch.int64)
        planned = []
        for r, (a, b) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
            if b <= a:
                continue
            positions = torch.arange(seq_lens[r])
            planned.append(OwnRows.causal(a, b - a, tables[r][positions // block_size] * block_size
                                          + positions % block_size))  # fmt: skip
        decode.own_plan = tuple(planned)
    return decode.own_plan


class QRouteCPUMLAImpl(CorpusMerge, CPUMLAImpl):
    """``forward_mqa`` for every row (``CorpusMerge``): the own part per request in torch, the corpus part merged."""

    def _own_part(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                  attn_metadata: MLACommonMetadata, decode: QRouteDecodeMetadata, layer: object) -> Part:  # fmt: skip
        return own_parts(q_nope, q_pe, kv_cache, own_rows(decode, kv_cache.shape[1]), self.scale)


class QRouteCPUMLABackend(CPUMLABackend):
    """``CPUMLABackend`` that hands out qroute's impl and builder only where qroute is configured."""

    @staticmethod
    def get_impl_cls() -> type[CPUMLAImpl]:
        return configured_class(QRouteCPUMLAImpl, CPUMLAImpl, activate=True)

    @staticmethod
    def get_builder_cls() -> type[MLACommonMetadataBuilder]:
        return configured_class(QRouteMLAMetadataBuilder, MLACommonMetadataBuilder)
