"""qroute.numerics.rope: pure rotations that compose, and frequencies/scales equal to transformers' DeepSeek-V3."""

import math

import pytest
import torch

from qroute.errors import ConfigError
from qroute.numerics.rope import (
    apply_rope,
    rope_attention_factor,
    rope_inv_freq,
    rope_is_interleaved,
    rope_parameters,
    softmax_scale,
)

# DeepSeek-V3's config.json rope settings (checkpoint spelling: rope_theta + rope_scaling).
V3_ROPE = {
    "rope_theta": 10000,
    "max_position_embeddings": 163840,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
    },
}
DEFAULT_ROPE = {"rope_theta": 10000.0, "qk_rope_head_dim": 64, "qk_nope_head_dim": 64}


def _yarn(**overrides):
    cfg = {**V3_ROPE, "rope_scaling": {**V3_ROPE["rope_scaling"], **overrides}}
    cfg["rope_scaling"] = {k: v for k, v in cfg["rope_scaling"].items() if v is not None}
    return cfg


YARN_CONFIGS = {
    "v3": V3_ROPE,
    "mscale_ratio": _yarn(mscale=0.707, factor=8),
    "no_mscale": _yarn(mscale=None, mscale_all_dim=None, factor=4, beta_fast=None, beta_slow=None),
    "only_all_dim": _yarn(mscale=None, mscale_all_dim=0.5, factor=16),
}


def _hf_config(cfg: dict):
    transformers = pytest.importorskip("transformers")
    return transformers.DeepseekV3Config(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_theta=cfg["rope_theta"],
        rope_scaling=dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None,
    )


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("config", [DEFAULT_ROPE, V3_ROPE], ids=["default", "yarn"])
def test_rotation_composes_and_inverts(config, interleaved):
    gen = torch.Generator().manual_seed(0)
    inv_freq = rope_inv_freq(config)
    x = torch.randn(6, 3, 64, generator=gen)
    p = torch.tensor([0, 1, 7, 4095, 32768, 160000])
    n = torch.tensor([5, 0, 131072, 17, -3, 1234])
    once = apply_rope(apply_rope(x, p, inv_freq, interleaved), n, inv_freq, interleaved)
    torch.testing.assert_close(once, apply_rope(x, p + n, inv_freq, interleaved), atol=1e-5, rtol=0)
    back = apply_rope(apply_rope(x, p, inv_freq, interleaved), -p, inv_freq, interleaved)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
    # A pure rotation: norms of every pair are kept, whatever the YaRN factors.
    torch.testing.assert_close(apply_rope(x, p, inv_freq, interleaved).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rope(x, 0, inv_freq, interleaved), x)


def test_int_offset_and_dtype_kept():
    inv_freq = rope_inv_freq(DEFAULT_ROPE)
    x = torch.randn(4, 64).to(torch.bfloat16)
    out = apply_rope(x, 3, inv_freq, True)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(out, apply_rope(x, torch.full((4,), 3), inv_freq, True))


def test_layouts_are_permutations_of_each_other():
    # Interleaved pairs (2i, 2i+1) are NeoX pairs (i, i + d/2) after de-interleaving.
    inv_freq = rope_inv_freq(DEFAULT_ROPE)
    x = torch.randn(5, 2, 64)
    pos = torch.arange(5) * 11
    perm = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])
    inter = apply_rope(x, pos, inv_freq, interleaved=True)
    neox = apply_rope(x[..., perm], pos, inv_freq, interleaved=False)
    torch.testing.assert_close(inter[..., perm], neox, atol=1e-6, rtol=0)


@pytest.mark.parametrize("interleave", [True, False])
def test_matches_transformers_rotary(interleave):
    mod = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    hf_cfg = _hf_config(V3_ROPE)
    cos, sin = mod.DeepseekV3RotaryEmbedding(hf_cfg)(torch.zeros(1), torch.arange(50)[None])
    q = torch.randn(1, 3, 50, 64)  # [batch, heads, seq, rope_dim]
    k = torch.randn(1, 1, 50, 64)
    fn = mod.apply_rotary_pos_emb_interleave if interleave else mod.apply_rotary_pos_emb
    q_hf, k_hf = fn(q, k, cos, sin)
    inv_freq = rope_inv_freq(V3_ROPE)
    q_ours = apply_rope(q[0].transpose(0, 1), torch.arange(50), inv_freq, interleave).transpose(0, 1)[None]
    k_ours = apply_rope(k[0, 0], torch.arange(50), inv_freq, interleave)
    if interleave:  # transformers de-interleaves its output; scores are unchanged by that permutation
        perm = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])
        q_ours, k_ours = q_ours[..., perm], k_ours[..., perm]
    torch.testing.assert_close(q_ours, q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ours, k_hf[0, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(YARN_CONFIGS))
def test_yarn_matches_transformers(name):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    cfg = YARN_CONFIGS[name]
    hf_inv_freq, hf_factor = rope_utils.ROPE_INIT_FUNCTIONS["yarn"](_hf_config(cfg))
    assert torch.equal(rope_inv_freq(cfg), hf_inv_freq)
    assert rope_attention_factor(cfg) == pytest.approx(hf_factor, rel=1e-12)
    mod = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    hf_attn = mod.DeepseekV3Attention(_hf_config(cfg), layer_idx=0)
    assert softmax_scale(cfg) == pytest.approx(hf_attn.scaling, rel=1e-12)


def test_v3_values():
    assert rope_attention_factor(V3_ROPE) == 1.0  # mscale == mscale_all_dim
    mscale = 0.1 * math.log(40) + 1.0
    assert softmax_scale(V3_ROPE) == pytest.approx(192**-0.5 * mscale * mscale)
    inv_freq = rope_inv_freq(V3_ROPE)
    assert inv_freq.shape == (32,) and inv_freq.dtype == torch.float32
    base = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    assert inv_freq[0] == base[0] and torch.allclose(inv_freq[-1], base[-1] / 40)  # kept / interpolated


def test_default_rope_and_spellings():
    base = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    assert torch.equal(rope_inv_freq(DEFAULT_ROPE), base)
    assert softmax_scale(DEFAULT_ROPE) == 128**-0.5 and rope_attention_factor(DEFAULT_ROPE) == 1.0
    # transformers>=5 writes rope_parameters (with rope_theta inside) instead of rope_scaling.
    new_style = {k: v for k, v in V3_ROPE.items() if k not in ("rope_scaling", "rope_theta")}
    new_style["rope_parameters"] = {**V3_ROPE["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000}
    assert torch.equal(rope_inv_freq(new_style), rope_inv_freq(V3_ROPE))
    assert rope_parameters(new_style)["rope_type"] == "yarn"
    assert rope_is_interleaved({}) and not rope_is_interleaved({"rope_interleave": False})


def test_errors_name_the_key():
    with pytest.raises(ConfigError, match="rope_theta"):
        rope_inv_freq({"qk_rope_head_dim": 64})
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        rope_inv_freq({"rope_theta": 1e4, "qk_rope_head_dim": 63})
    with pytest.raises(ConfigError, match="llama3"):
        rope_inv_freq({**DEFAULT_ROPE, "rope_scaling": {"type": "llama3", "factor": 8}})
    inv_freq = rope_inv_freq(DEFAULT_ROPE)
    with pytest.raises(ConfigError, match="last dim"):
        apply_rope(torch.zeros(2, 32), torch.zeros(2, dtype=torch.long), inv_freq, True)
    with pytest.raises(ConfigError, match="positions"):
        apply_rope(torch.zeros(2, 64), torch.zeros(3, dtype=torch.long), inv_freq, True)
    with pytest.raises(ConfigError, match="positions"):
        apply_rope(torch.zeros(2, 64), torch.zeros(2), inv_freq, True)


# --- PositionShift: the one re-positioning, with the engine's float32 table or apply_rope's angles --------


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape", [(7, 4, 64), (7, 64)])
def test_position_shift_moves_to_the_target_position(shape, interleaved):
    from qroute.numerics.rope import PositionShift

    inv_freq = rope_inv_freq(DEFAULT_ROPE)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    local = torch.arange(3, 3 + shape[0])
    shift = 1000
    at_local = apply_rope(x, local, inv_freq, interleaved)
    engine = PositionShift(local, local + shift, inv_freq, interleaved=interleaved)
    moved = engine(at_local)
    torch.testing.assert_close(moved, apply_rope(x, local + shift, inv_freq, interleaved), atol=2e-4, rtol=0)
    back = PositionShift(local + shift, local, inv_freq, interleaved=interleaved)(moved)
    torch.testing.assert_close(back, at_local, atol=1e-5, rtol=0)
    assert torch.equal(engine.first(3)(at_local[:3]), moved[:3]) and len(engine.first(3)) == 3
    same = PositionShift(local, local, inv_freq, interleaved=interleaved)
    torch.testing.assert_close(same(x), x, atol=1e-6, rtol=0)
    # with apply_rope's own (float64) angles the move matches apply_rope at the target to float32 rounding
    exact = PositionShift(local, local + shift, inv_freq, interleaved=interleaved, engine_table=False)
    torch.testing.assert_close(exact(at_local), apply_rope(x, local + shift, inv_freq, interleaved), atol=2e-6,
                               rtol=0)  # fmt: skip
    with pytest.raises(ConfigError, match="differ in shape"):
        PositionShift(local, local[:2], inv_freq, interleaved=interleaved)


def test_engine_cos_sin_refuses_inexact_positions():
    from qroute.numerics.rope import engine_cos_sin

    inv_freq = rope_inv_freq(DEFAULT_ROPE)
    with pytest.raises(ConfigError, match="positions"):
        engine_cos_sin(torch.tensor([1.0]), inv_freq)
    with pytest.raises(ConfigError, match="float32"):
        engine_cos_sin(torch.tensor([1 << 24]), inv_freq)
