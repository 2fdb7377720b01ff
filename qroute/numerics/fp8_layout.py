"""DeepSeek-V3.2's ``fp8_ds_mla`` latent-row layout, as numbers: what the store format (``rowformat``) and the Triton
kernel (``triton_mla``) both read, kept in a module that imports nothing of either."""

from __future__ import annotations

__all__ = ["FP8_DS_MLA", "FP8_MAX", "FP8_TILE", "fp8_row_bytes"]

FP8_DS_MLA = "fp8_ds_mla"
FP8_TILE = 128  # latent values per float32 scale
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def fp8_row_bytes(kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes of one row: ``R`` e4m3 values, ``R / 128`` float32 scales, ``P`` bfloat16 k_pe values (656 for 512, 64)."""
    return kv_lora_rank + kv_lora_rank // FP8_TILE * 4 + rope_dim * 2
