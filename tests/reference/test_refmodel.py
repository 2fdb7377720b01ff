"""qroute.reference.refmodel: equals transformers' DeepseekV3ForCausalLM, and sharded corpus attention is exact."""

import json
import random

import pytest
import torch

from qroute.errors import ConfigError
from qroute.numerics.attention import merge, partial_attention
from qroute.numerics.rope import apply_rope
from qroute.reference.refmodel import RefMLAModel
from qroute.reference.tinymodel import build_tiny_model

transformers = pytest.importorskip("transformers")

NUM_TOKENS = 40
PREFIX = 24  # the "corpus": owners hold its latent rows at global positions 0..PREFIX-1


def _variant_dir(path):
    """A DeepSeek-V3 variant build_tiny_model does not make: q_proj (no q LoRA), YaRN with a cos/sin
    factor != 1, NeoX rope layout, grouped MoE routing with a nonzero correction bias, small latent."""
    config = transformers.DeepseekV3Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, rope_interleave=False, max_position_embeddings=32768, rope_theta=10000,
        rope_scaling={"type": "yarn", "factor": 8, "mscale": 0.707, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.05)
        model.lm_head.weight.mul_(20)  # sharper logits, so errors are not hidden by near-uniform ones
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "tiny": build_tiny_model(root / "tiny"),
        "tiny_moe": build_tiny_model(root / "tiny_moe", moe=True),
        "variant": _variant_dir(root / "variant"),
    }


@pytest.fixture(scope="module")
def refs(model_dirs):
    return {name: RefMLAModel.from_dir(path) for name, path in model_dirs.items()}


def assert_logits_close(actual, expected):
    """Equal up to float32 rounding: atol 1e-5 plus 1e-6 of the largest logit. The tiny models' logits
    reach ~30 (lm_head x20), where one float32 ulp is 2e-6, and merging parts in another order moves
    the hidden state by a few ulps, which lm_head spreads over every logit alike."""
    atol = 1e-5 + 1e-6 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _token_ids(ref, seed=0):
    return torch.randint(0, ref.config["vocab_size"], (NUM_TOKENS,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tiny", "tiny_moe", "variant"])
def test_logits_match_transformers(name, model_dirs, refs):
    ref = refs[name]
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
        model_dirs[name], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = _token_ids(ref)
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    logits = ref.forward(ids, torch.arange(NUM_TOKENS))
    assert logits.shape == (NUM_TOKENS, ref.config["vocab_size"]) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def _owner_cache(rows, gen):
    """Store ``rows`` at scattered slots of a paged cache ``[num_blocks, 4, width]`` padded with garbage."""
    num_slots = (rows.shape[0] + 3 + 3) // 4 * 4
    cache = torch.randn(num_slots, rows.shape[1], generator=gen) * 100
    slots = torch.randperm(num_slots, generator=gen)[: rows.shape[0]]
    cache[slots] = rows
    return cache.view(-1, 4, rows.shape[1]), slots


def _shard(latents, num_owners, seed):
    """Split each layer's corpus rows over ``num_owners``: per owner, per layer ``(paged cache, slots)``."""
    gen = torch.Generator().manual_seed(seed)
    owner_of = torch.randint(0, num_owners, (latents[0].shape[0],), generator=gen)
    owner_of[:num_owners] = torch.arange(num_owners)  # every owner holds something
    return [[_owner_cache(rows[owner_of == o], gen) for rows in latents] for o in range(num_owners)]


def _corpus_attend(ref, owners, offset, seed=0):
    """Own causal part merged with each owner's partial attention; queries rotated by ``offset``."""
    rng = random.Random(seed)

    def attend(layer, q_nope, q_pe, own_latents, q_positions):
        parts = [ref.self_attention(layer, q_nope, q_pe, own_latents, q_positions)]
        q_corpus = apply_rope(q_pe, offset, ref.inv_freq, ref.interleaved) if offset else q_pe
        for shard in owners:
            cache, slots = shard[layer]
            parts.append(partial_attention(q_nope, q_corpus, cache, slots, ref.scale, ref.kv_lora_rank))
        rng.shuffle(parts)
        return merge(parts)

    return attend


@pytest.mark.parametrize("num_owners", [2, 3])
@pytest.mark.parametrize("name", ["tiny", "variant"])
def test_sharded_corpus_reproduces_full_forward(name, num_owners, refs):
    ref = refs[name]
    ids = _token_ids(ref, seed=1)
    full = ref.forward(ids, torch.arange(NUM_TOKENS))
    _, corpus = ref.forward_collect(ids[:PREFIX], torch.arange(PREFIX))
    owners = _shard(corpus, num_owners, seed=num_owners)
    suffix = ids[PREFIX:]
    # Own tokens at their global positions: corpus queries need no rotation.
    at_global = ref.forward(suffix, torch.arange(PREFIX, NUM_TOKENS), _corpus_attend(ref, owners, 0))
    assert_logits_close(at_global, full[PREFIX:])
    # Own tokens numbered from 0 (as the engine does): corpus queries rotated by N = PREFIX.
    local = torch.arange(NUM_TOKENS - PREFIX)
    from_zero = ref.forward(suffix, local, _corpus_attend(ref, owners, PREFIX))
    assert_logits_close(from_zero, full[PREFIX:])
    # Without the rotation the corpus keys sit at the wrong relative distance: visibly different.
    unrotated = ref.forward(suffix, local, _corpus_attend(ref, owners, 0))
    assert (unrotated - full[PREFIX:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["tiny", "variant"])
def test_chunked_corpus_prefill_stores_global_positions(name, refs):
    # Exact-mode prefill: chunk B (tokens 12..23) numbered from 0 attends to chunk A through rotated
    # queries, and its k_pe is rotated by the chunk offset when saved (DESIGN.md §3).
    ref = refs[name]
    ids = _token_ids(ref, seed=2)
    full_logits, full_latents = ref.forward_collect(ids[:PREFIX], torch.arange(PREFIX))
    cut = PREFIX // 2
    _, chunk_a = ref.forward_collect(ids[:cut], torch.arange(cut))
    owners = _shard(chunk_a, 2, seed=5)
    logits_b, local_b = ref.forward_collect(ids[cut:PREFIX], torch.arange(PREFIX - cut),
                                            _corpus_attend(ref, owners, cut))  # fmt: skip
    assert_logits_close(logits_b, full_logits[cut:])
    r = ref.kv_lora_rank
    for rows, expected in zip(local_b, full_latents, strict=True):
        saved = torch.cat([rows[:, :r], apply_rope(rows[:, r:], cut, ref.inv_freq, ref.interleaved)], -1)
        torch.testing.assert_close(saved, expected[cut:], atol=1e-5, rtol=0)


def test_step_api_shapes(refs):
    ref = refs["tiny"]
    assert ref.num_layers == 2 and ref.config["kv_lora_rank"] == 512
    hidden = torch.randn(7, ref.config["hidden_size"])
    rows, q_nope, q_pe = ref.latents_and_queries(1, hidden, torch.arange(7))
    assert rows.shape == (7, 576) and q_nope.shape == (7, 4, 512) and q_pe.shape == (7, 4, 64)
    out, lse = ref.self_attention(1, q_nope, q_pe, rows, torch.arange(7))
    assert lse.shape == (7, 4) and ref.attention_output(1, out).shape == (7, ref.config["hidden_size"])
    logits, latents = ref.forward_collect(torch.arange(7), torch.arange(7))
    assert len(latents) == 2 and all(t.shape == (7, 576) for t in latents)


def test_load_errors(tmp_path, model_dirs):
    with pytest.raises(ConfigError, match="config.json"):
        RefMLAModel.from_dir(tmp_path)
    config = json.loads((model_dirs["tiny_moe"] / "config.json").read_text())
    with pytest.raises(ConfigError, match="scoring_func"):
        RefMLAModel({**config, "scoring_func": "softmax"}, {})
    with pytest.raises(ConfigError, match="lacks"):
        RefMLAModel(config, {})
    with pytest.raises(ConfigError, match=r"\[T\]"):
        RefMLAModel.from_dir(model_dirs["tiny"]).forward(torch.arange(3), torch.arange(4))
