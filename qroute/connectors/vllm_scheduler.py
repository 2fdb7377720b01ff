"""Scheduler side of the qroute connector (runs in vLLM's EngineCore process).

Per request: reads ``kv_transfer_params["qroute"]`` once (corpus, mode, prefill_chunk), never raising: a bad
request gets no corpus attention, its response says why (``"error"``), and under ``kv_load_failure_policy``
"fail" (vLLM's default) it is failed from its second step on (see ``_add``); the API server's
``CorpusValidator`` already refuses unknown corpora with HTTP 400. A request without qroute parameters
attends to the configured corpus in the configured mode; ``"corpus": null`` opts out.

Per step: ``build_connector_meta`` sends the worker one ``RequestStep`` per scheduled request, keyed by
the slot of its first scheduled token, and the block of its last computed token: a request whose corpus
attention failed (worker error, or refused here) is then failed through vLLM's own KV-load-failure path
(the worker reports that block in ``get_block_ids_with_load_errors``). Results: ``request_finished`` returns
``{"qroute": {corpus, mode, route, fetch, local, bytes_moved[, stored_chunk][, error]}}``.

Ordering trap (vllm 0.32 ``Scheduler.update_from_output``): a request that finishes in step ``s`` gets
``request_finished`` **before** ``update_connector_output`` delivers the worker counts of step ``s``. The
dict returned by ``request_finished`` is therefore kept and completed in place when those counts arrive,
later in the same ``update_from_output`` call; the output is serialized only after it returns.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from qroute.connectors.vllm_meta import (
    COUNTERS,
    QRouteStepMeta,
    QRouteWorkerMeta,
    RequestStep,
    computed_block,
    first_slot,
)
from qroute.core.config import QRouteConfig, Selection, parse_request_params
from qroute.core.placement import CorpusDirectory, prefill_problem
from qroute.errors import ConfigError

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.qroute")

_MAX_FINISHING = 4096  # finished requests whose last worker counts may still arrive


@dataclass
class RequestState:
    corpus: str | None  # None: no corpus attention
    mode: str
    prefill_chunk: int | None = None
    owner_modes: tuple[tuple[str, str], ...] = ()
    selection: Selection = Selection()
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # what request_finished returns under "qroute"


class QRouteSchedulerSide:
    def __init__(
        self,
        config: QRouteConfig,
        tokens: np.ndarray,
        directory: CorpusDirectory,
        block_size: int,
        fail_requests: bool = True,
    ):
        self.config = config
        self.fail_requests = fail_requests  # kv_load_failure_policy "fail": failed requests end with an error
        self.tokens = tokens
        self.directory = directory
        self.block_size = block_size
        self._kv_cache_manager: KVCacheManager | None = None
        self._states: dict[str, RequestState] = {}
        self._finishing: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        self._kv_cache_manager = kv_cache_manager

    # -- per request --------------------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        self._states[request.request_id] = self._parse(request)

    def _state(self, request_id: str, request: Request | None = None) -> RequestState | None:
        state = self._states.get(request_id)
        if state is None and request is not None:
            state = self._states[request_id] = self._parse(request)
        return state

    def _parse(self, request: Request) -> RequestState:
        """The request's qroute parameters; problems become ``error`` (the engine must not raise)."""
        d = self.directory
        raw = (request.kv_transfer_params or {}).get("qroute", {})
        state = RequestState(corpus=d.name, mode=self.config.mode)
        try:
            params = parse_request_params(raw, default_corpus=d.name, default_mode=self.config.mode,
                                          known_corpora=(d.name,), known_instances=d.instances,
                                          default_selection=self.config.selection)  # fmt: skip
        except ConfigError as exc:
            if isinstance(raw, dict):  # report what the request asked for
                state.corpus, state.mode = raw.get("corpus", d.name), raw.get("mode") or self.config.mode
            return self._refuse(state, str(exc))
        state.corpus, state.mode, state.owner_modes = params.corpus, params.mode, params.owner_modes
        state.selection = params.selection
        state.summary = {"corpus": state.corpus, "mode": state.mode, **dict.fromkeys(COUNTERS, 0)}
        if state.owner_modes:
            state.summary["owner_modes"] = dict(state.owner_modes)
        if not state.selection.dense:
            state.summary["selection"] = {"selector": state.selection.selector, "topk": state.selection.topk,
                                          "window": state.selection.window}  # fmt: skip
        if state.corpus is None or params.prefill_chunk is None:
            return state
        state.prefill_chunk = params.prefill_chunk
        state.error = prefill_problem(self.directory, self.tokens, self.config.instance_id, params.prefill_chunk,
                                      request.prompt_token_ids or ())
        return self._refuse(state, state.error) if state.error else state

    def _refuse(self, state: RequestState, error: str) -> RequestState:
        logger.warning("qroute: request gets no corpus attention: %s", error)
        state.error = error
        state.summary = {"corpus": state.corpus, "mode": state.mode, **dict.fromkeys(COUNTERS, 0), "error": error}
        return state

    def request_finished(self, request: Request) -> dict[str, Any] | None:
        state = self._states.pop(request.request_id, None)
        if state is None:
            return None
        if state.prefill_chunk is not None and not state.error:
            state.summary.setdefault("stored_chunk", None)  # filled by the worker's report
        self._finishing[request.request_id] = state.summary
        while len(self._finishing) > _MAX_FINISHING:
            self._finishing.popitem(last=False)
        return {"qroute": state.summary}

    # -- per step -----------------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> QRouteStepMeta:
        meta = QRouteStepMeta()
        for new in scheduler_output.scheduled_new_reqs:
            self._add(meta, new.req_id, new.block_ids[0], new.num_computed_tokens)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, num_computed in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
            if self._kv_cache_manager is not None and req_id in self._states:
                self._add(meta, req_id, self._kv_cache_manager.get_block_ids(req_id)[0], num_computed)
        return meta

    def _add(self, meta: QRouteStepMeta, req_id: str, block_ids: list[int], num_computed: int) -> None:
        state = self._states.get(req_id)
        if state is None or state.corpus is None:
            return
        slot = first_slot(block_ids, num_computed, self.block_size)
        block = computed_block(block_ids, num_computed, self.block_size) if self.fail_requests else None
        if state.error:
            # Its corpus attention failed (or was refused): the worker reports one of its computed blocks as a
            # load error, and vLLM finishes it with FINISHED_ERROR. None on a first step (nothing computed yet).
            if block is not None:
                meta.requests[slot] = RequestStep(req_id, state.corpus, state.mode, 0, 0, num_computed,
                                                  computed_block=block, failed=True)  # fmt: skip
            return
        meta.requests[slot] = RequestStep.attending(self.directory, req_id, state.corpus, state.mode, num_computed,
                                                    prefill_chunk=state.prefill_chunk, computed_block=block,
                                                    owner_modes=state.owner_modes,
                                                    selection=state.selection)  # fmt: skip

    def update_connector_output(self, worker_meta: object) -> None:
        if not isinstance(worker_meta, QRouteWorkerMeta):
            return
        for req_id in {*worker_meta.counts, *worker_meta.stored, *worker_meta.errors}:
            state = self._states.get(req_id)
            summary = state.summary if state is not None else self._finishing.get(req_id)
            if summary is None:
                continue
            for name, delta in zip(COUNTERS, worker_meta.counts.get(req_id, ()), strict=False):
                summary[name] = summary.get(name, 0) + delta
            if req_id in worker_meta.stored:
                summary["stored_chunk"] = worker_meta.stored[req_id]
            if req_id in worker_meta.errors:
                summary.setdefault("error", worker_meta.errors[req_id])
                if state is not None:  # no corpus for the rest of the request, not on and off
                    state.error = state.error or worker_meta.errors[req_id]
