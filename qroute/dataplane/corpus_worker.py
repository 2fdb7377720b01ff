"""An instance's corpus attention, engine-free: what runs next to the model and its KV cache, whatever engine
holds them (vLLM's connector worker side, ``qroute.connectors.vllm_worker``; SGLang's backend,
``qroute.plugin.sglang_corpus``). The engine adapter says where each request's rows are; this does the rest.

- ``open_store`` (once): allocates this instance's resident corpus store (in the cache dtype, ``[rows this
  instance holds, kv_lora_rank + rope_dim]`` per layer, ``shard_layout`` order), starts the owner service on the
  configured address and the peer connections (``OwnerLinks``), and the ``Router``.
- ``plan_step`` (plan, once per step): given each request's rows and ``RequestStep``, groups the requests that
  attend to the same blocks under the same modes (``StepGroup``), plans each group's corpus parts once with the
  router (predicate, mode, over all its rows) and stacks its members' ``PositionShift`` (own position ``i`` ->
  ``shift + i``).
- ``attend_step`` (run, once per layer for the whole step, from the attention backend): per group, moves
  ``q_pe`` and merges the router's corpus parts into the rows' own parts: one message per owner carries every
  row of the group, and the owner answers them with one attention.
- ``store_layer`` (once per layer, after the layer's KV write): a corpus-prefill request's latent rows go into
  the store at its chunk's rows, ``k_pe`` moved from local position ``i`` to ``chunk.start + i``.

Failures never raise into the engine: a request whose corpus part cannot be computed gets none, an ERROR line,
and an entry in the step's report (``take_report``) and, where it has a computed block (``RequestStep``), in
``take_load_errors``: the adapter ends it through its engine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from qroute.core.config import QRouteConfig, Selection
from qroute.core.costmodel import Decision, load_fabric
from qroute.core.geometry import geometry_from_config, load_config
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.decisionlog import DecisionLog
from qroute.dataplane.membership import Membership, headroom_rows
from qroute.dataplane.owner import OwnerService
from qroute.dataplane.owner_links import OwnerLinks
from qroute.dataplane.plan import RunItem
from qroute.dataplane.router import Router, RouterConfig
from qroute.dataplane.selection import BlockSummaries, choose_blocks, read_peer_summaries, summarise_shard
from qroute.dataplane.shard import CorpusShard, chunk_blocks, compat_for, shard_layout
from qroute.dataplane.step import COUNTERS, RequestRun, RequestStep, StepGroup, StepReport, batch_rows
from qroute.dataplane.worker_membership import WorkerMembership
from qroute.errors import ConfigError, QRouteError
from qroute.numerics.attention import AttentionParams, Part
from qroute.numerics.rope import PositionShift
from qroute.numerics.rowformat import row_format

__all__ = ["STORE_DTYPES", "CorpusWorker"]

_ROUTER_COUNTERS = COUNTERS[:4]  # route, fetch, local, bytes_moved: the router's own counters
STORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the resident rows are the paged cache's dtype
PEER_WAIT_FACTOR = 5  # a step waits at most this many timeout_s for owners that are not connected yet
PROBE_REFRESH_S = 30.0  # each peer's round trips are measured again this often (one peer per step at most)


class CorpusWorker:
    """``interleaved``: how the engine ropes DeepSeek's ``q_pe`` / ``k_pe`` (vLLM: always interleaved, whatever the
    checkpoint's ``rope_interleave`` says; SGLang: as it says). ``log``: the engine's logger, so that qroute's lines
    land in its log."""

    report_class: type[StepReport] = StepReport

    def __init__(self, config: QRouteConfig, directory: CorpusDirectory, model_dir: str, model_dtype: torch.dtype,
                 membership: Membership | None = None, *, log: logging.Logger, interleaved: bool = True):  # fmt: skip
        self.config = config
        self.directory = directory  # the routing placement (membership may change it between steps)
        self.log = log
        self.interleaved = interleaved
        self.rope_layout = "interleaved" if interleaved else "neox"  # peers must store rows the same way
        self._membership = membership
        self.membership: WorkerMembership | None = None
        hf_config = load_config(model_dir)
        self.params = AttentionParams.from_config(hf_config)
        if model_dtype not in STORE_DTYPES:
            raise ConfigError(f"qroute: model dtype {model_dtype} is not supported; the corpus store holds "
                              f"rows in the cache dtype, one of {[str(d) for d in STORE_DTYPES]}")  # fmt: skip
        # The store holds rows as the engine's paged cache does (the model dtype), so that its memory, and the
        # bytes a fetch moves, are the stock cache's.
        self.store_dtype = model_dtype
        dtype_name = str(model_dtype).removeprefix("torch.")
        self.geometry = geometry_from_config(hf_config, cache_dtype=dtype_name, dtype=dtype_name)
        self.fabric = load_fabric(config.fabric_name())
        self.secret = config.read_secret()
        self.table_dtype = model_dtype  # the engines cast their cos/sin table to the model dtype
        self.width = self.geometry.latent_width
        self.shard: CorpusShard | None = None
        self.service: OwnerService | None = None
        self.router: Router | None = None
        self.links: OwnerLinks | None = None
        self.summaries: list[BlockSummaries] | None = None  # per layer, every corpus block (selector "summary")
        self.decisions: DecisionLog | None = None  # QROUTE_DECISION_LOG: every remote part's decision and time
        self._runs: dict[int, RequestRun] = {}  # first row -> run
        self._groups: list[StepGroup] = []
        self._slot_mapping = torch.empty(0, dtype=torch.int64)
        self._stored_layers: dict[str, set[int]] = {}
        self._stored_chunks: set[int] = set()  # own chunks whose rows are in the store (all layers)
        self._report = self.report_class()
        self._load_errors: set[int] = set()  # blocks of failed requests, for the engine's failure path

    # -- once ---------------------------------------------------------------------------------------

    def open_store(self) -> None:
        """Allocate the store, start the owner service, the peer links and the router (membership, if any)."""
        num_layers = self.geometry.num_layers
        block_rows = shard_layout(self.directory, self.config.instance_id)
        num_rows = sum(count for _, count in block_rows.values())
        # with membership, room for what one member's leave moves here: a registered store never moves
        room = num_rows + (headroom_rows(self.directory, self.config.instance_id) if self._membership else 0)
        layers = [torch.zeros(room, self.width, dtype=self.store_dtype) for _ in range(num_layers)]
        fmt = row_format(self.store_dtype, self.params.kv_lora_rank, self.width - self.params.kv_lora_rank)
        if self.config.selector == "summary":  # every block's key bounds, for selection (its own and its peers')
            self.summaries = [BlockSummaries(self.directory.num_blocks, self.width) for _ in range(num_layers)]
        # the store starts empty: no block is served until its chunk's prefill has stored every layer
        self.shard = CorpusShard(self.directory, self.config.instance_id, layers, block_rows, fmt,
                                 summaries=[s.table for s in self.summaries] if self.summaries else None,
                                 ready=torch.zeros(self.directory.num_blocks, dtype=torch.uint8),
                                 rope=self.rope_layout)  # fmt: skip
        fingerprint = self.directory.model_fingerprint
        self.service = OwnerService({self.directory.name: self.shard}, self.params,
                                    instance_id=self.config.instance_id, model_fingerprint=fingerprint,
                                    secret=self.secret)  # fmt: skip
        self.router = Router(
            RouterConfig(self.config.instance_id, self.config.mode, self.config.timeout_s,
                         cache_bytes=self.config.cache_bytes),
            self.directory, self.geometry, self.fabric, self.params, {}, local_shard=self.shard,
            row_format=fmt,
        )  # fmt: skip
        self.decisions = DecisionLog.from_env(self.config.instance_id)
        if self.decisions is not None:
            self.router.timings = []
        compat = compat_for(fingerprint, self.directory, self.width, fmt.name, self.rope_layout)
        self.links = OwnerLinks(self.config, self.service, self.directory, compat=compat,
                                on_connect=self.router.add_peer)  # fmt: skip
        self.links.start()
        if self._membership is not None:
            self.membership = WorkerMembership(self._membership, log=self.log)
            self.membership.start(self.config, self.shard, self.directory, self.links, self.chunk_stored)
        self.log.info("qroute: corpus %r store: %d of %d tokens (%d chunks) x %d layers, %.1f MiB, instance %r",
                      self.directory.name, num_rows, self.directory.num_tokens,
                      len(self.directory.chunks_of(self.config.instance_id)), num_layers,
                      self.shard.nbytes / 2**20, self.config.instance_id)  # fmt: skip

    def close(self) -> None:
        if self.membership is not None:
            self.membership.close()
        if self.links is not None:
            self.links.close()
        if self.decisions is not None:
            self.decisions.close()

    # -- plan: once per step ------------------------------------------------------------------------

    def plan_step(self, placed: Iterable[tuple[int, int, RequestStep]], slot_mapping: torch.Tensor) -> None:
        """Plan this step: ``placed`` is ``(first row, end row, step)`` of every request that has corpus work,
        ``slot_mapping [T]`` the cache slot of every query row of the forward (where its latent row is written)."""
        self._runs, self._groups = {}, []
        self._slot_mapping = slot_mapping.to(device="cpu", dtype=torch.int64)
        placement = self.membership.take_placement() if self.membership is not None else None
        if placement is not None:  # membership changed: this step plans over the new owners
            self.directory = placement[0]
            self.router.set_placement(*placement)
        placed = list(placed)
        if self.router is None or not placed:
            return
        self.router.refresh_probes(PROBE_REFRESH_S)
        attending: dict[tuple, list[RequestRun]] = {}
        for start, stop, step in placed:
            run = self._runs[start] = self._request_run(start, stop, step)
            if run.error is None and run.attends is not None:
                attending.setdefault(run.attends, []).append(run)
        for attends, runs in attending.items():
            group = self._plan_group(attends, runs)
            if group is not None:
                self._groups.append(group)

    def end_step(self) -> None:
        self._runs, self._groups = {}, []
        if self.decisions is not None:
            self.decisions.flush()

    def _request_run(self, start: int, stop: int, step: RequestStep) -> RequestRun:
        d, inv_freq = self.directory, self.params.inv_freq
        own = torch.arange(step.first_pos, step.first_pos + stop - start)
        shift = PositionShift(own, own + step.position_shift, inv_freq, interleaved=self.interleaved,
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
        elif step.visible_tokens > 0:
            before = None if step.visible_tokens >= d.num_tokens else step.visible_tokens
            run.attends = (before, step.mode, step.owner_modes, step.selection)
        return run

    def _plan_group(self, attends: tuple, runs: list[RequestRun]) -> StepGroup | None:
        """Decide once for every row of ``runs`` (the predicate sees them all) and wait for the owners it needs."""
        before, mode, owner_modes, selection = attends
        num_rows = sum(run.stop - run.start for run in runs)
        try:
            plan = self.router.plan(num_rows, before_token=before, mode=mode, owner_modes=dict(owner_modes))
        except QRouteError as exc:  # e.g. mode 'local' with remote blocks
            for run in runs:
                self._fail(run, str(exc))
            return None
        if not plan.parts:
            return None
        remote = [p.owners for p in plan.parts if p.decision is not Decision.LOCAL]
        for owner in {o for owners in remote for o in owners}:
            peer = self.router.peers.get(owner)
            if peer is not None and peer.link_broken:  # a fresh connection (a busy owner's link stays for reads)
                self.links.reconnect(owner)
        self.links.wait_for(remote, PEER_WAIT_FACTOR * self.config.timeout_s)  # the router falls back/fails
        visible = sum(len(p.block_ids) for p in plan.parts)
        error = None if selection.dense else self._prepare_selection(selection, visible)
        if error is not None:
            for run in runs:
                self._fail(run, error)
            return None
        shift = runs[0].shift if len(runs) == 1 else PositionShift.cat([run.shift for run in runs])
        return StepGroup(runs, batch_rows(runs), num_rows, shift, plan, selection, mode, owner_modes, visible)

    def _prepare_selection(self, selection: Selection, visible: int) -> str | None:
        """Make ``selection`` ready to run: the summaries of the first ``visible`` blocks must all be known (this
        instance's from its store; the others', where missing, are read from their owners now). Returns why it
        cannot run, or None."""
        if selection.selector == "indexer":
            return ("selector 'indexer' needs DeepSeek-V3.2's DSA indexer output, which vLLM's CPU platform does not "
                    "produce; use 'summary' or 'dense'")
        if self.summaries is None:
            return (f"instance {self.config.instance_id!r} keeps no block summaries: start it with selector "
                    "'summary' in kv_connector_extra_config to serve summary-selecting requests")
        missing = (~self.summaries[0].ready[:visible]).nonzero().flatten().tolist()
        if missing:
            read_peer_summaries(self.summaries, self.router.peers, self.directory, missing, self.config.timeout_s)
            missing = (~self.summaries[0].ready[:visible]).nonzero().flatten().tolist()
        if missing:
            return (f"corpus {self.directory.name!r}: the summaries of blocks {missing[:8]} are not known yet (their "
                    "owners have not stored them): selection would be wrong")
        return None

    def _shard_rows(self, positions: torch.Tensor) -> torch.Tensor:
        rows = self.shard.block_rows
        bs = self.directory.block_size
        return torch.tensor([rows[int(p) // bs][0] + int(p) % bs for p in positions], dtype=torch.int64)

    # -- run: once per layer ------------------------------------------------------------------------

    def attend_step(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, own: Part) -> Part:
        """Every row's ``own`` part merged with its corpus part, ``(out [T, H, R], lse [T, H])`` float32, natural
        log (``own``'s tensors, updated in place): one router run per group of requests that attend to the same
        blocks (``StepGroup``). Rows that attend to no corpus this step, or whose corpus attention failed (the
        request is then failed, see the module docstring), keep their own part.

        ``q_nope [T, H, R]`` absorbed, ``q_pe [T, H, P]`` roped by vLLM at the rows' own positions.
        """
        out, lse = own
        for group in self._groups:
            if group.error is not None:
                continue
            if not group.selection.dense:
                self._attend_selected(layer, group, q_nope, q_pe, out, lse)
                continue
            rows = group.rows
            item = RunItem(q_nope[rows], group.shift(q_pe[rows]), group.plan, (out[rows], lse[rows]), tally={})
            try:
                [part] = self.router.run_many(layer, [item])
            except QRouteError as exc:
                group.error = str(exc)
                for run in group.runs:
                    self._fail(run, group.error)
                continue
            finally:
                self._count(group.runs, group.num_rows, item.tally, group)
            out[rows], lse[rows] = part
        return out, lse

    def _attend_selected(self, layer: int, group: StepGroup, q_nope: torch.Tensor, q_pe: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor) -> None:
        """A selecting group: each member picks its blocks of this layer from its own queries; the members that
        picked the same blocks share one plan (one message per owner), and every plan of the group runs at once
        (``Router.run_many``: all routes posted first, so that those to one owner overlap)."""
        q_pe_moved = group.shift(q_pe[group.rows])  # the group's rows, in member order, at corpus positions
        by_blocks: dict[tuple[int, ...], list[tuple[RequestRun, slice]]] = {}
        offset = 0
        for run in group.runs:
            mine = slice(offset, offset + run.stop - run.start)
            offset = mine.stop
            chosen = choose_blocks(self.summaries[layer], q_nope[run.start:run.stop], q_pe_moved[mine],
                                   group.visible_blocks, group.selection)  # fmt: skip
            by_blocks.setdefault(chosen, []).append((run, mine))
        subgroups = []  # (runs, their rows of the batch, their RunItem)
        try:
            for block_ids, members in by_blocks.items():
                runs = [run for run, _ in members]
                rows = torch.cat([torch.arange(run.start, run.stop) for run in runs])
                local_rows = torch.cat([torch.arange(m.start, m.stop) for _, m in members])
                plan = self.router.plan(len(rows), block_ids=block_ids, mode=group.mode,
                                        owner_modes=dict(group.owner_modes))  # fmt: skip
                item = RunItem(q_nope[rows], q_pe_moved[local_rows], plan, (out[rows], lse[rows]), tally={})
                subgroups.append((runs, rows, item))
            parts = self.router.run_many(layer, [item for _, _, item in subgroups])
        except QRouteError as exc:
            group.error = str(exc)  # the group skips its later layers: every member is failed
            for run in group.runs:
                self._fail(run, group.error)
            return
        finally:
            for runs, rows, item in subgroups:
                self._count(runs, len(rows), item.tally, group)
        for (_, rows, _), part in zip(subgroups, parts, strict=True):
            out[rows], lse[rows] = part

    def _count(self, runs: list[RequestRun], num_rows: int, tally: dict[str, int], group: StepGroup) -> None:
        """Each member's share of operations run for ``runs`` together: every operation is also its own (its rows
        were in it); bytes are split by rows; ``shared`` counts the operations it shared with other requests. The
        run's part timings go to the decision log, if one is kept."""
        if self.decisions is not None:
            self.decisions.write(self.router.timings, mode=group.mode, selector=group.selection.selector,
                                 topk=group.selection.topk)  # fmt: skip
        route, fetch, local, moved = (tally.get(name, 0) for name in _ROUTER_COUNTERS)
        shared = route + fetch + local if len(runs) > 1 else 0
        done = 0  # rows counted so far: the shares are differences of a running split, so they add up to `moved`
        for run in runs:
            share = moved * (done + run.stop - run.start) // num_rows - moved * done // num_rows
            done += run.stop - run.start
            self._report.add(run.step.req_id, [route, fetch, local, share, shared])

    def store_layer(self, layer: int, kv_rows: torch.Tensor) -> None:
        """Copy this layer's corpus-prefill rows into the store (global RoPE): ``kv_rows [num_slots, width]``, the
        layer's cache as rows, indexed by the step's slot mapping (after the engine wrote this step's rows)."""
        if self.shard is None:
            return
        for run in self._runs.values():
            if run.store_rows is None or run.error is not None:
                continue
            num = run.store_rows.shape[0]
            slots = self._slot_mapping[run.start : run.start + num]
            rows = kv_rows.index_select(0, slots.to(kv_rows.device)).to("cpu")
            rank = self.params.kv_lora_rank
            rows[:, rank:] = run.shift.first(num)(rows[:, rank:])  # rotated in float32, stored in the cache dtype
            self.shard.layers[layer][run.store_rows] = rows
            self._note_stored(run, layer, num)

    def _note_stored(self, run: RequestRun, layer: int, num: int) -> None:
        step, d = run.step, self.directory
        done = self._stored_layers.setdefault(step.req_id, set())
        done.add(layer)
        chunk = d.chunk(step.store_chunk)
        if len(done) == self.geometry.num_layers and step.first_pos + num == chunk.end - chunk.start:
            del self._stored_layers[step.req_id]
            self.chunk_stored(chunk)
            self._report.stored[step.req_id] = step.store_chunk
            self.log.info("qroute: stored chunk %d of %d (corpus %s)", step.store_chunk, len(d.chunks), d.name)
        elif len(done) == self.geometry.num_layers:
            del self._stored_layers[step.req_id]  # a partial step (chunked prefill): the rest comes later

    def chunk_stored(self, chunk) -> None:
        """A chunk's rows are in the store, every layer: summarise its blocks (selector "summary") and serve them."""
        blocks = chunk_blocks(self.directory, chunk)
        if self.summaries is not None:
            summarise_shard(self.summaries, self.shard, blocks)
        self.shard.mark_ready(blocks)
        self._stored_chunks.add(chunk.chunk_id)

    def _fail(self, run: RequestRun, error: str) -> None:
        run.error = error
        if run.step.req_id not in self._report.errors:
            self.log.error("qroute: request %s gets no corpus attention: %s", run.step.req_id, error)
            self._report.errors[run.step.req_id] = error
        if run.step.computed_block is not None:  # else the scheduler sends it as `failed` in its next step
            self._load_errors.add(run.step.computed_block)

    def take_load_errors(self) -> set[int]:
        """Paged-cache blocks of requests failed this step (``RequestStep.computed_block``; vLLM fails every running
        request owning one)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_report(self) -> StepReport | None:
        report, self._report = self._report, self.report_class()
        return report if report else None
