"""Triton kernels of ``qroute.numerics.attention``: absorbed-MLA partial attention over selected latent rows, and the
exact merge of parts. Same shapes, dtypes and LSE base as the torch reference (FlashInfer-style contract):

- ``partial_attention_triton(q_nope [T, H, R], q_pe [T, H, P], kv_cache [N, R + P], slots [S] int, scale)`` ->
  ``(out [T, H, R] float32, lse [T, H] float32, natural log)``; no keys gives ``(0, -inf)``. Queries and cache in
  float32, bfloat16 or float16 (one dtype); accumulation in float32. A uint8 cache ``[N, R + R / 32 + 2 P]`` holds
  DeepSeek-V3.2's ``fp8_ds_mla`` rows (656 bytes for R 512, P 64: ``qroute.numerics.rowformat``), dequantized in the
  kernel (each e4m3 value times its 128-value tile's scale), with queries in any of the three float dtypes; the
  result is attention over the dequantized rows (bf16 queries: the dequantized tile is rounded to bf16 for the dots).
- ``merge_triton(outs [K, T, H, R], lses [K, T, H])`` -> the merged part; a part with ``lse = -inf`` contributes
  nothing.

One program handles ``BLOCK_M`` (query row, head) pairs flattened to ``M = T * H``: every loaded key tile serves all
of them, so an owner that stacks many requesters' rows for the same blocks (``OwnerService``) answers them in one
launch, one pass over the rows per ``BLOCK_M`` pairs (the GEMM form of the batched owner). Online softmax in
base e. Under Triton's interpreter (``TRITON_INTERPRET=1`` before this module is imported) the kernels run on CPU
tensors, which is how CI checks their numerics (shared/notes/triton-cpu.md): there bf16 / fp16 tiles are cast to
float32 right after each load (``UPCAST``; the interpreter does arithmetic on bf16 bit patterns otherwise), and
``tl.dot`` runs in exact float32 (``input_precision="ieee"``, also on a GPU, where float32 would default to tf32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qroute.errors import ConfigError
from qroute.numerics.fp8_layout import FP8_TILE, fp8_row_bytes

__all__ = ["BLOCK_M", "BLOCK_N", "interpreted", "merge_triton", "partial_attention_triton"]

BLOCK_M = 16  # (row, head) pairs per program: tl.dot needs every dimension >= 16
BLOCK_N = 32  # keys per tile


@triton.jit
def _fp8_rows(row, key_ok, r, p, R: tl.constexpr, P: tl.constexpr):
    """One tile of ``fp8_ds_mla`` rows (``row``: uint8 pointers to each key's row) dequantized to float32:
    ``R`` e4m3 values, then ``R / 128`` float32 scales, then ``P`` bfloat16 k_pe values (``rowformat``)."""
    values = tl.load(row + r[None, :], mask=key_ok[:, None], other=0)
    scales = tl.load((row + R).to(tl.pointer_type(tl.float32)) + r[None, :] // 128, mask=key_ok[:, None], other=0.0)
    rope = tl.load((row + R + 4 * (R // 128)).to(tl.pointer_type(tl.bfloat16)) + p[None, :], mask=key_ok[:, None],
                   other=0.0)  # fmt: skip
    return values.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scales, rope.to(tl.float32)


@triton.jit
def _partial_kernel(q_nope, q_pe, cache, slots, out, lse, M, S, scale, stride_q_nope, stride_q_pe, stride_cache,
                    stride_out, R: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    UPCAST: tl.constexpr, FP8: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    r = tl.arange(0, R)
    p = tl.arange(0, P)
    qn = tl.load(q_nope + rows[:, None] * stride_q_nope + r[None, :], mask=row_ok[:, None], other=0.0)
    qp = tl.load(q_pe + rows[:, None] * stride_q_pe + p[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, R], tl.float32)
    for start in range(0, S, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < S
        slot = tl.load(slots + keys, mask=key_ok, other=0)
        row = cache + slot[:, None] * stride_cache
        if FP8:
            kn, kp = _fp8_rows(row, key_ok, r, p, R, P)
            kn = kn.to(qn.dtype)  # bf16 queries: bf16 dots after dequantizing, as FlashMLA's sparse kernel does
            kp = kp.to(qn.dtype)
        else:
            kn = tl.load(row + r[None, :], mask=key_ok[:, None], other=0.0)
            kp = tl.load(row + R + p[None, :], mask=key_ok[:, None], other=0.0)
            if UPCAST:
                kn = kn.to(tl.float32)
                kp = kp.to(tl.float32)
        s = tl.dot(qn, tl.trans(kn), input_precision="ieee") + tl.dot(qp, tl.trans(kp), input_precision="ieee")
        s = tl.where(key_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        probs = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(kn.dtype), kn, input_precision="ieee")
        m_i = m_new
    has_keys = l_i > 0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(out + rows[:, None] * stride_out + r[None, :], o, mask=row_ok[:, None])
    tl.store(lse + rows, tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf")), mask=row_ok)


@triton.jit
def _merge_kernel(outs, lses, out, lse, K, M, stride_part_out, stride_part_lse, stride_row, R: tl.constexpr,
                  BLOCK_M: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    r = tl.arange(0, R)
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for k in range(0, K):
        top = tl.maximum(top, tl.load(lses + k * stride_part_lse + rows, mask=row_ok, other=float("-inf")))
    safe_top = tl.where(top == float("-inf"), 0.0, top)  # every part empty: weights exp(-inf) = 0, not NaN
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, R], tl.float32)
    for k in range(0, K):
        w = tl.exp(tl.load(lses + k * stride_part_lse + rows, mask=row_ok, other=float("-inf")) - safe_top)
        part = tl.load(outs + k * stride_part_out + rows[:, None] * stride_row + r[None, :], mask=row_ok[:, None],
                       other=0.0)  # fmt: skip
        acc += tl.where(w[:, None] > 0, part * w[:, None], 0.0)  # an empty part's out never leaks
        total += w
    has = total > 0
    tl.store(out + rows[:, None] * stride_row + r[None, :], acc / tl.where(has, total, 1.0)[:, None],
             mask=row_ok[:, None])  # fmt: skip
    tl.store(lse + rows, tl.where(has, safe_top + tl.log(tl.where(has, total, 1.0)), float("-inf")), mask=row_ok)


def interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (CPU tensors) rather than compiled for a GPU."""
    return isinstance(_partial_kernel, triton.runtime.interpreter.InterpretedFunction)


def _upcast(dtype: torch.dtype) -> bool:
    return interpreted() and dtype != torch.float32


def partial_attention_triton(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """See the module docstring. ``slots`` index rows of ``kv_cache`` (a paged cache flattened to its rows); a
    uint8 ``kv_cache [N, R + R / 32 + 2 P]`` holds ``fp8_ds_mla`` rows, dequantized in the kernel."""
    t, h, r = q_nope.shape
    p = q_pe.shape[-1]
    fp8 = kv_cache.dtype == torch.uint8
    width = fp8_row_bytes(r, p) if fp8 else r + p
    if q_pe.shape[:2] != (t, h) or kv_cache.dim() != 2 or kv_cache.shape[1] != width:
        raise ConfigError(f"q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)} and cache "
                          f"{tuple(kv_cache.shape)} {kv_cache.dtype} do not fit [T, H, R], [T, H, P], "
                          f"[N, {width}]")  # fmt: skip
    if q_nope.dtype != q_pe.dtype or not (fp8 or q_nope.dtype == kv_cache.dtype):
        raise ConfigError(f"dtypes differ: q_nope {q_nope.dtype}, q_pe {q_pe.dtype}, cache {kv_cache.dtype}")
    if r & (r - 1) or p & (p - 1) or p < 16 or (fp8 and r % FP8_TILE):
        raise ConfigError(f"kv_lora_rank {r} and rope dim {p} must be powers of two, rope dim >= 16 "
                          f"(and kv_lora_rank a multiple of {FP8_TILE} for fp8_ds_mla)")  # fmt: skip
    m = t * h
    qn = q_nope.reshape(m, r).contiguous()
    qp = q_pe.reshape(m, p).contiguous()
    cache = kv_cache.contiguous()
    slots = slots.to(device=cache.device, dtype=torch.int64).contiguous()
    out = torch.empty(m, r, dtype=torch.float32, device=q_nope.device)
    lse = torch.empty(m, dtype=torch.float32, device=q_nope.device)
    if m:
        _partial_kernel[(triton.cdiv(m, BLOCK_M),)](
            qn, qp, cache, slots, out, lse, m, slots.numel(), float(scale), qn.stride(0), qp.stride(0),
            cache.stride(0), out.stride(0), R=r, P=p, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            UPCAST=_upcast(q_nope.dtype), FP8=fp8,
        )  # fmt: skip
    return out.view(t, h, r), lse.view(t, h)


def merge_triton(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. ``outs [K, T, H, R]`` float32, ``lses [K, T, H]`` float32."""
    k, t, h, r = outs.shape
    if lses.shape != (k, t, h) or outs.dtype != torch.float32 or lses.dtype != torch.float32:
        raise ConfigError(f"outs {tuple(outs.shape)} {outs.dtype} and lses {tuple(lses.shape)} {lses.dtype} must be "
                          "float32 [K, T, H, R] and [K, T, H]")  # fmt: skip
    m = t * h
    parts = outs.reshape(k, m, r).contiguous()
    part_lses = lses.reshape(k, m).contiguous()
    out = torch.empty(m, r, dtype=torch.float32, device=outs.device)
    lse = torch.empty(m, dtype=torch.float32, device=outs.device)
    if m:
        _merge_kernel[(triton.cdiv(m, BLOCK_M),)](
            parts, part_lses, out, lse, k, m, parts.stride(0), part_lses.stride(0), parts.stride(1), R=r,
            BLOCK_M=BLOCK_M,
        )  # fmt: skip
    return out.view(t, h, r), lse.view(t, h)
