"""``QRouteConnector``: vLLM's KV connector for qroute, a thin facade (STYLE 3).

Enabled by ``--kv-transfer-config '{"kv_connector": "QRouteConnector", "kv_connector_module_path":
"qroute.connectors.vllm", "kv_role": "kv_both", "kv_connector_extra_config": {...}}'`` (keys:
``qroute.core.config``). vLLM builds one instance per role: the SCHEDULER one (EngineCore
process) forwards to ``QRouteSchedulerSide``, the WORKER one (Worker process) to ``QRouteWorkerSide``.
Nothing is loaded into vLLM's paged cache: ``get_num_new_matched_tokens`` is always ``(0, False)``; the
corpus is attended by the attention backend (``qroute.plugin.vllm_backend``), which reaches the worker
side through ``get_kv_transfer_group().corpus_attention``. A request whose corpus attention fails is ended
through vLLM's KV-load-failure path (``get_block_ids_with_load_errors``, ``kv_load_failure_policy``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from qroute.connectors.vllm_meta import QRouteStepMeta
from qroute.connectors.vllm_scheduler import QRouteSchedulerSide
from qroute.connectors.vllm_stats import QRouteConnectorStats, QRoutePromMetrics
from qroute.connectors.vllm_worker import QRouteWorkerSide
from qroute.core.config import QRouteConfig, load_directory
from qroute.dataplane.membership import initial_members, membership_for
from qroute.errors import ConfigError
from qroute.plugin.vllm import CorpusAttentionProvider, ensure_active

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["QRouteConnector", "config_from_vllm"]


def config_from_vllm(vllm_config: VllmConfig) -> tuple[QRouteConfig, str]:
    """The qroute config of this instance and its local model directory."""
    ktc = vllm_config.kv_transfer_config
    config = QRouteConfig.from_extra_config(ktc.kv_connector_extra_config if ktc is not None else None)
    model_dir = vllm_config.model_config.model
    if not Path(model_dir).is_dir():
        raise ConfigError(f"qroute needs a local model directory (--model), got {model_dir!r}")
    if vllm_config.parallel_config.tensor_parallel_size != 1:
        raise ConfigError("qroute supports --tensor-parallel-size 1 only (owners hold all heads)")
    return config, model_dir


class QRouteConnector(KVConnectorBase_V1, CorpusAttentionProvider):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config, role, kv_cache_config)
        ensure_active(vllm_config)
        config, model_dir = config_from_vllm(vllm_config)
        membership = membership_for(config)  # etcd: a joining instance places the corpus over the members there
        members = initial_members(membership, config.join, config.instance_ids) if membership else None
        tokens, directory = load_directory(config, model_dir, members)
        self._scheduler: QRouteSchedulerSide | None = None
        self._worker: QRouteWorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            block_size = vllm_config.cache_config.block_size
            policy = vllm_config.kv_transfer_config.kv_load_failure_policy
            self._scheduler = QRouteSchedulerSide(config, tokens, directory, block_size, fail_requests=policy == "fail")
        else:
            self._worker = QRouteWorkerSide(config, directory, model_dir, vllm_config.model_config.dtype, membership)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # per-layer network calls cannot sit inside a captured graph

    # -- worker side --------------------------------------------------------------------------------

    @property
    def corpus_attention(self) -> QRouteWorkerSide | None:
        """The worker side, for the attention backend (None in the scheduler process)."""
        return self._worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        from vllm.forward_context import get_forward_context, is_forward_context_available

        # Runs inside set_forward_context, before the forward: this step's attention metadata is there.
        attn = get_forward_context().attn_metadata if is_forward_context_available() else None
        first = next(iter(attn.values()), None) if isinstance(attn, dict) else None
        if not isinstance(connector_metadata, QRouteStepMeta) or first is None:
            self._worker.end_step()  # no forward this step (or micro-batching, unsupported)
            return
        self._worker.start_step(connector_metadata, first.slot_mapping, first.query_start_loc)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self._worker.end_step()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self._worker.save_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        pass

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker.take_report()

    def get_kv_connector_stats(self) -> QRouteConnectorStats | None:
        return self._worker.take_stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> QRouteConnectorStats:
        return QRouteConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> QRoutePromMetrics:  # fmt: skip
        return QRoutePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()

    # -- scheduler side -----------------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self._scheduler.bind_kv_cache_manager(kv_cache_manager)

    def on_new_request(self, request: Request) -> None:
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False  # the corpus never enters the paged cache

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        pass

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler.update_connector_output(connector_output.kv_connector_worker_meta)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return False, self._scheduler.request_finished(request)
