"""qroute's MLA attention backend for vLLM's CUDA platform, in the ``CUSTOM`` slot (``--attention-backend CUSTOM``).

It wraps vLLM's Triton MLA backend (``TRITON_MLA``), whose decode kernel returns a natural-log LSE: the own part of
every row is that kernel's, the corpus part comes from the connector's worker side and is merged exactly, as on the
CPU backend (``vllm_backend``; the shared pieces are in ``vllm_mla_common``):

- every query row, prefill included, is absorbed (``AllRowsAbsorbed``); vLLM's kernel has no causal flag, so each
  row becomes one decode row of it, with its request's block table and an extent of the own tokens it sees
  (``seq_len - query_len + j + 1`` for row ``j``). ``row_extents`` plans that once per step, on the device, without
  a host sync; ``own_part`` launches the kernel over the rows in chunks whose split-KV scratch stays under 256 MiB.
- the builder declares no CUDA-graph support (``AttentionCGSupport.NEVER``): the corpus part makes network calls
  per layer, which must not sit inside a captured graph, so vLLM runs attention outside its (piecewise) graphs.
- only where qroute is configured does the backend hand out these classes (``get_impl_cls`` / ``get_builder_cls``);
  elsewhere it is vLLM's Triton MLA, unchanged. KV cache dtypes are the store's: ``auto``, ``bfloat16``,
  ``float16`` (vLLM's per-tensor FP8 cache is not a qroute store format).

What has run where: docs/kernels.md. The host logic (row extents, chunking, the classes' wiring) and vLLM's kernel
under Triton's interpreter are checked on CPU (tests/kernels/interpreted_vllm_cuda.py); nothing here has run on a
GPU yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config.cache import CacheDType
from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadata, MLACommonMetadataBuilder
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.mla.triton_mla import (
    TritonMLABackend,
    TritonMLAImpl,
    TritonMLAMetadataBuilder,
    _compute_num_kv_splits,
)
from vllm.v1.attention.ops.triton_decode_attention import decode_attention_fwd

from qroute.numerics.attention import Part
from qroute.plugin.vllm_mla_common import AllRowsAbsorbed, CorpusMerge, QRouteDecodeMetadata, configured_class

__all__ = ["QRouteMLABackend", "QRouteTritonMLAImpl", "QRouteTritonMLAMetadataBuilder", "RowExtents", "own_part",
           "row_extents"]  # fmt: skip

SCRATCH_BYTES = 256 << 20  # bound on one launch's split-KV scratch [rows, H, splits, R + 1] float32


@dataclass(frozen=True)
class RowExtents:
    """Every query row of the step as one decode row of vLLM's kernel: ``block_table [T, max_blocks]`` (its
    request's), ``seq_lens [T]`` (the own tokens it sees, causal), on the cache's device."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor


def row_extents(decode: QRouteDecodeMetadata) -> RowExtents:
    """The step's ``RowExtents``, planned on its first layer and kept on its metadata (no host sync)."""
    if decode.own_plan is None:
        starts = decode.query_start_loc  # host
        device = decode.block_table.device
        num_rows = int(starts[-1])
        qlens = starts.diff().to(device=device, dtype=torch.int64)
        per_row = dict(dim=0, output_size=num_rows)
        table = decode.block_table.repeat_interleave(qlens, **per_row)
        first = starts[:-1].to(device=device, dtype=torch.int64).repeat_interleave(qlens, **per_row)
        seq_lens = decode.seq_lens.to(torch.int64).repeat_interleave(qlens, **per_row)
        qlen = qlens.repeat_interleave(qlens, **per_row)
        offset = torch.arange(num_rows, device=device) - first  # j: the row's place among its request's rows
        decode.own_plan = RowExtents(table, (seq_lens - qlen + offset + 1).to(decode.seq_lens.dtype))
    return decode.own_plan


def own_part(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, extents: RowExtents, scale: float,
             num_kv_splits: int, k_scale: torch.Tensor | None = None) -> Part:  # fmt: skip
    """Causal attention of every row over its request's own tokens in the paged cache ``[blocks, block_size,
    R + P]``, by vLLM's Triton MLA decode kernel: ``(out [T, H, R], lse [T, H])`` float32, natural log."""
    num_rows, num_heads, rank = q_nope.shape
    q = torch.cat([q_nope, q_pe], dim=-1)
    out = torch.empty(num_rows, num_heads, rank, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_rows, num_heads, dtype=torch.float32, device=q.device)
    paged = kv_cache.unsqueeze(2)  # the kernel's [blocks, block_size, kv_heads = 1, R + P]
    step = max(1, SCRATCH_BYTES // (num_heads * num_kv_splits * (rank + 1) * 4))
    for a in range(0, num_rows, step):
        b = min(num_rows, a + step)
        scratch = torch.empty(b - a, num_heads, num_kv_splits, rank + 1, dtype=torch.float32, device=q.device)
        decode_attention_fwd(q[a:b], paged, paged[..., :rank], out[a:b], lse[a:b], extents.block_table[a:b],
                             extents.seq_lens[a:b], scratch, num_kv_splits, scale, kv_cache.shape[1],
                             k_scale=k_scale, v_scale=k_scale, is_mla=True)  # fmt: skip
    return out, lse


class QRouteTritonMLAMetadataBuilder(AllRowsAbsorbed, TritonMLAMetadataBuilder):
    """Every row absorbed; attention never captured in a CUDA graph (the corpus part calls peers per layer)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def _reserve_attn_logits_workspace(self) -> None:
        # The stock reservation sizes rows by reorder_batch_threshold (1 << 30 here); own_part allocates its
        # scratch per launch instead, bounded by SCRATCH_BYTES.
        return None


class QRouteTritonMLAImpl(CorpusMerge, TritonMLAImpl):
    """``forward_mqa`` for every row (``CorpusMerge``): vLLM's Triton MLA kernel for the own part."""

    def _own_part(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                  attn_metadata: MLACommonMetadata, decode: QRouteDecodeMetadata, layer: object) -> Part:  # fmt: skip
        splits = _compute_num_kv_splits(attn_metadata.max_seq_len, self._sm_count)
        return own_part(q_nope, q_pe, kv_cache, row_extents(decode), self.scale, splits,
                        getattr(layer, "_k_scale", None))  # fmt: skip


class QRouteMLABackend(TritonMLABackend):
    """``TritonMLABackend`` that hands out qroute's impl and builder only where qroute is configured."""

    supported_kv_cache_dtypes: ClassVar[list[CacheDType]] = ["auto", "bfloat16", "float16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[TritonMLAImpl]:
        return configured_class(QRouteTritonMLAImpl, TritonMLAImpl, activate=True)

    @staticmethod
    def get_builder_cls() -> type[MLACommonMetadataBuilder]:
        return configured_class(QRouteTritonMLAMetadataBuilder, TritonMLAMetadataBuilder)
