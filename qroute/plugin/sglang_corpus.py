"""One SGLang instance's corpus attention: SGLang's adapter to the engine-free ``CorpusWorker``
(``qroute.dataplane.corpus_worker``, which says what each phase does), in the scheduler process that runs the model.

SGLang's forward batch carries request ids (``ForwardBatch.rids``) but not the requests, and a request's
``custom_params`` stay on its ``Req``. So the plugin hooks ``ForwardBatch.init_new`` (``keep_requests``) to keep the
``Req`` objects of the batch it converts, by id (an attribute set on the forward batch there was seen not to
reach the backend);
per forward the backend then calls:

- ``plan`` (``init_forward_metadata``): each request's ``RequestStep`` from ``custom_params["qroute"]`` (the vLLM
  connector's ``kv_transfer_params["qroute"]`` keys: corpus, mode, prefill_chunk, owner_modes, selector, topk,
  window) and where its rows are (``extend_prefix_lens`` / ``seq_lens``), then ``CorpusWorker.plan_step`` over the
  forward's ``out_cache_loc``;
- ``store`` and ``attend`` per layer (after the layer's KV write into the ``MLATokenToKVPool``, and after the own
  part);
- ``end_forward`` after the last layer: a request whose corpus part failed, or whose parameters were refused, is
  aborted (``Req.to_finish = FINISH_ABORT``: the client gets the reason, nothing else in the batch is touched).

When a request finishes (``request_finished``, a hook on ``Req.update_finish_state``), one line sums up its corpus
work: ``qroute: request <rid> done: {...}`` (route, fetch, local, bytes_moved, shared, stored_chunk, error), what
vLLM returns in ``kv_transfer_params``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import torch

from qroute.core.config import QRouteConfig, RequestParams, load_directory, parse_request_params
from qroute.core.geometry import load_config
from qroute.core.placement import prefill_problem
from qroute.dataplane.corpus_worker import CorpusWorker
from qroute.dataplane.step import COUNTERS, RequestStep
from qroute.errors import ConfigError, QRouteError
from qroute.numerics.attention import Part
from qroute.numerics.rope import rope_is_interleaved

__all__ = ["DONE_FORMAT", "SGLangCorpus", "corpus_for", "done_summaries", "keep_requests", "request_finished"]

logger = logging.getLogger("sglang.qroute")

HEALTH_CHECK_RID_PREFIX = "HEALTH_CHECK"  # sglang.srt.constants: the rids of SGLang's /health generate requests
_MAX_TRACKED = 4096  # requests whose state is kept at most (finished ones are dropped when they finish)
DONE_FORMAT = "qroute: request %s done: %s"  # one line per finished request: its rid and its summary as JSON
_DONE_LINE = re.compile(r"qroute: request (\S+) done: (\{.*\})")

_lock = threading.Lock()
_corpus: SGLangCorpus | None = None


@dataclass
class RequestState:
    """What qroute knows of one SGLang request: its parameters (None: no corpus), why it is refused, its tally."""

    params: RequestParams | None
    error: str | None = None
    aborted: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


class SGLangCorpus:
    def __init__(self, config: QRouteConfig, runner: Any):
        model_dir = runner.model_config.model_path
        self.config = config
        self.tokens, self.directory = load_directory(config, model_dir)
        interleaved = rope_is_interleaved(load_config(model_dir))  # SGLang honours rope_interleave (default True)
        self.worker = CorpusWorker(config, self.directory, model_dir, runner.model_config.dtype, log=logger,
                                   interleaved=interleaved)  # fmt: skip
        self.worker.open_store()
        self.num_layers = self.worker.geometry.num_layers
        self._states: dict[str, RequestState] = {}
        self._reqs: dict[str, Any] = {}  # rid -> the step's Req (for aborting it)
        self.latest: dict[str, Any] = {}  # rid -> Req of the batch ForwardBatch.init_new converted last

    # -- per forward ------------------------------------------------------------------------------------

    def plan(self, forward_batch: Any) -> None:
        """Plan this forward's corpus work (see the module docstring)."""
        rids = forward_batch.rids or []
        if any(rid not in self.latest for rid in rids) or len(rids) != forward_batch.batch_size:
            # never attend to no corpus silently
            raise QRouteError("qroute: a forward batch whose requests ForwardBatch.init_new (which the plugin hooks) "
                              f"did not see: {len(rids)} ids for {forward_batch.batch_size} rows of requests")
        if not rids:
            self.worker.plan_step([], torch.empty(0, dtype=torch.int64))
            return
        reqs = [self.latest[rid] for rid in rids]
        seq_lens = forward_batch.seq_lens.tolist()
        if forward_batch.forward_mode.is_extend():
            query_lens, first = forward_batch.extend_seq_lens_cpu, forward_batch.extend_prefix_lens_cpu
        else:
            query_lens, first = [1] * len(seq_lens), [n - 1 for n in seq_lens]
        self._reqs = {req.rid: req for req in reqs}
        placed, start = [], 0
        for req, qlen, first_pos in zip(reqs, query_lens, first, strict=True):
            step = self._step(req, first_pos)
            if step is not None:
                placed.append((start, start + qlen, step))
            start += qlen
        self.worker.plan_step(placed, forward_batch.out_cache_loc)

    def store(self, layer: int, cache: torch.Tensor) -> None:
        """Corpus-prefill rows of this layer into the store, from the pool's ``[slots, 1, width]`` buffer."""
        self.worker.store_layer(layer, cache.view(-1, self.worker.width))

    def attend(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, own: Part) -> Part:
        return self.worker.attend_step(layer, q_nope, q_pe, own)

    def end_forward(self) -> None:
        """After the last layer: tally the forward's work per request and abort the requests that failed."""
        report = self.worker.take_report()
        self.worker.end_step()
        for req_id, state in self._states.items():
            if report is not None:
                for name, delta in zip(COUNTERS, report.counts.get(req_id, ()), strict=False):
                    state.summary[name] = state.summary.get(name, 0) + delta
                if req_id in report.stored:
                    state.summary["stored_chunk"] = report.stored[req_id]
                if req_id in report.errors:
                    state.error = state.error or report.errors[req_id]
                    state.summary.setdefault("error", state.error)
            if state.error and not state.aborted and req_id in self._reqs:
                self._abort(self._reqs[req_id], state)
        self._reqs = {}

    def request_finished(self, req: Any) -> None:
        state = self._states.pop(req.rid, None)
        if state is not None and state.params is not None and state.params.corpus is not None:
            logger.info(DONE_FORMAT, req.rid, json.dumps(state.summary, sort_keys=True))

    # -- per request ------------------------------------------------------------------------------------

    def _step(self, req: Any, first_pos: int) -> RequestStep | None:
        state = self._states.get(req.rid)
        if state is None:
            state = self._states[req.rid] = self._parse(req)
            while len(self._states) > _MAX_TRACKED:  # a finish the hook did not see (e.g. a client abort)
                del self._states[next(iter(self._states))]
        if state.params is None or state.params.corpus is None or state.error:
            return None
        p = state.params
        return RequestStep.attending(self.directory, req.rid, p.corpus, p.mode, first_pos,
                                     prefill_chunk=p.prefill_chunk, owner_modes=p.owner_modes,
                                     selection=p.selection)  # fmt: skip

    def _parse(self, req: Any) -> RequestState:
        """The request's ``custom_params["qroute"]``; a problem refuses it (aborted after this forward)."""
        d = self.directory
        if str(req.rid).startswith(HEALTH_CHECK_RID_PREFIX):  # SGLang's own /health probe: no corpus work
            return RequestState(RequestParams(None, self.config.mode))
        raw = (req.sampling_params.custom_params or {}).get("qroute", {})
        try:
            params = parse_request_params(raw, default_corpus=d.name, default_mode=self.config.mode,
                                          known_corpora=(d.name,), known_instances=d.instances,
                                          default_selection=self.config.selection,
                                          field="custom_params.qroute")  # fmt: skip
        except ConfigError as exc:
            return self._refused(str(exc), raw)
        state = RequestState(params, summary={"corpus": params.corpus, "mode": params.mode,
                                              **dict.fromkeys(COUNTERS, 0)})  # fmt: skip
        if params.corpus is not None and params.prefill_chunk is not None:
            problem = prefill_problem(d, self.tokens, self.config.instance_id, params.prefill_chunk,
                                      req.origin_input_ids)  # fmt: skip
            if problem:
                return self._refused(problem, raw)
            state.summary["stored_chunk"] = None
        return state

    def _refused(self, error: str, raw: object) -> RequestState:
        logger.warning("qroute: request refused: %s", error)
        state = RequestState(None, error=error, summary={"error": error})
        state.summary["request"] = raw if isinstance(raw, dict) else repr(raw)
        return state

    def _abort(self, req: Any, state: RequestState) -> None:
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        status = HTTPStatus.BAD_REQUEST if state.params is None else HTTPStatus.INTERNAL_SERVER_ERROR
        kind = "BadRequestError" if state.params is None else "InternalServerError"
        req.to_finish = FINISH_ABORT(f"qroute: {state.error}", status, kind)
        state.aborted = True


def done_summaries(log_text: str) -> dict[str, dict[str, Any]]:
    """rid -> summary of every ``DONE_FORMAT`` line in an instance's log text (a rid seen twice: its last line)."""
    return {rid: json.loads(summary) for rid, summary in _DONE_LINE.findall(log_text)}


def corpus_for(config: QRouteConfig, runner: Any) -> SGLangCorpus:
    """This process's corpus attention (one store and owner service per process, however many backends)."""
    global _corpus
    with _lock:
        if _corpus is None:
            _corpus = SGLangCorpus(config, runner)
        return _corpus


def keep_requests(forward_batch: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of ``ForwardBatch.init_new(batch, model_runner, ...)``: leave the batch's requests on it."""
    batch = kwargs.get("batch", args[1] if len(args) > 1 else None)
    if _corpus is not None and batch is not None:
        _corpus.latest = {req.rid: req for req in batch.reqs}


def request_finished(_result: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook of ``Req.update_finish_state``: the request's summary line once it has finished."""
    if _corpus is not None and req.finished():
        _corpus.request_finished(req)
