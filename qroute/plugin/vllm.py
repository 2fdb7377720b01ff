"""qroute's vLLM general plugin: the ``vllm.general_plugins`` entry point ``qroute = qroute.plugin.vllm:register``.

vLLM calls ``register()`` in every process of every instance where qroute is installed (API server,
EngineCore, each worker), before any config exists in some of them, and does not catch what it raises.
So ``register()`` only installs hooks that leave an instance that does not configure qroute running
exactly as stock vLLM, and never raises; whether qroute is *configured* is decided later, from the
``VllmConfig``, by ``qroute_configured()``, and ``ensure_active()`` turns a configured-but-broken
set-up into a start-up error.

What ``register()`` does, once per process:

1. CPU only: the MLA RoPE correctness fix (``rope_fix``), when the installed CPU kernel is probed
   to mis-rope MLA's layout. It applies to **every** instance with qroute installed, configured or not:
   it is a correctness fix, and the stock and reference runs must rope like qroute does or their
   tokens differ for reasons that have nothing to do with qroute. One INFO line per model process
   says it is in use (logged on first use: vLLM configures logging after it loads plugins).
   (An instance started with ``VLLM_PLUGINS`` excluding ``qroute`` gets neither the plugin nor the fix.)
2. Registers the connector name ``QRouteConnector`` (lazy: ``qroute.connectors.vllm`` is imported only
   when an instance names it in ``--kv-transfer-config``).
3. Registers the attention backend. CPU: the ``CPU_MLA`` slot (the only MLA slot the CPU platform
   honours) now resolves to ``QRouteCPUMLABackend``, which hands out vLLM's own ``CPUMLAImpl`` and
   metadata builder unless qroute is configured, so an unconfigured instance runs the stock classes.
   CUDA: the ``CUSTOM`` slot resolves to ``QRouteMLABackend`` (vLLM's Triton MLA plus the corpus part), used
   only by an instance started with ``--attention-backend CUSTOM``; ``ensure_active`` requires that selection
   where qroute is configured.

"Configured" means the instance's ``--kv-transfer-config`` names ``QRouteConnector`` (directly or inside
a ``MultiConnector``). That config is the one source of truth: it reaches every process inside the
pickled ``VllmConfig``, whereas ``sys.argv`` says nothing under the offline ``vllm.LLM`` API and an
environment variable would be a second switch that can disagree with it. qroute inside a
``MultiConnector`` counts as configured so that ``ensure_active`` refuses it at start-up with a clear
message (the backend reaches the connector through ``get_kv_transfer_group()``, which is then the
``MultiConnector``), rather than letting it start and fail on the first request.

The attention backend depends on this module only; the connector declares what the backend needs from it
by deriving from ``CorpusAttentionProvider`` (so imports run connectors -> plugin, never back).
"""

from __future__ import annotations

import abc
import threading
from typing import TYPE_CHECKING, Protocol

from vllm.logger import init_logger

from qroute.errors import ConfigError
from qroute.plugin.install_steps import check_installed, run_steps

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.platforms.interface import Platform

    from qroute.numerics.attention import Part

__all__ = [
    "CONNECTOR_CLASS",
    "CONNECTOR_MODULE",
    "CONNECTOR_NAME",
    "CPU_BACKEND_PATH",
    "CUDA_BACKEND_PATH",
    "CorpusAttention",
    "CorpusAttentionProvider",
    "ensure_active",
    "qroute_configured",
    "register",
]

# A child of the "vllm" logger, so that lines carry vLLM's format and handler in every process.
logger = init_logger("vllm.qroute")

CONNECTOR_NAME = "QRouteConnector"
CONNECTOR_MODULE = "qroute.connectors.vllm"
CONNECTOR_CLASS = "QRouteConnector"
CPU_BACKEND_PATH = "qroute.plugin.vllm_backend.QRouteCPUMLABackend"
CUDA_BACKEND_PATH = "qroute.plugin.vllm_cuda_backend.QRouteMLABackend"


class CorpusAttention(Protocol):
    """What the attention backend calls once per layer for the whole step (the connector's worker side):
    ``own`` (every row's own part, ``[T, H, R]`` / ``[T, H]`` float32) merged with each row's corpus part."""

    def attend_step(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, own: Part) -> Part: ...


class CorpusAttentionProvider(abc.ABC):
    """A KV connector that attends its requests to the corpus (declared, STYLE 5): ``QRouteConnector``."""

    @property
    @abc.abstractmethod
    def corpus_attention(self) -> CorpusAttention | None:
        """The worker side (None where the connector has no worker role, e.g. the scheduler process)."""

_lock = threading.Lock()
_registered = False
# Step name -> why it failed; only ever raised by ensure_active(), i.e. when qroute is configured.
_failures: dict[str, str] = {}
_active_logged = False


def register() -> None:
    """Install qroute's hooks in this process. Idempotent; never raises (see the module docstring)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
        from vllm.platforms import current_platform

        steps = [("connector", _register_connector), ("backend", lambda: _register_backend(current_platform))]
        if current_platform.is_cpu():
            steps.insert(0, ("rope_fix", _apply_rope_fix))
        run_steps(steps, _failures, logger)


def _apply_rope_fix() -> None:
    from qroute.plugin import rope_fix

    try:
        affected = rope_fix.kernel_mishandles_mla_layout()
        reason = "the CPU rotary kernel mis-ropes MLA's 3-D/strided q_pe and k_pe"
    except Exception as exc:  # cannot probe: forward_native is always correct
        affected, reason = True, f"the CPU rotary kernel could not be probed ({exc})"
    if affected and rope_fix.apply():
        logger.debug("qroute: patched RotaryEmbedding.forward_cpu (%s)", reason)


def _register_connector() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    # register_connector raises on a duplicate name; the registry is the factory's own lookup table.
    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_CLASS)


def _register_backend(platform: Platform) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if platform.is_cpu():
        # The CPU platform resolves MLA only to CPU_MLA or AMX_MLA (platforms/cpu.py get_attn_backend_cls).
        register_backend(AttentionBackendEnum.CPU_MLA, CPU_BACKEND_PATH)
    elif platform.is_cuda():
        # CUSTOM is only used when an instance asks for it (--attention-backend CUSTOM): stock instances never are.
        held = _custom_slot()
        if held not in (None, CUDA_BACKEND_PATH):
            raise ConfigError(f"the CUSTOM attention backend slot already holds {held!r} (another plugin)")
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND_PATH)


def _custom_slot() -> str | None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    try:
        return AttentionBackendEnum.CUSTOM.get_path()
    except ValueError:  # nothing registered there
        return None


def qroute_configured(vllm_config: VllmConfig | None) -> bool:
    """Whether this instance's ``--kv-transfer-config`` names ``QRouteConnector``."""
    ktc = None if vllm_config is None else vllm_config.kv_transfer_config
    return ktc is not None and ktc.has_connector(CONNECTOR_NAME)


def ensure_active(vllm_config: VllmConfig) -> None:
    """Raise ``ConfigError`` unless qroute can run in this process; log "qroute active: ..." once.

    Called where qroute is configured and about to be used: the attention backend when it hands out
    the qroute impl, and the connector's ``__init__`` (both roles). Never silently runs without qroute.
    """
    global _active_logged
    if not qroute_configured(vllm_config):
        raise ConfigError(f"qroute is not configured: set --kv-transfer-config kv_connector={CONNECTOR_NAME!r}")
    named = vllm_config.kv_transfer_config.kv_connector
    if named != CONNECTOR_NAME:
        raise ConfigError(f"qroute must be the instance's only KV connector: --kv-transfer-config names {named!r} "
                          f"with {CONNECTOR_NAME} inside it, which qroute does not support; set "
                          f"kv_connector={CONNECTOR_NAME!r}")  # fmt: skip
    if not _registered:
        raise ConfigError(
            "qroute's vLLM plugin did not run in this process; check that `qroute` is installed in this "
            "environment and that VLLM_PLUGINS (if set) includes 'qroute'"
        )
    check_installed(_failures, "vLLM")
    backend = _check_backend_selection(vllm_config)
    with _lock:
        if not _active_logged:
            _active_logged = True
            logger.info("qroute active: connector %s, attention backend %s", CONNECTOR_NAME, backend)


def _check_backend_selection(vllm_config: VllmConfig) -> str:
    from vllm.platforms import CpuArchEnum, current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    selected = vllm_config.attention_config.backend
    if current_platform.is_cpu():
        slot = AttentionBackendEnum.CPU_MLA.get_path()
        if slot != CPU_BACKEND_PATH:
            raise ConfigError(f"the CPU_MLA backend slot holds {slot!r}, not qroute's; another plugin overrode it")
        import torch

        # vLLM prefers AMX_MLA on AMX machines unless CPU_MLA is asked for (platforms/cpu.py).
        amx = current_platform.get_cpu_architecture() == CpuArchEnum.X86 and torch.cpu._is_amx_tile_supported()
        if amx and selected != AttentionBackendEnum.CPU_MLA:
            raise ConfigError("this CPU has AMX, so vLLM would pick AMX_MLA; pass --attention-backend CPU_MLA")
        return f"{CPU_BACKEND_PATH} (CPU_MLA slot)"
    if current_platform.is_cuda():
        slot = _custom_slot()
        if slot != CUDA_BACKEND_PATH:
            raise ConfigError(f"the CUSTOM backend slot holds {slot!r}, not qroute's; another plugin overrode it")
        if selected != AttentionBackendEnum.CUSTOM:
            raise ConfigError("qroute's CUDA attention backend sits in vLLM's CUSTOM slot: pass "
                              f"--attention-backend CUSTOM (this instance selected {selected})")  # fmt: skip
        return f"{CUDA_BACKEND_PATH} (CUSTOM slot, vLLM's Triton MLA for the own part)"
    raise ConfigError(f"qroute supports vLLM's CPU and CUDA platforms, not {current_platform.device_name!r}")
