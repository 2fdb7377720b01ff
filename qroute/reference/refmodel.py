"""Float32 reference forward of a DeepSeek-V3-architecture model in the absorbed MLA form.

The engine-free data source and exactness reference: it produces a corpus's latent KV (what an owner
stores) and lets a caller split each layer's attention into parts merged with ``attention.merge``.

Per layer, with ``T`` tokens, ``H`` heads, ``R`` = kv_lora_rank, ``P`` = qk_rope_head_dim:

- ``latent_rows [T, R + P]`` float32: ``[kv_a_layernorm(c) | k_pe roped at its position]``; the rope half
  keeps the checkpoint's pair layout (interleaved for DeepSeek, as vLLM stores it; transformers
  de-interleaves q and k alike, which leaves scores unchanged).
- ``q_nope [T, H, R]`` float32: q_nope absorbed through W_UK (from ``kv_b_proj``).
- ``q_pe [T, H, P]`` float32: roped at the token's position.
- the attention part ``(out [T, H, R], lse [T, H])`` float32, natural-log LSE (``qroute.numerics.attention``).

``attend(layer, q_nope, q_pe, own_latents, q_positions) -> (out, lse)`` decides what each layer attends
to; the default is causal attention over the call's own tokens. Weights load from an HF DeepSeek-V3
directory (``config.json`` + ``*.safetensors``, HF names); MoE layers use noaux_tc sigmoid gating.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qroute.errors import ConfigError
from qroute.numerics.attention import Part, partial_attention
from qroute.numerics.rope import apply_rope, rope_attention_factor, rope_inv_freq, rope_is_interleaved, softmax_scale

__all__ = ["Attend", "RefMLAModel"]

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Part]


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors in {path}; point `from_dir` at an HF model directory")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class RefMLAModel:
    """A DeepSeek-V3 forward in float32, absorbed MLA, with per-layer attention left to the caller."""

    def __init__(self, config: dict[str, Any], weights: dict[str, torch.Tensor]):
        self.config = config
        self.num_layers: int = config["num_hidden_layers"]
        self.num_heads: int = config["num_attention_heads"]
        self.kv_lora_rank: int = config["kv_lora_rank"]
        self.rope_dim: int = config["qk_rope_head_dim"]
        self.nope_dim: int = config["qk_nope_head_dim"]
        self.v_head_dim: int = config["v_head_dim"]
        self.eps: float = config.get("rms_norm_eps", 1e-6)
        self.scale: float = softmax_scale(config)
        self.inv_freq: torch.Tensor = rope_inv_freq(config)  # [P // 2] float32
        self.interleaved: bool = rope_is_interleaved(config)
        self.rope_factor: float = rope_attention_factor(config)
        self._check_config()
        self._w = {k: v.float() for k, v in weights.items()}
        self._moe_layers = [self._is_moe(i) for i in range(self.num_layers)]
        self._check_weights()

    @classmethod
    def from_dir(cls, path: str | Path) -> "RefMLAModel":
        """Load ``config.json`` and all ``*.safetensors`` of an HF DeepSeek-V3 directory (as float32)."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{config_file} not found; point `from_dir` at an HF model directory")
        return cls(json.loads(config_file.read_text()), _load_safetensors(path))

    # -- checks ---------------------------------------------------------------------------------------

    def _check_config(self) -> None:
        cfg = self.config
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported; allowed: 'silu'")
        if cfg.get("n_routed_experts"):
            if cfg.get("scoring_func", "sigmoid") != "sigmoid" or cfg.get("topk_method", "noaux_tc") != "noaux_tc":
                raise ConfigError(
                    f"MoE gating scoring_func={cfg.get('scoring_func')!r} "
                    f"topk_method={cfg.get('topk_method')!r} "
                    "is not supported; allowed: 'sigmoid' with 'noaux_tc' (DeepSeek-V3)"
                )

    def _is_moe(self, layer: int) -> bool:
        # DeepSeek / vLLM rule; transformers checks only first_k_dense_replace (moe_layer_freq is 1 in V3).
        cfg = self.config
        return (
            bool(cfg.get("n_routed_experts"))
            and layer >= (cfg.get("first_k_dense_replace") or 0)
            and (layer % (cfg.get("moe_layer_freq") or 1) == 0)
        )

    def _check_weights(self) -> None:
        needed = ["model.embed_tokens.weight", "model.norm.weight"]
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            needed += [p + n + ".weight" for n in ("input_layernorm", "post_attention_layernorm")]
            attn = ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
            attn += ["q_a_proj", "q_a_layernorm", "q_b_proj"] if self.config.get("q_lora_rank") else ["q_proj"]
            needed += [f"{p}self_attn.{n}.weight" for n in attn]
            if self._moe_layers[i]:
                needed += [f"{p}mlp.gate.weight", f"{p}mlp.shared_experts.down_proj.weight"]
            else:
                needed += [f"{p}mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
        missing = [n for n in needed if n not in self._w]
        if missing:
            raise ConfigError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        if "lm_head.weight" not in self._w:
            if not self.config.get("tie_word_embeddings"):
                raise ConfigError("checkpoint lacks lm_head.weight and tie_word_embeddings is false")
            self._w["lm_head.weight"] = self._w["model.embed_tokens.weight"]

    # -- pieces of a layer ----------------------------------------------------------------------------

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._w[name + ".weight"], self._w.get(name + ".bias"))

    def _kv_b(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK ``[H, nope, R]`` and W_UV ``[H, v, R]`` from kv_b_proj ``[H * (nope + v), R]``."""
        w = self._w[f"model.layers.{layer}.self_attn.kv_b_proj.weight"]
        w = w.view(self.num_heads, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def latents_and_queries(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latent rows and absorbed queries of ``hidden [T, hidden_size]`` (the layer's input residual).

        Returns ``latent_rows [T, R + P]``, ``q_nope [T, H, R]`` and ``q_pe [T, H, P]``, float32, with
        k_pe and q_pe roped at ``positions [T]`` (int). The YaRN cos/sin factor (``rope_factor``, 1.0 for
        DeepSeek-V3) is applied here, once per token, as engines do.
        """
        p = f"model.layers.{layer}."
        x = _rms_norm(hidden, self._w[p + "input_layernorm.weight"], self.eps)
        a = p + "self_attn."
        if self.config.get("q_lora_rank"):
            q_a = _rms_norm(self._linear(a + "q_a_proj", x), self._w[a + "q_a_layernorm.weight"], self.eps)
            q = self._linear(a + "q_b_proj", q_a)
        else:
            q = self._linear(a + "q_proj", x)
        q = q.view(x.shape[0], self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q[..., : self.nope_dim], q[..., self.nope_dim :]
        kv = self._linear(a + "kv_a_proj_with_mqa", x)
        latent = _rms_norm(kv[:, : self.kv_lora_rank], self._w[a + "kv_a_layernorm.weight"], self.eps)
        k_pe = apply_rope(kv[:, self.kv_lora_rank :], positions, self.inv_freq, self.interleaved)
        q_pe = apply_rope(q_pe, positions, self.inv_freq, self.interleaved)
        if self.rope_factor != 1.0:
            k_pe, q_pe = k_pe * self.rope_factor, q_pe * self.rope_factor
        w_uk, _ = self._kv_b(layer)
        q_nope = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        return torch.cat([latent, k_pe], dim=-1), q_nope, q_pe

    def attention_output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """Merged latent ``out [T, H, R]`` -> attention output ``[T, hidden_size]`` (W_UV, then o_proj)."""
        _, w_uv = self._kv_b(layer)
        v = torch.einsum("thr,hvr->thv", out.float(), w_uv)
        return self._linear(f"model.layers.{layer}.self_attn.o_proj", v.reshape(out.shape[0], -1))

    def self_attention(
        self,
        layer: int,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        own_latents: torch.Tensor,
        q_positions: torch.Tensor,
    ) -> Part:
        """The default ``attend``: causal attention over the call's own tokens, by position."""
        slots = torch.arange(own_latents.shape[0], device=own_latents.device)
        return partial_attention(
            q_nope, q_pe, own_latents, slots, self.scale, self.kv_lora_rank,
            q_positions=q_positions, kv_positions=q_positions,
        )  # fmt: skip

    def _dense_mlp(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        gate = self._linear(prefix + "gate_proj", x)
        return self._linear(prefix + "down_proj", F.silu(gate) * self._linear(prefix + "up_proj", x))

    def _experts(self, prefix: str, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, D], up [I, D], down [D, I]) of one expert: per-expert HF names or fused 3-D tensors."""
        name = f"{prefix}experts.{expert}."
        if name + "gate_proj.weight" in self._w:
            return tuple(self._w[name + n + "_proj.weight"] for n in ("gate", "up", "down"))  # type: ignore[return-value]
        gate_up = self._w[prefix + "experts.gate_up_proj"][expert]
        gate, up = gate_up.chunk(2, dim=0)
        return gate, up, self._w[prefix + "experts.down_proj"][expert]

    def _moe(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 MoE: noaux_tc group-limited sigmoid routing plus shared experts."""
        cfg = self.config
        num_experts, top_k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
        num_groups, topk_groups = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
        scores = F.linear(x, self._w[prefix + "gate.weight"]).sigmoid()  # [T, E]
        bias = self._w.get(prefix + "gate.e_score_correction_bias")
        choice = scores + bias if bias is not None else scores  # the bias picks experts, never weighs them
        group_scores = choice.view(-1, num_groups, num_experts // num_groups).topk(2, dim=-1)[0].sum(-1)
        group_idx = group_scores.topk(topk_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.repeat_interleave(num_experts // num_groups, dim=-1).bool()
        topk_idx = choice.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1, sorted=False)[1]
        topk_w = scores.gather(1, topk_idx)
        if cfg.get("norm_topk_prob", True):
            topk_w = topk_w / (topk_w.sum(-1, keepdim=True) + 1e-20)
        topk_w = topk_w * cfg.get("routed_scaling_factor", 1.0)
        out = torch.zeros_like(x)
        for e in topk_idx.unique().tolist():
            rows, k = (topk_idx == e).nonzero(as_tuple=True)
            gate, up, down = self._experts(prefix, e)
            h = F.linear(F.silu(F.linear(x[rows], gate)) * F.linear(x[rows], up), down)
            out.index_add_(0, rows, h * topk_w[rows, k, None])
        return out + self._dense_mlp(prefix + "shared_experts.", x)

    def mlp(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Post-attention norm and MLP (dense or MoE) of ``hidden [T, hidden_size]``; the MLP output."""
        p = f"model.layers.{layer}."
        x = _rms_norm(hidden, self._w[p + "post_attention_layernorm.weight"], self.eps)
        return self._moe(p + "mlp.", x) if self._moe_layers[layer] else self._dense_mlp(p + "mlp.", x)

    # -- whole forward --------------------------------------------------------------------------------

    @torch.no_grad()
    def forward_collect(
        self, token_ids: torch.Tensor, positions: torch.Tensor, attend: Attend | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Like ``forward``, also returning each layer's ``latent_rows [T, R + P]`` float32 (k_pe roped at
        ``positions``): the latent KV an owner stores for these tokens."""
        if token_ids.dim() != 1 or positions.shape != token_ids.shape:
            raise ConfigError(
                f"token_ids and positions must both be [T]; got {tuple(token_ids.shape)} and {tuple(positions.shape)}"
            )
        attend = attend or self.self_attention
        hidden = F.embedding(token_ids, self._w["model.embed_tokens.weight"])
        latents: list[torch.Tensor] = []
        for layer in range(self.num_layers):
            rows, q_nope, q_pe = self.latents_and_queries(layer, hidden, positions)
            latents.append(rows)
            out, _ = attend(layer, q_nope, q_pe, rows, positions)
            hidden = hidden + self.attention_output(layer, out)
            hidden = hidden + self.mlp(layer, hidden)
        hidden = _rms_norm(hidden, self._w["model.norm.weight"], self.eps)
        return F.linear(hidden, self._w["lm_head.weight"]), latents

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attend: Attend | None = None) -> torch.Tensor:
        """Logits ``[T, vocab]`` float32 of ``token_ids [T]`` at ``positions [T]`` (int).

        ``attend(layer, q_nope [T,H,R], q_pe [T,H,P], own_latents [T,R+P], q_positions [T]) -> (out, lse)``
        computes each layer's attention part (default ``self_attention``: causal over own tokens); a
        caller adds corpus parts, e.g. ``merge([own, part_on_owner_1, ...])``.
        """
        return self.forward_collect(token_ids, positions, attend)[0]
