"""Partial absorbed-MLA attention over selected latent-cache rows, and the exact merge of parts.

Torch reference (CPU or GPU); engine-free. Tensors, with ``T`` query rows, ``H`` heads, ``R`` =
kv_lora_rank, ``P`` = rope dim, ``S`` selected keys:

- ``q_nope``: ``[T, H, R]`` query already absorbed through W_UK; float32 / bf16 / fp16.
- ``q_pe``: ``[T, H, P]`` rope half of the query, roped at the query's position.
- ``kv_cache``: ``[num_slots, R + P]`` or paged ``[num_blocks, block_size, R + P]`` rows
  ``[latent c | k_pe]``; k_pe roped at the key's position. Same dtype family as the query.
- ``slots``: ``[S]`` int rows to read (paged: ``block * block_size + offset``).
- a *part* ``(out, lse)``: ``out [T, H, R]`` float32 softmax-weighted latent over the part's keys,
  ``lse [T, H]`` float32 **natural-log** sum of exp(scaled scores). Empty part: ``(0, -inf)``.

Parts over disjoint key sets merge exactly: ``lse = logsumexp_i lse_i``,
``out = sum_i exp(lse_i - lse) * out_i``. Convert base-2 kernel LSEs with ``lse_from_base2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qroute.errors import ConfigError
from qroute.numerics.kernels import use_triton
from qroute.numerics.rope import rope_inv_freq, rope_is_interleaved, softmax_scale

__all__ = ["AttentionParams", "Part", "empty_part", "lse_from_base2", "merge", "partial_attention"]

Part = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AttentionParams:
    """What attending to latent rows needs to know of the model: softmax scale, latent rank, RoPE."""

    scale: float
    kv_lora_rank: int
    inv_freq: torch.Tensor  # [rope_dim // 2] float32
    interleaved: bool

    @classmethod
    def from_config(cls, config: dict) -> AttentionParams:
        return cls(
            softmax_scale(config), int(config["kv_lora_rank"]), rope_inv_freq(config), rope_is_interleaved(config)
        )

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Bound on the float32 score block [T, H, keys] per step (64 MiB); longer key lists are processed in
# chunks merged with `merge`, which is exact.
_MAX_SCORE_ELEMS = 1 << 24
# PyTorch's fused CPU attention, which also returns the LSE (private, so looked up: without it the
# op-by-op path below runs). Tiles internally: no score block is materialised.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# Its query rows per parallel block when there are few (fewer than 192, as in decode), and the key split
# (`_fused_parts`): chunks per thread, and the fewest keys a chunk is worth (one of the kernel's key blocks).
_FLASH_CPU_QUERY_BLOCK = 32
_SPLITS_PER_THREAD = 2
_MIN_KEYS_PER_SPLIT = 512


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"{name} dtype {t.dtype} is not allowed; allowed: float32, bfloat16, float16")


def _check_int(name: str, t: torch.Tensor, length: int | None = None) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() != 1:
        raise ConfigError(f"{name} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ConfigError(f"{name} has length {t.shape[0]}, expected {length}")


def _flat_cache(kv_cache: torch.Tensor, kv_lora_rank: int, rope_dim: int) -> torch.Tensor:
    _check_float("kv_cache", kv_cache)
    width = kv_lora_rank + rope_dim
    if kv_cache.dim() == 3:
        kv_cache = kv_cache.reshape(-1, kv_cache.shape[-1])  # slot = block * block_size + offset
    if kv_cache.dim() != 2 or kv_cache.shape[-1] != width:
        raise ConfigError(
            f"kv_cache shape {tuple(kv_cache.shape)} is not allowed; expected [num_slots, {width}] or "
            f"[num_blocks, block_size, {width}] (kv_lora_rank {kv_lora_rank} + rope_dim {rope_dim})"
        )
    return kv_cache


def partial_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    slots: torch.Tensor | range,
    scale: float,
    kv_lora_rank: int = 512,
    *,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
) -> Part:
    """Attention of absorbed MLA queries over the cache rows ``slots``: one mergeable part.

    ``slots``: 1-D int rows, or a ``range`` (step 1) of adjacent rows, read in place without any check or gather
    (what a shard's or a fetched buffer's rows usually are; ``CorpusShard.slots`` returns one where it can).

    score[t, h, j] = (q_nope[t, h] . c_j + q_pe[t, h] . k_pe_j) * scale; values are c_j.
    Causal visibility (optional, both or neither): ``q_positions [T]`` and ``kv_positions [S]`` int;
    key j is visible to row t iff ``kv_positions[j] <= q_positions[t]``.
    Returns ``out [T, H, kv_lora_rank]`` float32 and ``lse [T, H]`` float32 natural log; rows with no
    visible key get ``(0, -inf)``. Computed in float32 whatever the input dtype, on q_nope's device
    (rows are gathered from ``kv_cache`` wherever it lives). On CUDA tensors the Triton kernel computes it
    (``qroute.numerics.kernels``: unmasked, one dtype), with the same contract.
    """
    _check_float("q_nope", q_nope)
    _check_float("q_pe", q_pe)
    if q_nope.dim() != 3 or q_nope.shape[-1] != kv_lora_rank:
        raise ConfigError(f"q_nope shape {tuple(q_nope.shape)} is not allowed; expected [T, H, {kv_lora_rank}]")
    if q_pe.dim() != 3 or q_pe.shape[:2] != q_nope.shape[:2] or q_pe.shape[-1] == 0:
        raise ConfigError(
            f"q_pe shape {tuple(q_pe.shape)} is not allowed; expected [{q_nope.shape[0]}, {q_nope.shape[1]}, rope_dim]"
        )
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"scale must be a finite positive float, got {scale!r}")
    num_tokens, num_heads, rope_dim = q_pe.shape
    cache = _flat_cache(kv_cache, kv_lora_rank, rope_dim)
    if isinstance(slots, range):
        if slots.step != 1 or slots.start < 0 or slots.stop > cache.shape[0]:
            raise ConfigError(f"slots {slots} must be a step-1 range inside [0, {cache.shape[0]})")
    else:
        _check_int("slots", slots)
    num_keys = len(slots)
    if (q_positions is None) != (kv_positions is None):
        raise ConfigError("give both q_positions and kv_positions for causal visibility, or neither")
    if q_positions is not None:
        _check_int("q_positions", q_positions, num_tokens)
        _check_int("kv_positions", kv_positions, num_keys)
    if not num_keys or not num_tokens * num_heads:  # nothing to attend, or no query row to attend with
        return empty_part(num_tokens, num_heads, kv_lora_rank, q_nope.device)
    if isinstance(slots, range):
        low, high, in_place = slots.start, slots.stop - 1, True
    else:
        if slots.dtype not in (torch.int32, torch.int64):
            slots = slots.long()  # index_select takes these two only
        low, high = (int(v) for v in torch.aminmax(slots))
        if low < 0 or high >= cache.shape[0]:  # negative indices would silently wrap around in torch indexing
            raise ConfigError(f"slots must lie in [0, {cache.shape[0]}), got range [{low}, {high}]")
        # one ascending run of rows is read in place, not gathered
        in_place = high - low + 1 == num_keys and (num_keys == 1 or bool((slots.diff() == 1).all()))

    device = q_nope.device
    masked = q_positions is not None
    uniform = q_nope.dtype == q_pe.dtype == cache.dtype and cache.device == device
    if use_triton(device, masked=masked, uniform=uniform):
        from qroute.numerics.triton_mla import partial_attention_triton

        rows = torch.arange(low, high + 1, device=cache.device) if isinstance(slots, range) else slots
        return partial_attention_triton(q_nope, q_pe, cache, rows, scale)
    fusable = not masked and device.type == "cpu" and cache.device.type == "cpu" and num_tokens * num_heads > 0
    if fusable and _FLASH_CPU is not None:
        # One fused kernel instead of a dozen small ops (each costs microseconds of overhead on a CPU). The
        # keys are whole rows [c | k_pe] and the values the same rows (it wants equal head sizes): the output's
        # first kv_lora_rank columns are the latent result. Its LSE is natural log, like ours.
        q = _joint_query(q_nope, q_pe).view(1, 1, num_tokens * num_heads, -1)
        rows = cache[low:high + 1] if in_place else cache.index_select(0, slots)
        rows = rows if rows.dtype == torch.float32 else rows.float()
        parts = [(out.view(num_tokens, num_heads, -1)[..., :kv_lora_rank], lse.view(num_tokens, num_heads))
                 for out, lse in _fused_parts(q, rows, scale)]
        return (parts[0][0].contiguous(), parts[0][1]) if len(parts) == 1 else merge(parts)
    # One [T*H, R+P] query block against whole rows: a single matmul gives q_nope.c + q_pe.k_pe, scaled
    # beforehand on the small side. Few, large torch ops: on a CPU each op costs microseconds of overhead.
    q = _joint_query(q_nope, q_pe).reshape(num_tokens * num_heads, -1) * scale
    if q_positions is not None:
        q_positions, kv_positions = q_positions.to(device), kv_positions.to(device)
    step = max(1, _MAX_SCORE_ELEMS // max(1, num_tokens * num_heads))
    parts = []
    for start in range(0, num_keys, step):
        stop = min(num_keys, start + step)
        if in_place:
            rows = cache[low + start:low + stop]
        else:
            chunk = slots if stop - start == num_keys else slots[start:stop]
            rows = cache.index_select(0, chunk.to(cache.device))
        rows = rows.to(device=device, dtype=torch.float32)
        scores = (q @ rows.T).view(num_tokens, num_heads, -1)
        if masked:
            visible = kv_positions[start:stop][None, :] <= q_positions[:, None]
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
            top = scores.amax(dim=-1, keepdim=True).nan_to_num_(neginf=0.0)  # no visible key: 0, not -inf
        else:
            top = scores.amax(dim=-1, keepdim=True)
        probs = scores.sub_(top).exp_()
        total = probs.sum(dim=-1, keepdim=True)  # >= 1 where a key is visible (the max gives exp(0)), else 0
        lse = (top + total.log()).squeeze(-1)  # log(0) = -inf: no visible key
        out = (probs.view(num_tokens * num_heads, -1) @ rows[:, :kv_lora_rank]).view(num_tokens, num_heads, -1)
        parts.append((out.div_(total.clamp_min_(1.0) if masked else total), lse))  # no keys: zeros, not 0/0
    return parts[0] if len(parts) == 1 else merge(parts)


def _fused_parts(q: torch.Tensor, rows: torch.Tensor, scale: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fused CPU kernel's ``(out [M, D], lse [M])`` parts of ``q [1, 1, M, D]`` over ``rows [n, D]``, split
    along the keys when the queries alone cannot keep torch's threads busy.

    The kernel parallelises over (batch, head, block of query rows) only: one decode row's few heads are one
    block, one thread, however many keys. Cut into equal key chunks laid along the batch dimension, the keys
    are shared out over the threads; the parts merge exactly (`merge`).
    """
    num_rows, width = q.shape[2], q.shape[3]
    num_keys = rows.shape[0]
    threads = torch.get_num_threads()
    query_blocks = -(-num_rows // _FLASH_CPU_QUERY_BLOCK)
    splits = min(_SPLITS_PER_THREAD * threads, num_keys // _MIN_KEYS_PER_SPLIT) if query_blocks < threads else 1
    if splits <= 1:
        out, lse = _FLASH_CPU(q, rows[None, None], rows[None, None], scale=scale)[:2]
        return [(out[0, 0], lse[0, 0])]
    chunk = num_keys // splits
    body = rows[:chunk * splits].reshape(splits, 1, chunk, width)  # a view unless the rows are strided
    out, lse = _FLASH_CPU(q.expand(splits, 1, num_rows, width), body, body, scale=scale)[:2]
    parts = [(out[i, 0], lse[i, 0]) for i in range(splits)]
    if chunk * splits < num_keys:  # the few keys left over: one more, small call
        tail = rows[chunk * splits:][None, None]
        out, lse = _FLASH_CPU(q, tail, tail, scale=scale)[:2]
        parts.append((out[0, 0], lse[0, 0]))
    return parts


def _joint_query(q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
    """``[T, H, R + P]`` float32 ``q_nope | q_pe``: a view where the two are the halves of one float32 buffer (how an
    owner decodes a batch of routes, ``wire.as_torch_joined``), else a new concatenation."""
    num_tokens, num_heads, rank = q_nope.shape
    width = rank + q_pe.shape[-1]
    strides = (num_heads * width, width, 1)
    # cheapest test first: separate tensors fail it at once (each torch call here costs a fraction of a microsecond)
    if (q_pe.data_ptr() == q_nope.data_ptr() + 4 * rank and q_nope.dtype == q_pe.dtype == torch.float32
            and q_nope.stride() == q_pe.stride() == strides
            and q_pe.untyped_storage().data_ptr() == q_nope.untyped_storage().data_ptr()):
        return q_nope.as_strided((num_tokens, num_heads, width), strides)  # one storage: one device
    return torch.cat([q_nope.float(), q_pe.float()], dim=-1)


def empty_part(num_tokens: int, num_heads: int, kv_lora_rank: int, device: torch.device | str | None = None) -> Part:
    """The neutral part: ``out [T, H, R]`` float32 zeros, ``lse [T, H]`` float32 -inf."""
    out = torch.zeros(num_tokens, num_heads, kv_lora_rank, dtype=torch.float32, device=device)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=device)
    return out, lse


def merge(parts: list[Part]) -> Part:
    """Exactly merge parts over disjoint key sets (any order): ``(out [T, H, R], lse [T, H])`` float32.

    ``lse = logsumexp_i lse_i`` (natural log), ``out = sum_i exp(lse_i - lse) * out_i``. A part whose
    lse is -inf contributes nothing (its ``out`` is ignored, even if not 0); all -inf gives (0, -inf).
    """
    if not parts:
        raise ConfigError("merge needs at least one part; use empty_part(...) for none")
    out0, lse0 = parts[0]
    if out0.dim() != 3 or lse0.shape != out0.shape[:2]:
        raise ConfigError(f"part 0 shapes out {tuple(out0.shape)}, lse {tuple(lse0.shape)}; expected [T, H, R], [T, H]")
    for i, (out, lse) in enumerate(parts):
        if out.shape != out0.shape or lse.shape != lse0.shape:
            raise ConfigError(
                f"part {i} shapes out {tuple(out.shape)}, lse {tuple(lse.shape)} differ from part 0 "
                f"({tuple(out0.shape)}, {tuple(lse0.shape)})"
            )
    if use_triton(lse0.device):
        from qroute.numerics.triton_mla import merge_triton

        outs = torch.stack([out for out, _ in parts]).float()
        return merge_triton(outs, torch.stack([lse for _, lse in parts]).float())
    lses = torch.stack([lse for _, lse in parts]).float()  # [P, T, H]
    top = lses.amax(dim=0).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # all -inf: exp(-inf) = 0, not NaN
    weights = (lses - top).exp_()
    total = weights.sum(dim=0)  # >= 1 where some part has keys (its max gives exp(0)), else 0
    lse = top + total.log()  # log(0) = -inf for rows with no keys in any part
    weights = weights.div_(total.clamp_min(1.0))[..., None]
    outs = torch.stack([out for out, _ in parts]).float()  # [P, T, H, R]
    # an empty part's out never leaks, even if it is garbage (0 * NaN)
    out = torch.where(weights > 0, outs * weights, 0.0).sum(dim=0)
    return out, lse


def lse_from_base2(lse2: torch.Tensor) -> torch.Tensor:
    """Convert a base-2 LSE (FlashInfer MLA's default, ``log2 sum 2^(s*log2e)``) to natural log, float32.

    ``lse = lse2 * ln 2``; -inf stays -inf.
    """
    return lse2.float() * math.log(2.0)
