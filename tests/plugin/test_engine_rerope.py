"""qroute.numerics.rope.PositionShift against vLLM's own rotary embedding: moving a query roped at its local
position ``i`` to ``N + i`` gives what vLLM computes when it ropes the raw query at ``N + i`` (the exactness
reference), closer than the float64-angle ``apply_rope`` path."""

from __future__ import annotations

import pytest
import torch

from qroute.numerics.rope import PositionShift, apply_rope, rope_inv_freq

ROPE, HEADS, N = 64, 4, 5000
CONFIG = {"rope_theta": 10000.0, "qk_rope_head_dim": ROPE, "qk_nope_head_dim": 64}


@pytest.fixture(scope="module")
def vllm_rope(vllm):
    # custom_ops as in test_rope_fix: get_rope caches the module, and its forward binding with it.
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    params = {"rope_type": "default", "rope_theta": 10000.0}
    with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))):
        return get_rope(ROPE, max_position=8192, rope_parameters=params, is_neox_style=False, dtype=torch.float32)


def _engine(rope, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    q, _ = rope.forward_native(positions, x.clone(), None)
    return q


def test_rerope_matches_the_engine_roping_at_the_target(vllm_rope):
    x = torch.randn(16, HEADS, ROPE, generator=torch.Generator().manual_seed(1))
    local = torch.arange(16)
    inv_freq = rope_inv_freq(CONFIG)
    want = _engine(vllm_rope, local + N, x)
    got = PositionShift(local, local + N, inv_freq, interleaved=True)(_engine(vllm_rope, local, x))
    float64_path = apply_rope(_engine(vllm_rope, local, x), N, inv_freq, interleaved=True)
    err = (got - want).abs().max().item()
    assert err < 5e-6, err
    assert err < (float64_path - want).abs().max().item()  # the engine table is the closer reference


def test_engine_table_is_vllms(vllm_rope):
    from qroute.numerics.rope import engine_cos_sin

    positions = torch.arange(0, 8192, 7)
    cos, sin = engine_cos_sin(positions, rope_inv_freq(CONFIG))
    assert torch.equal(torch.cat((cos, sin), dim=-1), vllm_rope.cos_sin_cache[positions])
