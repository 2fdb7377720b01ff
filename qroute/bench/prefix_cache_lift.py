"""A harness-only vLLM plugin for the ``stock-prefix-cached (override lifted)`` baseline of ``qroute bench ab``.

On GPUs stock vLLM prefix-caches MLA, so the baseline a GPU user would pick is one instance that computes the corpus
once and reuses it for every question. On this CPU build one override stops it: ``CpuPlatform.check_and_update_config``
(``vllm/platforms/cpu.py`` ~516-531) turns prefix caching off for MLA without AMX, silently over
``--enable-prefix-caching``. This plugin lifts that one setting, and only in a process started with
``QROUTE_BENCH_LIFT_CPU_MLA_PREFIX_OVERRIDE=1`` (the harness sets it for that baseline alone); everything else the
override does (chunked prefill off, the batched-token budget) stays. The prefill-with-context path it then uses is
vLLM's own (``mla_attention.py`` ~2957-2968); ``qroute bench ab`` checks the baseline's tokens against the floor's.

Registered as its own ``vllm.general_plugins`` entry point (``qroute-bench-lift``) so that qroute's plugin has no
part in it: without the variable it does nothing.
"""

from __future__ import annotations

import os

__all__ = ["LIFT_ENV", "register"]

LIFT_ENV = "QROUTE_BENCH_LIFT_CPU_MLA_PREFIX_OVERRIDE"


def register() -> None:
    if os.environ.get(LIFT_ENV) != "1":
        return
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__
    if getattr(original, "qroute_lifted", False):
        return  # vLLM loads plugins once per process, but more than one loader may call us

    def check_and_update_config(cls, vllm_config) -> None:
        asked = vllm_config.cache_config.enable_prefix_caching
        original(cls, vllm_config)
        if asked and vllm_config.model_config is not None and vllm_config.model_config.use_mla:
            vllm_config.cache_config.enable_prefix_caching = True

    check_and_update_config.qroute_lifted = True
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
