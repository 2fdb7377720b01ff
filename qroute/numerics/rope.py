"""DeepSeek rotary position embedding (RoPE) for the MLA rope half.

Reads an HF DeepSeek config (a plain ``dict`` parsed from ``config.json``), in either spelling:
the checkpoint's ``rope_theta`` + ``rope_scaling`` or transformers>=5's ``rope_parameters``.

- ``rope_inv_freq(config) -> [rope_dim // 2] float32``: per-pair inverse frequencies, with DeepSeek's
  YaRN correction when ``rope_scaling.type == "yarn"`` (same as transformers' ``_compute_yarn_parameters``
  and vLLM's ``DeepseekScalingRotaryEmbedding``).
- ``rope_attention_factor(config) -> float``: the magnitude factor engines fold into cos/sin when they
  rope a token at its position (YaRN ``mscale / mscale_all_dim``; 1.0 for DeepSeek-V3 and without YaRN).
- ``softmax_scale(config) -> float``: ``qk_head_dim ** -0.5`` times ``mscale(mscale_all_dim) ** 2``.
- ``apply_rope(x, positions, inv_freq, interleaved)``: a pure rotation, ``|apply_rope(x)| == |x|``.
- ``PositionShift(from_pos, to_pos, inv_freq, interleaved=...)``: the one way qroute moves roped queries
  and keys to other positions, with cos/sin formed exactly like vLLM's float32 table (``engine_cos_sin``),
  for close parity with the engine roping at the target position (``apply_rope`` forms float64 angles).

The YaRN scale must not be applied twice (DESIGN.md §3). Engines apply ``rope_attention_factor`` once,
when a key or query is first roped at its position. Moving an already-roped vector by ``N`` positions
(corpus queries, chunk offsets) is ``apply_rope`` alone: it never scales, so rotations compose,
``apply_rope(apply_rope(x, p), n) == apply_rope(x, p + n)``, and ``apply_rope(., -n)`` inverts.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qroute.errors import ConfigError

__all__ = [
    "apply_rope",
    "PositionShift",
    "engine_cos_sin",
    "rope_attention_factor",
    "rope_inv_freq",
    "rope_is_interleaved",
    "rope_parameters",
    "softmax_scale",
]


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Normalise the RoPE settings of an HF DeepSeek config into one flat dict.

    Returns a new dict with at least ``rope_type`` ("default" or "yarn") and ``rope_theta``; for yarn
    also ``factor`` and ``original_max_position_embeddings`` (and whatever optional keys were given).
    """
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "deepseek_yarn":  # vLLM's internal name for the same scaling
        rope_type = "yarn"
    params["rope_type"] = rope_type
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ConfigError("config has no `rope_theta` (top level or in `rope_parameters`); set it, e.g. 10000")
    params["rope_theta"] = float(theta)
    if rope_type == "default":
        return params
    if rope_type != "yarn":
        raise ConfigError(f"rope type {rope_type!r} in `rope_scaling` is not supported; allowed: 'default', 'yarn'")
    params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    if params["original_max_position_embeddings"] is None:
        raise ConfigError("yarn rope needs `rope_scaling.original_max_position_embeddings`")
    if params.get("factor") is None:
        # transformers' rule: without `factor`, the context extension ratio is the factor.
        params["factor"] = config["max_position_embeddings"] / params["original_max_position_embeddings"]
    return params


def _rope_dim(config: dict[str, Any]) -> int:
    dim = config.get("qk_rope_head_dim")
    if not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ConfigError(f"`qk_rope_head_dim` must be a positive even int, got {dim!r}")
    return dim


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # DeepSeek's yarn_get_mscale, shared by transformers and vLLM.
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config: dict[str, Any]) -> torch.Tensor:
    """Inverse frequencies of the rope half: ``[qk_rope_head_dim // 2]``, float32, CPU.

    Pair ``i`` rotates by ``position * inv_freq[i]`` radians.
    """
    dim = _rope_dim(config)
    params = rope_parameters(config)
    base = params["rope_theta"]
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq_extra = 1.0 / pos_freqs
    if params["rope_type"] == "default":
        return inv_freq_extra
    factor = float(params["factor"])
    inv_freq_inter = 1.0 / (factor * pos_freqs)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    orig_max = params["original_max_position_embeddings"]

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # same singularity guard as transformers and vLLM
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra_weight = 1 - ramp  # 1 for fast-rotating pairs (kept), 0 for slow ones (interpolated)
    return inv_freq_inter * (1 - extra_weight) + inv_freq_extra * extra_weight


def rope_attention_factor(config: dict[str, Any]) -> float:
    """Factor engines multiply cos/sin by when roping a token at its position (HF ``attention_scaling``).

    YaRN: ``attention_factor`` if given, else ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``
    when both are set, else ``mscale(factor)``; 1.0 otherwise and for DeepSeek-V3 (mscale == mscale_all_dim).
    Apply it once per token, never when rotating by an offset (see the module docstring).
    """
    params = rope_parameters(config)
    if params["rope_type"] == "default":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = float(params["factor"])
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def softmax_scale(config: dict[str, Any]) -> float:
    """DeepSeek's attention softmax scale: ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``, times
    ``mscale(factor, mscale_all_dim) ** 2`` under YaRN with a nonzero ``mscale_all_dim``."""
    nope = config.get("qk_nope_head_dim")
    if not isinstance(nope, int) or nope < 0:
        raise ConfigError(f"`qk_nope_head_dim` must be a non-negative int, got {nope!r}")
    scale = (nope + _rope_dim(config)) ** -0.5
    params = rope_parameters(config)
    mscale_all_dim = params.get("mscale_all_dim")
    if params["rope_type"] != "default" and mscale_all_dim:
        m = _yarn_mscale(float(params["factor"]), float(mscale_all_dim))
        scale *= m * m
    return scale


def rope_is_interleaved(config: dict[str, Any]) -> bool:
    """Pair layout of the checkpoint's rope half: True = pairs ``(2i, 2i+1)`` (DeepSeek's, the HF default).

    vLLM always ropes DeepSeek as interleaved (``is_neox_style=False``) and ignores ``rope_interleave``;
    transformers honours it. Only ``rope_interleave: false`` checkpoints tell them apart.
    """
    return bool(config.get("rope_interleave", True))


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor | int, inv_freq: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Rotate the rope half ``x`` by ``positions``: a pure rotation, no magnitude factor.

    x: ``[T, ..., rope_dim]`` (e.g. ``[T, H, rope_dim]`` queries or ``[T, rope_dim]`` keys), any float dtype.
    positions: int tensor ``[T]`` (or a Python int for every row); may be negative (inverse rotation).
    inv_freq: ``[rope_dim // 2]`` float32 from ``rope_inv_freq``.
    interleaved: True rotates pairs ``(2i, 2i+1)`` in place (vLLM ``is_neox_style=False``, the layout
    stays interleaved); False rotates ``(i, i + rope_dim/2)`` (NeoX halves).
    Returns a tensor like ``x`` (same shape and dtype), computed in float32.
    """
    half = inv_freq.shape[-1]
    if inv_freq.dim() != 1 or x.shape[-1] != 2 * half:
        raise ConfigError(
            f"rope: x's last dim {x.shape[-1]} must be 2 * len(inv_freq) = {2 * half} "
            f"(inv_freq shape {tuple(inv_freq.shape)})"
        )
    if x.dim() < 2:
        raise ConfigError(f"rope: x must be [T, ..., rope_dim], got shape {tuple(x.shape)}")
    num_tokens = x.shape[0]
    if isinstance(positions, int):
        positions = torch.full((num_tokens,), positions, dtype=torch.int64, device=x.device)
    if positions.dtype.is_floating_point or positions.dim() != 1 or positions.shape[0] != num_tokens:
        raise ConfigError(
            f"rope: positions must be an int tensor [T={num_tokens}], got {positions.dtype} {tuple(positions.shape)}"
        )
    # The angle is formed in float64 so that composition holds at any position: in float32,
    # p * inv_freq loses up to ulp(p * f) (~4e-3 rad at p = 32K), and p*f + n*f != (p+n)*f.
    angle = positions.to(device=x.device, dtype=torch.float64)[:, None] * inv_freq.to(
        device=x.device, dtype=torch.float64
    )
    angle = angle.view(num_tokens, *([1] * (x.dim() - 2)), half)
    cos, sin = angle.cos().float(), angle.sin().float()
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def engine_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin rows ``[T, rope_dim // 2]`` for ``positions`` exactly as vLLM forms its ``cos_sin_cache``.

    vLLM (``rotary_embedding/base.py`` ``_compute_cos_sin_cache``) takes ``t * inv_freq`` in float32 (one
    float32 product per entry, ``t`` an exact float32 integer), then ``cos``/``sin`` in float32, then casts
    the table to the model dtype (``dtype`` here). Unlike ``apply_rope``'s float64 angles, this reproduces
    the engine's rounding, so a query moved with it matches one the engine roped at the target position.
    No magnitude factor (YaRN mscale) is applied: it is 1.0 for DeepSeek-V3 and must never apply twice.
    """
    if positions.dtype.is_floating_point or positions.dim() != 1:
        raise ConfigError(f"engine_cos_sin: positions must be a 1-D int tensor, got {positions.dtype} "
                          f"{tuple(positions.shape)}")
    if positions.numel() and int(positions.max()) >= 1 << 24:
        raise ConfigError(f"engine_cos_sin: position {int(positions.max())} is not exact in float32 (< 2**24)")
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _float64_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin rows ``[T, rope_dim // 2]`` as ``apply_rope`` forms them (float64 angles), in ``dtype``."""
    if positions.dtype.is_floating_point or positions.dim() != 1:
        raise ConfigError(f"rope tables: positions must be a 1-D int tensor, got {positions.dtype} "
                          f"{tuple(positions.shape)}")  # fmt: skip
    angle = positions.to(torch.float64)[:, None] * inv_freq.to(device=positions.device, dtype=torch.float64)
    return angle.cos().to(dtype), angle.sin().to(dtype)


class PositionShift:
    """Moves rows roped at ``from_positions [T]`` to ``to_positions [T]``: the one way qroute re-positions rope.

    Queries: a request's own row roped by the engine at own position ``i`` becomes the query roped at corpus
    position ``N + i`` (``N`` corpus tokens in front). Keys: a prefilled chunk's ``k_pe`` stored at local
    position ``i`` moves to ``chunk.start + i``. Plan/run: the tables are built once per step, applied per
    layer. cos/sin are formed as the model that roped the rows forms them, so that a moved row matches one
    roped at the target position: ``engine_table=True`` like vLLM's table (``engine_cos_sin``, cast to
    ``table_dtype``), False like ``apply_rope`` (float64 angles; the reference model). A pure rotation: no
    magnitude factor.
    """

    __slots__ = ("from_cos_sin", "to_cos_sin", "interleaved")

    def __init__(self, from_positions: torch.Tensor, to_positions: torch.Tensor, inv_freq: torch.Tensor, *,
                 interleaved: bool, engine_table: bool = True, table_dtype: torch.dtype = torch.float32):
        if from_positions.shape != to_positions.shape:
            raise ConfigError(f"PositionShift: from {tuple(from_positions.shape)} and to "
                              f"{tuple(to_positions.shape)} positions differ in shape")  # fmt: skip
        tables = engine_cos_sin if engine_table else _float64_cos_sin
        self.from_cos_sin = tables(from_positions, inv_freq, table_dtype)
        self.to_cos_sin = tables(to_positions, inv_freq, table_dtype)
        self.interleaved = interleaved

    @classmethod
    def _of(cls, from_cos_sin, to_cos_sin, interleaved: bool) -> PositionShift:
        shift = cls.__new__(cls)
        shift.from_cos_sin, shift.to_cos_sin, shift.interleaved = from_cos_sin, to_cos_sin, interleaved
        return shift

    @classmethod
    def cat(cls, shifts: list[PositionShift]) -> PositionShift:
        """One shift for the rows of ``shifts`` stacked in order (every request of a step moved at once)."""
        if len({s.interleaved for s in shifts}) != 1:
            raise ConfigError("PositionShift.cat: the shifts disagree on the rope layout (interleaved)")
        tables = [tuple(torch.cat([getattr(s, side)[k] for s in shifts]) for k in (0, 1))
                  for side in ("from_cos_sin", "to_cos_sin")]  # fmt: skip
        return cls._of(tables[0], tables[1], shifts[0].interleaved)

    def __len__(self) -> int:
        return self.from_cos_sin[0].shape[0]

    def first(self, n: int) -> PositionShift:
        """The shift of the first ``n`` rows."""
        (ca, sa), (cb, sb) = self.from_cos_sin, self.to_cos_sin
        return PositionShift._of((ca[:n], sa[:n]), (cb[:n], sb[:n]), self.interleaved)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[T, ..., rope_dim]`` (``[T, H, P]`` queries or ``[T, P]`` keys), roped at the from-positions.
        Computed in float32; returns x's shape and dtype, roped at the to-positions."""
        half = x.shape[-1] // 2
        (cos_a, sin_a), (cos_b, sin_b) = self.from_cos_sin, self.to_cos_sin
        if x.shape[-1] != 2 * half or cos_a.shape != (x.shape[0], half):
            raise ConfigError(f"PositionShift: x {tuple(x.shape)} needs tables [{x.shape[0]}, {half}], got "
                              f"{tuple(cos_a.shape)}")  # fmt: skip
        view = (x.shape[0], *([1] * (x.dim() - 2)), half)
        cos_a, sin_a, cos_b, sin_b = (t.float().reshape(view) for t in (cos_a, sin_a, cos_b, sin_b))
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
        else:
            x1, x2 = xf[..., :half], xf[..., half:]
        # Inverse of the engine's (x1*cos - x2*sin, x2*cos + x1*sin), then the forward rotation.
        r1, r2 = x1 * cos_a + x2 * sin_a, x2 * cos_a - x1 * sin_a
        o1, o2 = r1 * cos_b - r2 * sin_b, r2 * cos_b + r1 * sin_b
        if self.interleaved:
            out = torch.stack((o1, o2), dim=-1).flatten(-2)
        else:
            out = torch.cat((o1, o2), dim=-1)
        return out.to(x.dtype)
