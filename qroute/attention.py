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

import math

import torch

from qroute.errors import ConfigError
from qroute.rope import apply_rope

__all__ = ["empty_part", "lse_from_base2", "merge", "partial_attention", "rotate_query_rope"]

Part = tuple[torch.Tensor, torch.Tensor]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Bound on the float32 score block [T, H, keys] per step (64 MiB); longer key lists are processed in
# chunks merged with `merge`, which is exact.
_MAX_SCORE_ELEMS = 1 << 24


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
    slots: torch.Tensor,
    scale: float,
    kv_lora_rank: int = 512,
    *,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
) -> Part:
    """Attention of absorbed MLA queries over the cache rows ``slots``: one mergeable part.

    score[t, h, j] = (q_nope[t, h] . c_j + q_pe[t, h] . k_pe_j) * scale; values are c_j.
    Causal visibility (optional, both or neither): ``q_positions [T]`` and ``kv_positions [S]`` int;
    key j is visible to row t iff ``kv_positions[j] <= q_positions[t]``.
    Returns ``out [T, H, kv_lora_rank]`` float32 and ``lse [T, H]`` float32 natural log; rows with no
    visible key get ``(0, -inf)``. Computed in float32 whatever the input dtype, on q_nope's device
    (rows are gathered from ``kv_cache`` wherever it lives).
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
    _check_int("slots", slots)
    num_keys = slots.shape[0]
    if (q_positions is None) != (kv_positions is None):
        raise ConfigError("give both q_positions and kv_positions for causal visibility, or neither")
    if q_positions is not None:
        _check_int("q_positions", q_positions, num_tokens)
        _check_int("kv_positions", kv_positions, num_keys)
    if num_keys and (int(slots.min()) < 0 or int(slots.max()) >= cache.shape[0]):
        # Negative indices would silently wrap around in torch indexing.
        raise ConfigError(
            f"slots must lie in [0, {cache.shape[0]}), got range [{int(slots.min())}, {int(slots.max())}]"
        )

    device = q_nope.device
    qn, qp = q_nope.float(), q_pe.float()
    step = max(1, _MAX_SCORE_ELEMS // max(1, num_tokens * num_heads))
    parts = [empty_part(num_tokens, num_heads, kv_lora_rank, device)]
    for start in range(0, num_keys, step):
        stop = min(num_keys, start + step)
        rows = cache[slots[start:stop].to(cache.device)].to(device=device, dtype=torch.float32)
        latent, k_pe = rows[:, :kv_lora_rank], rows[:, kv_lora_rank:]
        scores = (torch.einsum("thr,sr->ths", qn, latent) + torch.einsum("thp,sp->ths", qp, k_pe)) * scale
        if q_positions is not None:
            visible = kv_positions[start:stop].to(device)[None, :] <= q_positions.to(device)[:, None]
            scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        # exp(-inf - finite) = 0; rows with no visible key would give exp(-inf - -inf) = NaN.
        probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        parts.append((torch.einsum("ths,sr->thr", probs, latent), lse))
    return parts[-1] if len(parts) == 2 else merge(parts)


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
    lses = torch.stack([lse.float() for _, lse in parts])  # [P, T, H]
    top = lses.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, 0.0)  # all -inf: weights are exp(-inf) = 0, not NaN
    weights = torch.exp(lses - top)
    total = weights.sum(dim=0)
    lse = top + torch.log(total)  # log(0) = -inf for rows with no keys in any part
    norm = torch.where(total > 0, 1.0 / total, 0.0)
    out = torch.zeros_like(out0, dtype=torch.float32)
    for (part_out, _), w in zip(parts, weights, strict=True):
        contrib = (w * norm)[..., None] * part_out.float()
        out += torch.where(w[..., None] > 0, contrib, 0.0)  # an empty part's out never leaks (0 * NaN)
    return out, lse


def lse_from_base2(lse2: torch.Tensor) -> torch.Tensor:
    """Convert a base-2 LSE (FlashInfer MLA's default, ``log2 sum 2^(s*log2e)``) to natural log, float32.

    ``lse = lse2 * ln 2``; -inf stays -inf.
    """
    return lse2.float() * math.log(2.0)


def rotate_query_rope(
    q_pe: torch.Tensor, offset: int | torch.Tensor, inv_freq: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Move roped queries ``q_pe [T, H, P]`` by ``offset`` positions (int, or int tensor ``[T]``).

    A pure rotation with the model's frequencies (``rope_inv_freq``): a query roped at local position
    ``i`` becomes one at ``i + offset``, e.g. a request's own tokens numbered from 0 attending to a
    corpus of ``offset`` tokens stored at global positions (DESIGN.md §3). The YaRN magnitude factor
    is already in ``q_pe`` and is not applied again. Same shape and dtype as ``q_pe``.
    """
    if isinstance(offset, torch.Tensor) and offset.dim() == 0:
        offset = int(offset)
    return apply_rope(q_pe, offset, inv_freq, interleaved)
