"""Deterministic random-weight DeepSeek-V3 models for tests and benchmarks.

``build_tiny_model(...)`` writes a directory that ``transformers`` and vLLM load offline:
``config.json``, ``model.safetensors`` (one file, HF DeepSeek-V3 checkpoint names), ``generation_config.json``
and the tokenizer files from ``qroute.reference.tokenizer``. The same arguments always give the same bytes.

Weights are drawn from one ``torch.Generator`` seeded with ``seed``, tensor by tensor in a fixed
order: normal(0, 0.02) for matrices, 1 for norms, 0 for the router bias, and ``lm_head`` multiplied
by ``logit_scale``. Without that scale the logits of a random model are nearly uniform and greedy
decoding flips on near-ties (bf16 especially).

The weight names are written here rather than taken from a ``transformers`` model, because recent
``transformers`` fuses experts in memory (``experts.gate_up_proj``) while checkpoints and vLLM use
one tensor per expert (``experts.N.gate_proj.weight``).

With ``out_dir=None`` the model is cached under ``$QROUTE_CACHE`` (default ``~/.cache/qroute``)
as ``models/tiny-<hash>``, hashed over its config, every argument and ``BUILDER_VERSION``; a directory counts
as complete only once ``COMPLETE_MARKER`` exists, and it is built in a temporary sibling and renamed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qroute.errors import ConfigError
from qroute.reference.tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, build_tokenizer

# Bump on any change to what the builder writes, so that cached models are rebuilt.
BUILDER_VERSION = 1
COMPLETE_MARKER = ".qroute-complete"
DTYPES = ("float32", "bfloat16")
SKILLS = ("random", "copy")
INIT_STD = 0.02
COPY_HIDDEN_SIZE = 512  # the copying model's residual parts take 385 dims

# Fixed MLA geometry: the vLLM CPU MLA kernel supports only a 512 + 64 = 576-wide latent cache.
KV_LORA_RANK = 512
QK_ROPE_HEAD_DIM = 64
Q_LORA_RANK = 128
QK_NOPE_HEAD_DIM = 64
V_HEAD_DIM = 64
INTERMEDIATE_SIZE = 512
# DeepSeek-V3's position range and YaRN scaling (its config.json): long corpora are served at positions the
# model's own rope covers, and the reference instance for a corpus of tens of thousands of tokens can start.
MAX_POSITION_EMBEDDINGS = 163840
PLAIN_MAX_POSITION_EMBEDDINGS = 8192  # with yarn=False
ROPE_THETA = 10000.0
YARN = {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
        "mscale_all_dim": 1.0}
# Small MoE (moe=True): every layer after the first is MoE.
NUM_ROUTED_EXPERTS = 4
NUM_EXPERTS_PER_TOK = 2
NUM_SHARED_EXPERTS = 1
MOE_INTERMEDIATE_SIZE = 128


def _check_args(
    dtype: str,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    moe: bool,
    seed: int,
    vocab_size: int,
    logit_scale: float,
) -> None:
    def positive_int(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid; use an int >= 1")

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use one of {DTYPES}")
    positive_int("num_layers", num_layers)
    positive_int("hidden_size", hidden_size)
    positive_int("num_heads", num_heads)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid; use an int >= 0")
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int)
        or not (MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE)
    ):
        raise ConfigError(f"vocab_size={vocab_size!r} is invalid; use an int in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}]")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, int | float) or not (0 < logit_scale < math.inf):
        raise ConfigError(f"logit_scale={logit_scale!r} is invalid; use a finite number > 0")
    if moe and num_layers < 2:
        raise ConfigError(f"moe=True needs num_layers >= 2 (layer 0 stays dense); got num_layers={num_layers}")


def model_config(
    *, dtype: str, num_layers: int, hidden_size: int, num_heads: int, moe: bool, vocab_size: int, yarn: bool = True
) -> dict[str, Any]:
    """The ``config.json`` contents, with the keys both transformers 4.x and 5.x and vLLM read. ``yarn=False``:
    plain RoPE over 8,192 positions (the layout vLLM's CPU rotary kernel mis-ropes; ``qroute.plugin.rope_fix``)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "kv_lora_rank": KV_LORA_RANK,
        "q_lora_rank": Q_LORA_RANK,
        "qk_rope_head_dim": QK_ROPE_HEAD_DIM,
        "qk_nope_head_dim": QK_NOPE_HEAD_DIM,
        "v_head_dim": V_HEAD_DIM,
        # MoE keys are present in both variants; only first_k_dense_replace switches MoE on.
        "first_k_dense_replace": 1 if moe else num_layers,
        "moe_layer_freq": 1,
        "n_routed_experts": NUM_ROUTED_EXPERTS,
        "num_experts_per_tok": NUM_EXPERTS_PER_TOK,
        "n_shared_experts": NUM_SHARED_EXPERTS,
        "moe_intermediate_size": MOE_INTERMEDIATE_SIZE,
        "n_group": 1,
        "topk_group": 1,
        # noaux_tc: without it vLLM never creates e_score_correction_bias and the load fails.
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "num_nextn_predict_layers": 0,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS if yarn else PLAIN_MAX_POSITION_EMBEDDINGS,
        "rope_theta": ROPE_THETA,
        "rope_scaling": {"type": "yarn", "rope_type": "yarn", **YARN} if yarn else None,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": ROPE_THETA, **YARN} if yarn else
                           {"rope_type": "default", "rope_theta": ROPE_THETA},
        "rope_interleave": True,
        "rms_norm_eps": 1e-6,
        "initializer_range": INIT_STD,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def weight_specs(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, init)`` for every checkpoint tensor, in draw order; init is normal/ones/zeros."""
    h, nh = config["hidden_size"], config["num_attention_heads"]
    qk_head_dim = QK_NOPE_HEAD_DIM + QK_ROPE_HEAD_DIM
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (config["vocab_size"], h), "normal")]

    def mlp(prefix: str, inter: int) -> None:
        specs.append((f"{prefix}.gate_proj.weight", (inter, h), "normal"))
        specs.append((f"{prefix}.up_proj.weight", (inter, h), "normal"))
        specs.append((f"{prefix}.down_proj.weight", (h, inter), "normal"))

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (h,), "ones"),
            (f"{p}.self_attn.q_a_proj.weight", (Q_LORA_RANK, h), "normal"),
            (f"{p}.self_attn.q_a_layernorm.weight", (Q_LORA_RANK,), "ones"),
            (f"{p}.self_attn.q_b_proj.weight", (nh * qk_head_dim, Q_LORA_RANK), "normal"),
            (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (KV_LORA_RANK + QK_ROPE_HEAD_DIM, h), "normal"),
            (f"{p}.self_attn.kv_a_layernorm.weight", (KV_LORA_RANK,), "ones"),
            (f"{p}.self_attn.kv_b_proj.weight", (nh * (QK_NOPE_HEAD_DIM + V_HEAD_DIM), KV_LORA_RANK), "normal"),
            (f"{p}.self_attn.o_proj.weight", (h, nh * V_HEAD_DIM), "normal"),
            (f"{p}.post_attention_layernorm.weight", (h,), "ones"),
        ]
        if i < config["first_k_dense_replace"]:
            mlp(f"{p}.mlp", INTERMEDIATE_SIZE)
            continue
        specs.append((f"{p}.mlp.gate.weight", (NUM_ROUTED_EXPERTS, h), "normal"))
        specs.append((f"{p}.mlp.gate.e_score_correction_bias", (NUM_ROUTED_EXPERTS,), "zeros"))
        for e in range(NUM_ROUTED_EXPERTS):
            mlp(f"{p}.mlp.experts.{e}", MOE_INTERMEDIATE_SIZE)
        mlp(f"{p}.mlp.shared_experts", MOE_INTERMEDIATE_SIZE * NUM_SHARED_EXPERTS)
    specs.append(("model.norm.weight", (h,), "ones"))
    specs.append(("lm_head.weight", (config["vocab_size"], h), "normal"))
    return specs


def _make_weights(config: dict[str, Any], seed: int, logit_scale: float, skill: str) -> dict[str, Any]:
    import torch

    dtype = getattr(torch, config["dtype"])
    if skill == "copy":
        from qroute.reference.copymodel import copy_weights

        return {name: t.to(dtype).contiguous() for name, t in copy_weights(config, seed).items()}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tensors = {}
    for name, shape, init in weight_specs(config):
        if init == "normal":
            t = torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD
        elif init == "ones":
            t = torch.ones(shape, dtype=torch.float32)
        else:
            t = torch.zeros(shape, dtype=torch.float32)
        if name == "lm_head.weight":
            t = t * logit_scale
        # The router bias stays float32, as in the real checkpoint and vLLM's parameter.
        tensors[name] = t if name.endswith("e_score_correction_bias") else t.to(dtype).contiguous()
    return tensors


def _write_model(out_dir: Path, config: dict[str, Any], seed: int, logit_scale: float, skill: str) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    # Fixed metadata (no timestamps) keeps the file byte-identical across builds.
    weights = _make_weights(config, seed, logit_scale, skill)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(out_dir, vocab_size=config["vocab_size"])


def cache_root() -> Path:
    """``$QROUTE_CACHE``, or ``~/.cache/qroute`` when unset."""
    return Path(os.environ.get("QROUTE_CACHE") or Path.home() / ".cache" / "qroute")


def model_hash(config: dict[str, Any], **kwargs: Any) -> str:
    """A short content hash over the model's ``config.json`` contents, the builder arguments and ``BUILDER_VERSION``
    (the config is hashed itself, so that a change to it can never reuse a stale cached build)."""
    payload = json.dumps({"builder_version": BUILDER_VERSION, "config": config, **kwargs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_tiny_model(
    out_dir: Path | None = None,
    *,
    dtype: str = "float32",
    num_layers: int = 2,
    hidden_size: int = 256,
    num_heads: int = 4,
    moe: bool = False,
    seed: int = 0,
    vocab_size: int = 4096,
    logit_scale: float = 20.0,
    yarn: bool = True,
    skill: str = "random",
) -> Path:
    """Write a tiny DeepSeek-V3 model and return its directory.

    ``skill="random"``: random weights (module docstring). ``skill="copy"``: the constructed induction circuit of
    ``qroute.reference.copymodel`` (2 layers, 4 heads, ``hidden_size`` >= 385; ``logit_scale`` unused), a model
    that continues a line by copying it from its context.

    ``out_dir`` given: build there, overwriting the model files. ``out_dir=None``: return the cached
    build under ``cache_root()/models/tiny-<hash>``, building it first when missing or incomplete.
    Raises ``ConfigError`` for an invalid argument.
    """
    _check_args(dtype, num_layers, hidden_size, num_heads, moe, seed, vocab_size, logit_scale)
    if skill not in SKILLS:
        raise ConfigError(f"skill={skill!r} is not supported; use one of {SKILLS}")
    config = model_config(dtype=dtype, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads, moe=moe,
                          vocab_size=vocab_size, yarn=yarn)  # fmt: skip
    if out_dir is not None:
        out_dir = Path(out_dir)
        _write_model(out_dir, config, seed, logit_scale, skill)
        return out_dir

    digest = model_hash(
        config,
        dtype=dtype,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        moe=moe,
        seed=seed,
        vocab_size=vocab_size,
        logit_scale=float(logit_scale),
        skill=skill,
    )
    models_dir = cache_root() / "models"
    final = models_dir / f"tiny-{digest}"
    if (final / COMPLETE_MARKER).exists():
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{digest}-", dir=models_dir))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared with engine processes
        _write_model(tmp, config, seed, logit_scale, skill)
        (tmp / COMPLETE_MARKER).write_text(digest + "\n")
        if (final / COMPLETE_MARKER).exists():
            return final  # a concurrent builder finished first; its copy is identical
        if final.exists():
            # Only complete directories are ever renamed into place, so this is foreign debris.
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            # A concurrent builder won the race; its identical copy is used.
            if not (final / COMPLETE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_model_dir(**kwargs: Any) -> Path:
    """The cached tiny model for ``build_tiny_model`` keyword arguments (built on first use)."""
    return build_tiny_model(None, **kwargs)


def copy_model_dir(dtype: str = "float32") -> Path:
    """The cached copying model (``skill="copy"``) the demo answers with."""
    return build_tiny_model(None, dtype=dtype, hidden_size=COPY_HIDDEN_SIZE, skill="copy")
