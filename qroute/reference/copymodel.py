"""Weights for a tiny DeepSeek-V3 model that copies from its context: a constructed induction circuit.

A random model's answers are noise, so a demo cannot show that the corpus was attended. This model, asked
to continue a line, finds the place in its context (the corpus, wherever it is sharded) where the last three
tokens occurred and emits the token that followed there; greedy decoding so reproduces a corpus line from its
first few tokens, and without the corpus it cannot. The weights are written down, not trained: two
attention layers implement the circuit in the model's own MLA geometry (absorbed latent cache, YaRN rope),
deterministically, in well under a second on a CPU.

Every token ``v`` gets three random unit codes from ``seed``: ``u(v)`` (32 dims) and ``w(v)`` (16 dims) to
match on, ``o(v)`` (128 dims) to emit. The residual stream is laid out in named slices (``SLICES``):

- layer 0, heads 1-3 (*previous-token heads*): a constant query and key in the rope half only, shaped so
  that the score peaks when the key sits exactly ``j`` positions back (``j`` = 1, 2, 3); the values copy
  ``[u, w]`` (head 1) or ``w`` (heads 2, 3) of that token into ``prev1``, ``prev2``, ``prev3``.
- layer 1, heads 0-1 (*induction heads*): query ``[u(t), w(t-1), w(t-2)]`` against key
  ``[u(s-1), w(s-2), w(s-3)]``, so the score is largest where the three tokens before ``s`` equal the last
  three tokens; the two heads carry the two halves of ``o(s)`` into ``out``.
- ``lm_head`` reads ``out`` only: logit of ``v`` = ``LOGIT_GAIN * <o(v), out>``.

The RMS norms' weights undo the norms' scale (every code has unit length), MLPs are zero, unused heads have
zero queries and values. The rope-half profile puts ``ROPE_PEAK_WEIGHT`` on the fastest pair and spreads the
rest evenly over the next ``ROPE_PAIRS - 1``: over every offset up to 163,840 the wanted one leads the best
other one by at least 0.2 of the peak (``tests/reference/test_copymodel.py`` checks it on the model's rope).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qroute.errors import ConfigError
from qroute.numerics.rope import (
    apply_rope,
    rope_attention_factor,
    rope_inv_freq,
    rope_is_interleaved,
    softmax_scale,
)

MATCH_DIM = 32  # u(v): the current token's code
OLDER_DIM = 16  # w(v): the code of the two tokens before it
OUT_DIM = 128  # o(v): what the model emits; long enough that 4096 random codes barely overlap
SLICES: dict[str, int] = {"one": 1, "u": MATCH_DIM, "w": OLDER_DIM, "o": OUT_DIM, "prev1": MATCH_DIM + OLDER_DIM,
                          "prev2": OLDER_DIM, "prev3": OLDER_DIM, "out": OUT_DIM}  # fmt: skip
PREV_TOKEN_SCORE = 150.0  # softmax logit of the wanted offset in a previous-token head (its lead: >= 30)
MATCH_SCORE = 20.0  # softmax logit per matched token in an induction head (a 3-gram match: 60)
LOGIT_GAIN = 40.0
ROPE_PEAK_WEIGHT = 0.4
ROPE_PAIRS = 16
NUM_HEADS = 4
NUM_LAYERS = 2


def residual_slices() -> dict[str, slice]:
    """Each named part of the residual stream as a slice of the hidden dimension, in ``SLICES`` order."""
    out, start = {}, 0
    for name, width in SLICES.items():
        out[name] = slice(start, start + width)
        start += width
    return out


def rope_profile(config: dict[str, Any]) -> torch.Tensor:
    """The key's rope half ``[qk_rope_head_dim]`` float64 (unit length): pair ``i`` holds ``sqrt(weight_i)``
    in its first component, so that ``<k, R(e) k> = sum_i weight_i cos(e * inv_freq_i)``."""
    pairs = config["qk_rope_head_dim"] // 2
    weights = torch.zeros(pairs, dtype=torch.float64)
    weights[0] = ROPE_PEAK_WEIGHT
    weights[1:ROPE_PAIRS] = (1 - ROPE_PEAK_WEIGHT) / (ROPE_PAIRS - 1)
    key = torch.zeros(pairs, 2, dtype=torch.float64)
    key[:, 0] = weights.sqrt()
    if rope_is_interleaved(config):
        return key.reshape(-1)
    return key.t().reshape(-1)  # NeoX halves: all first components, then all second ones


def _codes(gen: torch.Generator, vocab: int, dim: int) -> torch.Tensor:
    codes = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    return codes / codes.norm(dim=-1, keepdim=True)


def _check(config: dict[str, Any]) -> None:
    needed = sum(SLICES.values())
    geometry = {"num_hidden_layers": NUM_LAYERS, "num_attention_heads": NUM_HEADS, "first_k_dense_replace": NUM_LAYERS}
    wrong = {k: config[k] for k, v in geometry.items() if config[k] != v}
    if config["hidden_size"] < needed:
        wrong["hidden_size"] = config["hidden_size"]
    if config["qk_nope_head_dim"] < MATCH_DIM + 2 * OLDER_DIM or 2 * config["v_head_dim"] < OUT_DIM:
        wrong["head dims"] = (config["qk_nope_head_dim"], config["v_head_dim"])
    if config["q_lora_rank"] < MATCH_DIM + 2 * OLDER_DIM or config["kv_lora_rank"] < 2 * MATCH_DIM + OUT_DIM:
        wrong["lora ranks"] = (config["q_lora_rank"], config["kv_lora_rank"])
    if wrong:
        raise ConfigError(f"the copy model needs {NUM_LAYERS} dense layers, {NUM_HEADS} heads and "
                          f"hidden_size >= {needed}; got {wrong}")  # fmt: skip


def copy_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor (HF DeepSeek-V3 names, float64) of the copying model for ``config``."""
    _check(config)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    q_rank, kv_rank, inter = config["q_lora_rank"], config["kv_lora_rank"], config["intermediate_size"]
    s = residual_slices()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u, w, o = _codes(gen, vocab, MATCH_DIM), _codes(gen, vocab, OLDER_DIM), _codes(gen, vocab, OUT_DIM)
    scale = softmax_scale(config)
    rope_scale = scale * rope_attention_factor(config) ** 2  # engines scale q_pe and k_pe by the YaRN factor

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64)

    def norm_weight(width: int, squared_norm: float) -> torch.Tensor:
        # An RMS norm maps x to x * sqrt(width) / |x|; for inputs of the expected length this undoes it.
        return torch.full((width,), math.sqrt(squared_norm / width), dtype=torch.float64)

    embed = zeros(vocab, hidden)
    embed[:, s["one"]] = 1.0
    embed[:, s["u"]], embed[:, s["w"]], embed[:, s["o"]] = u, w, o
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": embed}
    unit_inputs = {0: 4.0, 1: 8.0}  # squared residual length: one + u + w + o, then + prev1 (2) + prev2 + prev3

    # Layer 0: previous-token heads 1..3, all score in the rope half.
    key = rope_profile(config)
    inv_freq, interleaved = rope_inv_freq(config).double(), rope_is_interleaved(config)
    q_a, kv_a, q_b = zeros(q_rank, hidden), zeros(kv_rank + rope, hidden), zeros(NUM_HEADS, nope + rope, q_rank)
    q_a[0, s["one"]] = 1.0
    kv_a[kv_rank:, s["one"].start] = key
    kv_a[0:MATCH_DIM, s["u"]] = torch.eye(MATCH_DIM, dtype=torch.float64)
    kv_a[MATCH_DIM:MATCH_DIM + OLDER_DIM, s["w"]] = torch.eye(OLDER_DIM, dtype=torch.float64)
    kv_b, o_proj = zeros(NUM_HEADS, nope + v_dim, kv_rank), zeros(hidden, NUM_HEADS, v_dim)
    copies = {1: (slice(0, MATCH_DIM + OLDER_DIM), "prev1"), 2: (slice(MATCH_DIM, MATCH_DIM + OLDER_DIM), "prev2"),
              3: (slice(MATCH_DIM, MATCH_DIM + OLDER_DIM), "prev3")}  # fmt: skip
    for head, (latent, target) in copies.items():
        # q = R(-j) k: the score <R(t) q, R(s) k> = sum_i weight_i cos((s - t + j) inv_freq_i) peaks at s = t - j.
        query = apply_rope(key[None].float(), -head, inv_freq.float(), interleaved).double()[0]
        q_b[head, nope:, 0] = query * PREV_TOKEN_SCORE / rope_scale
        width = latent.stop - latent.start
        kv_b[head, nope:nope + width, latent] = torch.eye(width, dtype=torch.float64)
        o_proj[s[target], head, :width] = torch.eye(width, dtype=torch.float64)
    _attention(t, 0, q_a, norm_weight(q_rank, 1.0), q_b, kv_a, norm_weight(kv_rank, 2.0), kv_b, o_proj)

    # Layer 1: induction heads 0-1, all score in the latent (nope) half.
    q_a, kv_a, q_b = zeros(q_rank, hidden), zeros(kv_rank + rope, hidden), zeros(NUM_HEADS, nope + rope, q_rank)
    query_parts = [(s["u"], 0), (slice(s["prev1"].start + MATCH_DIM, s["prev1"].stop), MATCH_DIM),
                   (s["prev2"], MATCH_DIM + OLDER_DIM)]  # [u(t), w(t-1), w(t-2)]  # fmt: skip
    key_parts = [(slice(s["prev1"].start, s["prev1"].start + MATCH_DIM), 0), (s["prev2"], MATCH_DIM),
                 (s["prev3"], MATCH_DIM + OLDER_DIM)]  # [u(s-1), w(s-2), w(s-3)]  # fmt: skip
    match = MATCH_DIM + 2 * OLDER_DIM
    for (src, dst), (key_src, key_dst) in zip(query_parts, key_parts, strict=True):
        width = src.stop - src.start
        q_a[dst:dst + width, src] = torch.eye(width, dtype=torch.float64)
        kv_a[key_dst:key_dst + width, key_src] = torch.eye(width, dtype=torch.float64)
    kv_a[match:match + OUT_DIM, s["o"]] = torch.eye(OUT_DIM, dtype=torch.float64)
    kv_b, o_proj = zeros(NUM_HEADS, nope + v_dim, kv_rank), zeros(hidden, NUM_HEADS, v_dim)
    half = OUT_DIM // 2
    for head in (0, 1):
        q_b[head, :match, :match] = torch.eye(match, dtype=torch.float64) * MATCH_SCORE / scale
        kv_b[head, :match, :match] = torch.eye(match, dtype=torch.float64)
        kv_b[head, nope:nope + half, match + head * half:match + (head + 1) * half] = torch.eye(half,
                                                                                              dtype=torch.float64)
        o_proj[s["out"].start + head * half:s["out"].start + (head + 1) * half, head, :half] = torch.eye(
            half, dtype=torch.float64)  # fmt: skip
    _attention(t, 1, q_a, norm_weight(q_rank, 3.0), q_b, kv_a, norm_weight(kv_rank, 4.0), kv_b, o_proj)

    for layer in range(NUM_LAYERS):
        p = f"model.layers.{layer}."
        t[p + "input_layernorm.weight"] = norm_weight(hidden, unit_inputs[layer])
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float64)
        t[p + "mlp.gate_proj.weight"] = zeros(inter, hidden)
        t[p + "mlp.up_proj.weight"] = zeros(inter, hidden)
        t[p + "mlp.down_proj.weight"] = zeros(hidden, inter)
    t["model.norm.weight"] = norm_weight(hidden, unit_inputs[1] + 1.0)
    lm_head = zeros(vocab, hidden)
    lm_head[:, s["out"]] = o * LOGIT_GAIN
    t["lm_head.weight"] = lm_head
    return t


def _attention(t: dict[str, torch.Tensor], layer: int, q_a, q_a_norm, q_b, kv_a, kv_a_norm, kv_b, o_proj) -> None:
    p = f"model.layers.{layer}.self_attn."
    t[p + "q_a_proj.weight"] = q_a
    t[p + "q_a_layernorm.weight"] = q_a_norm
    t[p + "q_b_proj.weight"] = q_b.reshape(-1, q_b.shape[-1])
    t[p + "kv_a_proj_with_mqa.weight"] = kv_a
    t[p + "kv_a_layernorm.weight"] = kv_a_norm
    t[p + "kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
    t[p + "o_proj.weight"] = o_proj.reshape(o_proj.shape[0], -1)
