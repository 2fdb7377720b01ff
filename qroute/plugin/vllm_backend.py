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

from dataclasses import dataclass

import torch
from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadata, MLACommonMetadataBuilder
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from qroute.numerics.attention import Part, partial_attention
from qroute.plugin.vllm_mla_common import AllRowsAbsorbed, CorpusMerge, QRouteDecodeMetadata, configured_class

__all__ = ["QRouteCPUMLABackend", "QRouteCPUMLAImpl", "QRouteDecodeMetadata", "QRouteMLAMetadataBuilder"]


class QRouteMLAMetadataBuilder(AllRowsAbsorbed, MLACommonMetadataBuilder[MLACommonMetadata]):
    """Sends every row, prefill included, down the absorbed (``forward_mqa``) path."""


@dataclass(frozen=True)
class OwnRows:
    """Where one request's rows and own tokens are this step: the same for every layer (planned once per step).

    Rows ``[start, stop)`` are the request's last ``stop - start`` own tokens; row ``j`` sits at own position
    ``seq_len - n + j`` and sees own positions up to its own. ``slots``: the paged-cache rows of its ``seq_len``
    own tokens. A single row sees every own token, so it needs no mask (and gets the fused kernel)."""

    start: int
    stop: int
    slots: torch.Tensor
    q_positions: torch.Tensor | None
    kv_positions: torch.Tensor | None


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
            slots = tables[r][positions // block_size] * block_size + positions % block_size
            causal = b - a > 1
            q_positions = torch.arange(seq_lens[r] - (b - a), seq_lens[r]) if causal else None
            planned.append(OwnRows(a, b, slots, q_positions, positions if causal else None))
        decode.own_plan = tuple(planned)
    return decode.own_plan


def own_part(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, rows: OwnRows, scale: float) -> Part:
    """Causal attention of one request's rows over its own tokens in the paged cache
    ``kv_cache [num_blocks, block_size, R + P]``: ``(out [n, H, R], lse [n, H])`` float32."""
    return partial_attention(
        q_nope, q_pe, kv_cache, rows.slots.to(kv_cache.device), scale, q_nope.shape[-1],
        q_positions=rows.q_positions, kv_positions=rows.kv_positions,
    )  # fmt: skip


class QRouteCPUMLAImpl(CorpusMerge, CPUMLAImpl):
    """``forward_mqa`` for every row (``CorpusMerge``): the own part per request in torch, the corpus part merged."""

    def _own_part(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                  attn_metadata: MLACommonMetadata, decode: QRouteDecodeMetadata, layer: object) -> Part:  # fmt: skip
        num_tokens, num_heads, _ = q_nope.shape
        out = torch.empty(num_tokens, num_heads, self.kv_lora_rank, dtype=torch.float32, device=q_nope.device)
        lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=q_nope.device)
        for rows in own_rows(decode, kv_cache.shape[1]):
            a, b = rows.start, rows.stop
            out[a:b], lse[a:b] = own_part(q_nope[a:b], q_pe[a:b], kv_cache, rows, self.scale)
        return out, lse


class QRouteCPUMLABackend(CPUMLABackend):
    """``CPUMLABackend`` that hands out qroute's impl and builder only where qroute is configured."""

    @staticmethod
    def get_impl_cls() -> type[CPUMLAImpl]:
        return configured_class(QRouteCPUMLAImpl, CPUMLAImpl, activate=True)

    @staticmethod
    def get_builder_cls() -> type[MLACommonMetadataBuilder]:
        return configured_class(QRouteMLAMetadataBuilder, MLACommonMetadataBuilder)
