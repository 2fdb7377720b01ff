"""Store formats: dense rows, and DeepSeek-V3.2's 656-byte FP8 row (``fp8_ds_mla``) as a store and READ format,
exact against its dequantized reference."""

from __future__ import annotations

import pytest
import torch

from qroute.errors import ConfigError
from qroute.numerics.attention import partial_attention
from qroute.numerics.rowformat import FP8_MAX, RowFormat, row_format

RANK, ROPE = 512, 64


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, RANK + ROPE, generator=g)
    rows[:, :128] *= 40.0  # tiles of very different ranges: each gets its own scale
    rows[:, 128:256] *= 1e-3
    rows[3, 256:384] = 0.0  # an all-zero tile stays exactly zero
    return rows


def test_fp8_ds_mla_row_is_deepseeks_656_byte_layout():
    fmt = RowFormat("fp8_ds_mla", RANK, ROPE)
    rows = _rows(8)
    stored = fmt.encode(rows)
    assert fmt.row_bytes == 656 and stored.shape == (8, 656) and stored.dtype == torch.uint8
    latent = rows[:, :RANK].reshape(8, 4, 128)
    scales = stored[:, 512:528].contiguous().view(torch.float32)  # 4 float32 scales after the 512 fp8 values
    torch.testing.assert_close(scales, (latent.abs().amax(-1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny))
    values = stored[:, :512].view(torch.float8_e4m3fn).float()
    assert values.abs().max() <= FP8_MAX  # scaled into e4m3's range
    rope = stored[:, 528:].contiguous().view(torch.bfloat16)  # 64 bf16 rope values last, not quantized
    assert torch.equal(rope, rows[:, RANK:].to(torch.bfloat16))


def test_fp8_round_trip_error_is_e4m3_rounding():
    fmt = RowFormat("fp8_ds_mla", RANK, ROPE)
    rows = _rows(16, seed=1)
    back = fmt.decode(fmt.encode(rows))
    scale = (rows[:, :RANK].reshape(16, 4, 128).abs().amax(-1) / FP8_MAX).repeat_interleave(128, dim=1)
    err = (back[:, :RANK] - rows[:, :RANK]).abs()
    # e4m3: 3 mantissa bits (half a step: 2^-4 relative); subnormals below 2^-6 step by 2^-9 (half: 2^-10)
    assert (err <= torch.maximum(rows[:, :RANK].abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)).all()
    assert err.max() > 0  # it did quantize
    assert torch.equal(back[3, 256:384], torch.zeros(128))
    torch.testing.assert_close(back[:, RANK:], rows[:, RANK:].to(torch.bfloat16).float(), atol=0, rtol=0)


def test_attention_over_a_quantized_store_is_attention_over_its_dequantized_rows():
    fmt = RowFormat("fp8_ds_mla", RANK, ROPE)
    stored = fmt.encode(_rows(64, seed=2))
    g = torch.Generator().manual_seed(3)
    q_nope, q_pe = torch.randn(3, 4, RANK, generator=g), torch.randn(3, 4, ROPE, generator=g)
    slots = torch.tensor([5, 6, 7, 40, 2, 63])
    got = fmt.attend(q_nope, q_pe, stored, slots, 0.05)
    want = partial_attention(q_nope, q_pe, fmt.decode(stored)[slots], torch.arange(6), 0.05, RANK)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_dense_formats_and_bad_input():
    bf16 = row_format(torch.bfloat16, RANK, ROPE)
    assert (bf16.name, bf16.row_bytes, bf16.storage_width) == ("bfloat16", 1152, 576)
    rows = _rows(4)
    assert bf16.decode(bf16.encode(rows)).dtype == torch.bfloat16
    assert torch.equal(bf16.from_bytes(bf16.encode(rows).view(torch.uint8).reshape(-1)), bf16.encode(rows))
    with pytest.raises(ConfigError, match="not one of"):
        RowFormat("int8", RANK, ROPE)
    with pytest.raises(ConfigError, match="multiple of 128"):
        RowFormat("fp8_ds_mla", 500, ROPE)
    with pytest.raises(ConfigError, match=r"\[n, 576\]"):
        bf16.encode(torch.zeros(2, 500))
    with pytest.raises(ConfigError, match="656"):
        RowFormat("fp8_ds_mla", RANK, ROPE).decode(torch.zeros(2, 576, dtype=torch.uint8))
