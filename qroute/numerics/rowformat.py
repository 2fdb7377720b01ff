"""How a store holds latent rows ``[c | k_pe]`` (width ``R + P``): dense in a float dtype, or DeepSeek-V3.2's FP8.

A ``RowFormat`` is what an owner's store, a one-sided READ and the attention over stored rows agree on:
``row_bytes`` per token, the tensor a store holds (``storage_dtype``, ``storage_width``), and ``attend``, which
reads the selected stored rows and returns one mergeable part.

- dense (``float32``, ``bfloat16``, ``float16``): stored rows are the latent rows; ``attend`` is
  ``partial_attention`` over them in place.
- ``fp8_ds_mla`` (DeepSeek-V3.2 / FlashMLA's sparse cache, 656 bytes for R = 512, P = 64), per token:
  ``R`` float8_e4m3fn latent values, ``R / 128`` float32 scales (one per 128 values, in order), ``P`` bfloat16
  k_pe values (not quantized). A value is ``fp8 * scale``. qroute quantizes with ``scale = amax(tile) / 448``
  (448: e4m3's largest finite value), floored at the smallest normal float32 so an all-zero tile stays zero.
  ``attend`` dequantizes the selected rows and attends to them: its result is exactly ``partial_attention`` over
  ``decode(rows)`` (the dequantized reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qroute.errors import ConfigError
from qroute.numerics.attention import Part, partial_attention
from qroute.numerics.fp8_layout import FP8_DS_MLA, FP8_MAX, FP8_TILE, fp8_row_bytes
from qroute.numerics.kernels import use_triton

__all__ = ["FP8_DS_MLA", "FP8_MAX", "FP8_TILE", "RowFormat", "row_format"]

_SCALE_FLOOR = torch.finfo(torch.float32).tiny
_DENSE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RowFormat:
    name: str  # "float32" | "bfloat16" | "float16" | "fp8_ds_mla"
    kv_lora_rank: int
    rope_dim: int

    def __post_init__(self) -> None:
        if self.name not in (*_DENSE, FP8_DS_MLA):
            raise ConfigError(f"row format {self.name!r} is not one of {[*_DENSE, FP8_DS_MLA]}")
        if self.name == FP8_DS_MLA and self.kv_lora_rank % FP8_TILE:
            raise ConfigError(f"{FP8_DS_MLA} needs kv_lora_rank a multiple of {FP8_TILE}, got {self.kv_lora_rank}")

    @property
    def width(self) -> int:
        """Latent row width ``R + P`` (what attention sees)."""
        return self.kv_lora_rank + self.rope_dim

    @property
    def quantized(self) -> bool:
        return self.name == FP8_DS_MLA

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.uint8 if self.quantized else _DENSE[self.name]

    @property
    def storage_width(self) -> int:
        """Elements of ``storage_dtype`` per stored row."""
        return self.row_bytes if self.quantized else self.width

    @property
    def row_bytes(self) -> int:
        if self.quantized:
            return fp8_row_bytes(self.kv_lora_rank, self.rope_dim)
        return self.width * _DENSE[self.name].itemsize

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """Latent rows ``[n, R + P]`` (any float dtype) -> stored rows ``[n, storage_width]``."""
        if rows.dim() != 2 or rows.shape[1] != self.width:
            raise ConfigError(f"rows {tuple(rows.shape)} are not [n, {self.width}]")
        if not self.quantized:
            return rows.to(self.storage_dtype).contiguous()
        n, rank = rows.shape[0], self.kv_lora_rank
        latent = rows[:, :rank].float().reshape(n, rank // FP8_TILE, FP8_TILE)
        scales = (latent.abs().amax(dim=-1) / FP8_MAX).clamp_min(_SCALE_FLOOR)  # [n, R / 128]
        values = (latent / scales[..., None]).to(torch.float8_e4m3fn).reshape(n, rank)
        rope = rows[:, rank:].to(torch.bfloat16)
        return torch.cat([values.view(torch.uint8), scales.view(torch.uint8).reshape(n, -1),
                          rope.view(torch.uint8).reshape(n, -1)], dim=1)  # fmt: skip

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored rows ``[n, storage_width]`` -> latent rows ``[n, R + P]``: the dense rows themselves, or float32
        dequantized ones."""
        if stored.dim() != 2 or stored.shape[1] != self.storage_width or stored.dtype != self.storage_dtype:
            raise ConfigError(f"stored rows {stored.dtype} {tuple(stored.shape)} are not "
                              f"[n, {self.storage_width}] {self.storage_dtype} ({self.name})")  # fmt: skip
        if not self.quantized:
            return stored
        n, rank, tiles = stored.shape[0], self.kv_lora_rank, self.kv_lora_rank // FP8_TILE
        stored = stored.contiguous()
        values = stored[:, :rank].view(torch.float8_e4m3fn).float().reshape(n, tiles, FP8_TILE)
        scales = stored[:, rank:rank + 4 * tiles].contiguous().view(torch.float32)  # [n, tiles]
        rope = stored[:, rank + 4 * tiles:].contiguous().view(torch.bfloat16).float()
        return torch.cat([(values * scales[..., None]).reshape(n, rank), rope], dim=1)

    def from_bytes(self, data: torch.Tensor) -> torch.Tensor:
        """A READ's bytes (uint8, whole rows) -> stored rows ``[n, storage_width]`` (a view)."""
        return data.view(self.storage_dtype).view(-1, self.storage_width)

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, stored: torch.Tensor, slots: torch.Tensor | range,
               scale: float) -> Part:
        """``partial_attention`` of the query rows over stored rows ``slots`` (dequantized first where FP8)."""
        if not self.quantized:
            return partial_attention(q_nope, q_pe, stored, slots, scale, self.kv_lora_rank)
        if use_triton(q_nope.device, uniform=stored.device == q_nope.device) and len(slots):  # dequantized in it
            from qroute.numerics.triton_mla import partial_attention_triton

            rows = torch.arange(slots.start, slots.stop) if isinstance(slots, range) else slots
            return partial_attention_triton(q_nope, q_pe, stored, rows.to(stored.device), scale)
        if isinstance(slots, range):
            selected = stored[slots.start:slots.stop]
        else:
            selected = stored.index_select(0, slots.to(stored.device).long())
        rows = self.decode(selected)
        return partial_attention(q_nope, q_pe, rows, torch.arange(rows.shape[0], device=rows.device), scale,
                                 self.kv_lora_rank)  # fmt: skip


def row_format(name: str | torch.dtype, kv_lora_rank: int, rope_dim: int) -> RowFormat:
    """The format called ``name`` (a format name, or a torch float dtype for the dense one)."""
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    return RowFormat(name, kv_lora_rank, rope_dim)
