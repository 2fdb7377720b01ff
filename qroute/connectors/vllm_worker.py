"""Worker side of the qroute connector (runs in vLLM's Worker process, next to the model and KV cache).

- ``register_kv_caches`` (once): allocates this instance's resident corpus store (float32
  ``[rows this instance holds, kv_lora_rank + rope_dim]`` per layer, ``shard_layout`` order), starts the
  owner service on the configured address and the peer connections (``OwnerLinks``), and the ``Router``.
- ``start_step`` (plan, once per step, from ``bind_connector_metadata``): maps query rows to requests by
  the slot of their first scheduled token, plans each request's corpus parts with the router (predicate,
  mode) and the ``PositionShift`` that moves its queries from own position ``i`` to ``shift + i``.
- ``attend_corpus`` (run, once per layer and request, from the attention backend): moves ``q_pe`` and
  returns the router's exact merge of the request's own part and its corpus parts.
- ``save_layer`` (once per layer, from ``save_kv_layer``): a corpus-prefill request's latent rows go into
  the store at its chunk's rows, ``k_pe`` moved from local position ``i`` to ``chunk.start + i``.

Failures never raise into the engine: a request whose corpus part cannot be computed gets none, an ERROR
line, and ``"error"`` in its response (see ``QRouteWorkerMeta``). Under ``kv_load_failure_policy`` "fail"
(vLLM's default) it is also failed through vLLM's KV-load-failure path: ``take_load_errors`` (the connector's
``get_block_ids_with_load_errors``) returns one of its already computed paged-cache blocks
(``RequestStep.computed_block``), in this step if it has one, else in each of its next steps (``failed``),
and vLLM's scheduler finishes it with FINISHED_ERROR. A request that fails on its first step (prefill) and
ends there (``max_tokens=1``) still returns normally, with ``"error"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qroute.connectors.vllm_meta import COUNTERS, QRouteStepMeta, QRouteWorkerMeta, RequestStep, map_rows
from qroute.core.config import QRouteConfig
from qroute.core.costmodel import Decision, load_fabric
from qroute.core.geometry import geometry_from_config, load_config
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.owner import OwnerService
from qroute.dataplane.owner_links import OwnerLinks
from qroute.dataplane.router import Router, RouterConfig, StepPlan
from qroute.dataplane.shard import CorpusShard, compat_for, shard_layout
from qroute.errors import ConfigError, QRouteError
from qroute.numerics.attention import AttentionParams, Part
from qroute.numerics.rope import PositionShift

logger = logging.getLogger("vllm.qroute")

STORE_DTYPE = torch.float32  # the resident corpus rows, whatever the model dtype
PEER_WAIT_FACTOR = 5  # a step waits at most this many timeout_s for owners that are not connected yet
# vLLM ropes DeepSeek with is_neox_style=False whatever the checkpoint's rope_interleave says.
INTERLEAVED = True

@dataclass
class RequestRun:
    """One request's corpus work for the current step (built in ``start_step``)."""

    step: RequestStep
    start: int  # first query row in the batch
    stop: int
    shift: PositionShift  # own positions -> shift + own positions
    plan: StepPlan | None = None  # None: nothing to attend to (or an error)
    store_rows: torch.Tensor | None = None  # shard rows of the first len(store_rows) query rows
    error: str | None = None


class QRouteWorkerSide:
    def __init__(self, config: QRouteConfig, directory: CorpusDirectory, model_dir: str, model_dtype: torch.dtype):
        self.config = config
        self.directory = directory
        hf_config = load_config(model_dir)
        self.params = AttentionParams.from_config(hf_config)
        self.geometry = geometry_from_config(hf_config, cache_dtype="float32", dtype="float32")
        self.fabric = load_fabric(config.fabric_name)
        self.secret = config.read_secret()
        self.table_dtype = model_dtype  # vLLM casts its cos/sin table to the model dtype
        self.width = self.geometry.latent_width
        self.shard: CorpusShard | None = None
        self.router: Router | None = None
        self.links: OwnerLinks | None = None
        self.layer_index: dict[str, int] = {}
        self._runs: dict[int, RequestRun] = {}  # first row -> run
        self._slot_mapping = torch.empty(0, dtype=torch.int64)
        self._stored_layers: dict[str, set[int]] = {}
        self._stored_chunks: set[int] = set()  # own chunks whose rows are in the store (all layers)
        self._report = QRouteWorkerMeta()
        self._load_errors: set[int] = set()  # blocks of failed requests, for get_block_ids_with_load_errors

    # -- once ---------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        self.layer_index = {name: extract_layer_index(name) for name in kv_caches}
        num_layers = self.geometry.num_layers
        if sorted(self.layer_index.values()) != list(range(num_layers)):
            raise ConfigError(f"qroute: expected KV caches for layers 0..{num_layers - 1}, got {sorted(kv_caches)}")
        for name, cache in kv_caches.items():
            if cache.shape[-1] != self.width or cache.shape[-2] != self.directory.block_size:
                raise ConfigError(f"qroute: KV cache {name} has shape {tuple(cache.shape)}; expected blocks of "
                                  f"{self.directory.block_size} rows of {self.width}")  # fmt: skip
        block_rows = shard_layout(self.directory, self.config.instance_id)
        num_rows = sum(count for _, count in block_rows.values())
        layers = [torch.zeros(num_rows, self.width, dtype=STORE_DTYPE) for _ in range(num_layers)]
        self.shard = CorpusShard(self.directory, self.config.instance_id, layers, block_rows)
        fingerprint = self.directory.model_fingerprint
        service = OwnerService({self.directory.name: self.shard}, self.params, instance_id=self.config.instance_id,
                               model_fingerprint=fingerprint, secret=self.secret)  # fmt: skip
        self.router = Router(
            RouterConfig(self.config.instance_id, self.config.mode, self.config.timeout_s,
                         cache_bytes=self.config.cache_bytes),
            self.directory, self.geometry, self.fabric, self.params, {}, local_shard=self.shard,
            row_dtype=STORE_DTYPE,
        )  # fmt: skip
        compat = compat_for(fingerprint, self.directory, self.width, STORE_DTYPE)
        self.links = OwnerLinks(self.config, service, self.directory, compat=compat, on_connect=self.router.add_peer)
        self.links.start()
        logger.info("qroute: corpus %r store: %d of %d tokens (%d chunks) x %d layers, %.1f MiB, instance %r",
                    self.directory.name, num_rows, self.directory.num_tokens,
                    len(self.directory.chunks_of(self.config.instance_id)), num_layers,
                    self.shard.nbytes / 2**20, self.config.instance_id)  # fmt: skip

    def close(self) -> None:
        if self.links is not None:
            self.links.close()

    # -- plan: once per step ------------------------------------------------------------------------

    def start_step(self, meta: QRouteStepMeta, slot_mapping: torch.Tensor, query_start_loc: torch.Tensor) -> None:
        """Plan this step: ``slot_mapping [T]`` and ``query_start_loc [num_reqs + 1]`` of the forward."""
        self._runs = {}
        self._slot_mapping = slot_mapping.to(device="cpu", dtype=torch.int64)
        if self.router is None or not meta.requests:
            return
        for start, stop, step in map_rows(self._slot_mapping.tolist(), query_start_loc.tolist(), meta.requests):
            self._runs[start] = self._plan(start, stop, step)

    def end_step(self) -> None:
        self._runs = {}

    def _plan(self, start: int, stop: int, step: RequestStep) -> RequestRun:
        d, inv_freq = self.directory, self.params.inv_freq
        own = torch.arange(step.first_pos, step.first_pos + stop - start)
        shift = PositionShift(own, own + step.position_shift, inv_freq, interleaved=INTERLEAVED,
                              table_dtype=self.table_dtype)  # fmt: skip
        run = RequestRun(step, start, stop, shift)
        if step.failed:  # failed in an earlier step (logged then): only report it, so that vLLM ends it
            run.error = "failed earlier"
            if step.computed_block is not None:
                self._load_errors.add(step.computed_block)
            return run
        if step.store_chunk is not None:
            chunk = d.chunk(step.store_chunk)
            positions = own[own < chunk.end - chunk.start] + chunk.start
            run.store_rows = self._shard_rows(positions)
        not_ready = [c.chunk_id for c in d.chunks_of(self.config.instance_id)
                     if c.start < step.visible_tokens and c.chunk_id not in self._stored_chunks]  # fmt: skip
        if not_ready:  # attending to an empty store would be silently wrong
            self._fail(run, f"corpus {d.name!r} is not ready on {self.config.instance_id!r}: its chunks "
                            f"{not_ready[:8]} are not prefilled (send prefill_chunk requests first)")  # fmt: skip
            return run
        if step.visible_tokens > 0:
            before = None if step.visible_tokens >= d.num_tokens else step.visible_tokens
            try:
                run.plan = self.router.plan(stop - start, before_token=before, mode=step.mode,
                                            owner_modes=dict(step.owner_modes))  # fmt: skip
            except QRouteError as exc:  # e.g. mode 'local' with remote blocks
                self._fail(run, str(exc))
                return run
            remote = [p.owners for p in run.plan.parts if p.decision is not Decision.LOCAL]
            for owner in {o for owners in remote for o in owners}:
                peer = self.router.peers.get(owner)
                if peer is not None and not peer.alive:  # failed recently: get a fresh connection
                    self.links.reconnect(owner)
            self.links.wait_for(remote, PEER_WAIT_FACTOR * self.config.timeout_s)  # the router falls back/fails
        return run

    def _shard_rows(self, positions: torch.Tensor) -> torch.Tensor:
        rows = self.shard.block_rows
        bs = self.directory.block_size
        return torch.tensor([rows[int(p) // bs][0] + int(p) % bs for p in positions], dtype=torch.int64)

    # -- run: once per layer ------------------------------------------------------------------------

    def attend_corpus(self, layer: int, start: int, q_nope: torch.Tensor, q_pe: torch.Tensor, own: Part) -> Part:
        """The request whose rows start at ``start``: its ``own`` part merged with its corpus parts,
        ``(out [n, H, R], lse [n, H])`` float32, natural log; ``own`` alone when it attends to no corpus this
        step (or its corpus attention failed: the request is then failed, see the module docstring).

        ``q_nope [n, H, R]`` absorbed, ``q_pe [n, H, P]`` roped by vLLM at the rows' own positions.
        """
        run = self._runs.get(start)
        if run is None or run.plan is None or not run.plan.parts or run.error is not None:
            return own
        before = self.router.stats.values(COUNTERS)
        try:
            return self.router.run(layer, q_nope, run.shift(q_pe), run.plan, own=own)
        except QRouteError as exc:
            self._fail(run, str(exc))
            return own
        finally:
            after = self.router.stats.values(COUNTERS)
            self._report.add(run.step.req_id, [a - b for a, b in zip(after, before, strict=True)])

    def save_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        """Copy corpus-prefill rows of this layer from the paged cache into the store (global RoPE)."""
        layer = self.layer_index.get(layer_name)
        if layer is None or self.shard is None:
            return
        for run in self._runs.values():
            if run.store_rows is None or run.error is not None:
                continue
            num = run.store_rows.shape[0]
            slots = self._slot_mapping[run.start : run.start + num]
            rows = kv_layer.reshape(-1, self.width).index_select(0, slots.to(kv_layer.device)).to("cpu", STORE_DTYPE)
            rank = self.params.kv_lora_rank
            rows[:, rank:] = run.shift.first(num)(rows[:, rank:])
            self.shard.layers[layer][run.store_rows] = rows
            self._note_stored(run, layer, num)

    def _note_stored(self, run: RequestRun, layer: int, num: int) -> None:
        step, d = run.step, self.directory
        done = self._stored_layers.setdefault(step.req_id, set())
        done.add(layer)
        chunk = d.chunk(step.store_chunk)
        if len(done) == self.geometry.num_layers and step.first_pos + num == chunk.end - chunk.start:
            del self._stored_layers[step.req_id]
            self._stored_chunks.add(step.store_chunk)
            self._report.stored[step.req_id] = step.store_chunk
            logger.info("qroute: stored chunk %d of %d (corpus %s)", step.store_chunk, len(d.chunks), d.name)
        elif len(done) == self.geometry.num_layers:
            del self._stored_layers[step.req_id]  # a partial step (chunked prefill): the rest comes later

    def _fail(self, run: RequestRun, error: str) -> None:
        run.error = error
        if run.step.req_id not in self._report.errors:
            logger.error("qroute: request %s gets no corpus attention: %s", run.step.req_id, error)
            self._report.errors[run.step.req_id] = error
        if run.step.computed_block is not None:  # else the scheduler sends it as `failed` in its next step
            self._load_errors.add(run.step.computed_block)

    def take_load_errors(self) -> set[int]:
        """Paged-cache blocks of requests failed this step (vLLM fails every running request owning one)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_report(self) -> QRouteWorkerMeta | None:
        report, self._report = self._report, QRouteWorkerMeta()
        return report if report else None
