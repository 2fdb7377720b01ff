"""The requester side: plan each step with the predicate, then per layer dispatch, fall back, merge.

``plan`` runs once per step on the host: it groups the selected corpus blocks by owner and picks
local, fetch or route for each owner (``costmodel``). ``run`` runs once per layer: it posts the
routes first, computes fetched and local parts while they are in flight, waits, and returns the
exact merge of all corpus parts and the caller's own part (one merge: "own + corpus" lives here).
``run_many`` runs several plans in one layer (requests that selected different blocks) with every route of every
plan posted first. The plan's types are in ``plan``.
Queries arrive roped at their corpus positions (the caller moves them: ``numerics.rope.PositionShift``).

Failures: each remote call has a deadline. A failed route tries the next replica, then a fetch from
any replica; a failed fetch tries the next replica. A route that timed out does not rule out a read
from the same owner where reads need no owner CPU (``SupportsOneSidedRead``: NIXL), so calls and reads
of a peer fail separately. When nothing answers, ``run`` raises ``QRouteError`` naming the blocks:
never a silently partial result.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from qroute.core import wire
from qroute.core.config import MODES, Mode, group_mode
from qroute.core.costmodel import Decision, FabricProfile, Workload, costs
from qroute.core.geometry import MLAGeometry
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.blockcache import BlockCache
from qroute.dataplane.decisionlog import PartTiming
from qroute.dataplane.peer import Peer, probe_fabric
from qroute.dataplane.plan import OwnerPart, RouterConfig, RunItem, StepPlan
from qroute.dataplane.shard import BlockRows, CorpusShard, block_tokens, byte_ranges, region_name, shard_layout
from qroute.errors import ConfigError, ErrorCode, QRouteError, RemoteError, TransportError, TransportTimeout
from qroute.metrics import ROUTER, Metrics
from qroute.numerics.attention import AttentionParams, Part, empty_part, merge, partial_attention
from qroute.numerics.rowformat import RowFormat

logger = logging.getLogger(__name__)

_DENSE_PLANS_KEPT = 64  # grouped block sets of dense plans kept (one per corpus prefix length in use)
MAX_REUSE = 64.0  # the most reuse the predicate credits a fetch with


class Router:
    """Attends query rows to a corpus sharded over owners, exactly."""

    def __init__(
        self,
        config: RouterConfig,
        directory: CorpusDirectory,
        geometry: MLAGeometry,
        fabric: FabricProfile,
        params: AttentionParams,
        connections: dict[str, object],
        *,
        local_shard: CorpusShard | None = None,
        row_format: RowFormat | None = None,
    ):
        self.config = config
        self.directory = directory
        self.geometry = geometry
        self.fabric = fabric
        self.params = params
        self.local_shard = local_shard
        # how owners store rows (what a READ returns): given, else the local shard's, else dense float32
        if row_format is None:
            rank = params.kv_lora_rank
            row_format = local_shard.format if local_shard else RowFormat("float32", rank, geometry.latent_width - rank)
        self.row_format = row_format
        self.width = geometry.latent_width
        self.row_bytes = row_format.row_bytes
        self.cache = BlockCache(config.cache_bytes) if config.cache_bytes else None
        self.peers: dict[str, Peer] = {}
        self.layouts: dict[str, BlockRows] = {}  # members' published store layouts (membership), else the placement's
        for name, conn in connections.items():
            if name != config.instance_id:
                self.add_peer(name, conn)
        self.stats = Metrics(ROUTER)
        self._request_ids = itertools.count(1)
        self._dense: dict[int, tuple[OwnerPart | None, dict[tuple[str, ...], tuple[int, ...]]]] = {}
        self.timings: list[PartTiming] | None = None  # a list: every remote part run appends its PartTiming
        self._tally: dict[str, int] | None = None  # the running item's (run_many)

    def add_peer(self, instance_id: str, connection, fabric: FabricProfile | None = None,
                 probed: FabricProfile | None = None, *, probe: bool = True) -> None:  # fmt: skip
        """Add (or replace) the connection to one owner. ``fabric``: the configured profile of the link's transport
        (default: the router's). ``probed``: it with the link's round trips measured (``fastest_link``); else, with
        ``probe``, they are measured now. The probed profile prices the owner's blocks from then on."""
        if instance_id == self.config.instance_id:
            raise ConfigError(f"instance {instance_id!r} is this router's own instance, not a peer")
        base = fabric or self.fabric
        if probed is None and probe:
            probed = probe_fabric(base, connection, region_name(self.directory.name, 0))
        layout = self.layouts.get(instance_id) or shard_layout(self.directory, instance_id)
        self.peers[instance_id] = Peer(instance_id, connection, layout, probed, base)

    def set_placement(self, directory: CorpusDirectory, layouts: dict[str, BlockRows]) -> None:
        """Membership changed: attend through ``directory``'s owners, reading each member's rows at ``layouts``."""
        self.directory, self.layouts = directory, dict(layouts)
        self._dense.clear()
        for name, peer in list(self.peers.items()):
            if name in layouts and layouts[name] != peer.block_rows:
                peer.block_rows, peer.all_ready = layouts[name], False

    def refresh_probes(self, max_age_s: float) -> None:
        """Measure again the round trips of the peer probed longest ago, if that is over ``max_age_s`` ago: one
        peer per call, so that a step pays for at most one probe."""
        now = time.monotonic()
        due = [p for p in self.peers.values() if p.fabric is not None and p.alive and now - p.probed_at > max_age_s]
        if due:
            peer = min(due, key=lambda p: p.probed_at)
            peer.probed(probe_fabric(peer.base_fabric, peer.connection, region_name(self.directory.name, 0)))

    # -- plan: once per step --------------------------------------------------------------------------

    def plan(
        self,
        num_rows: int,
        *,
        block_ids: Sequence[int] | None = None,
        before_token: int | None = None,
        mode: str | None = None,
        owner_modes: Mapping[str, str] | None = None,
    ) -> StepPlan:
        """Group the selected blocks (default: every block, i.e. dense; ``before_token`` keeps only
        blocks that end at or before that corpus position) by owner and decide each group: by ``mode``, or by
        ``owner_modes[owner]`` for a group one of whose owners it names (one plan may so route to some owners and
        fetch from others)."""
        mode = mode or self.config.mode
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r} is not one of {MODES}")
        if block_ids is None:
            last = self.directory.num_blocks if before_token is None else before_token // self.directory.block_size
            local, groups = self._dense_groups(last)
        else:
            local, groups = self._group(block_ids)
        parts = [local] if local is not None else []
        owner_modes = owner_modes or {}
        for owners, blocks in groups.items():
            decided_by = group_mode(owners, owner_modes, mode)
            decision, predicted_us, alternative_us = self._decide(decided_by, num_rows, owners, blocks)
            parts.append(OwnerPart(blocks, decision, owners, predicted_us=predicted_us, alternative_us=alternative_us))
        return StepPlan(corpus=self.directory.name, num_rows=num_rows, parts=tuple(parts))

    def _dense_groups(self, last: int) -> tuple[OwnerPart | None, dict[tuple[str, ...], tuple[int, ...]]]:
        """``_group`` of blocks ``[0, last)``, kept: every step of every dense request asks for one of a few."""
        grouped = self._dense.get(last)
        if grouped is None:
            if len(self._dense) >= _DENSE_PLANS_KEPT:
                self._dense.clear()
            grouped = self._dense[last] = self._group(range(last))
        return grouped

    def _group(self, block_ids: Sequence[int]) -> tuple[OwnerPart | None, dict[tuple[str, ...], tuple[int, ...]]]:
        """The local part (its rows prepared) and the other blocks by owner group."""
        groups: dict[tuple[str, ...], list[int]] = {}
        local: list[int] = []
        for block_id in block_ids:
            if self.local_shard is not None and block_id in self.local_shard.block_rows:
                local.append(block_id)
            else:
                groups.setdefault(self.directory.chunk_for_block(block_id).owners, []).append(block_id)
        part = OwnerPart(tuple(local), Decision.LOCAL, (), slots=self.local_shard.slots(local)) if local else None
        return part, {owners: tuple(blocks) for owners, blocks in groups.items()}

    def _decide(self, mode: str, num_rows: int, owners: tuple[str, ...], blocks: tuple[int, ...]
                ) -> tuple[Decision, float, float | None]:  # fmt: skip
        """The decision for one owner group's blocks, its predicted cost in microseconds (forced modes are
        priced only for the decision log: 0 without one) and, when the predicate chose, the rejected mode's."""
        if mode == Mode.LOCAL:
            raise ConfigError(
                f"mode 'local' needs every corpus block resident, but blocks {blocks[:4]}... live on {owners}; "
                "use mode 'auto', 'route' or 'fetch'"
            )
        forced = {Mode.ROUTE: Decision.ROUTE, Mode.FETCH: Decision.FETCH}.get(mode)
        if forced is not None and self.timings is None:
            return forced, 0.0, None
        num_tokens = sum(block_tokens(self.directory, b) for b in blocks)
        workload = Workload(
            batch=max(1, num_rows),
            heads=self.geometry.num_heads,
            tokens=num_tokens,
            reuse=self.observed_reuse(),
            block_size=self.directory.block_size,
        )
        c = costs(self.geometry, self.fabric_for(owners), workload)
        decision = forced or c.decision
        chosen, rejected = (c.route_us, c.fetch_us) if decision is Decision.ROUTE else (c.fetch_us, c.route_us)
        return decision, chosen, None if forced else rejected

    def fabric_for(self, owners: tuple[str, ...]) -> FabricProfile:
        """The fabric that prices a group's blocks: its first reachable owner's probed profile, else the
        configured one."""
        for owner in owners:
            peer = self.peers.get(owner)
            if peer is not None and peer.alive and peer.fabric is not None:
                return peer.fabric
        return self.fabric

    def observed_reuse(self) -> float:
        """How many times a fetched block is used, as the block cache sees it: 1 / (1 - hit rate) over its
        lookups so far (1 without a cache or before any lookup; at most ``MAX_REUSE``)."""
        if self.cache is None:
            return 1.0
        snapshot = self.cache.stats.snapshot()
        misses = snapshot["misses"]  # a miss is a fetch; every later hit of its blocks is one more use
        lookups = snapshot["hits"] + misses
        if lookups == 0:
            return 1.0
        return MAX_REUSE if misses == 0 else min(MAX_REUSE, lookups / misses)

    # -- run: once per layer ---------------------------------------------------------------------------

    def run(
        self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, plan: StepPlan, *, own: Part | None = None
    ) -> Part:
        """Attention of ``q_nope [T, H, kv_lora_rank]`` / ``q_pe [T, H, rope_dim]`` (roped at the rows' corpus
        positions) over the planned corpus blocks, merged with ``own`` (the rows' own part, if any).

        Returns ``(out [T, H, R], lse [T, H])`` float32, natural log; ``(0, -inf)`` when nothing is attended.
        """
        return self.run_many(layer, [RunItem(q_nope, q_pe, plan, own)])[0]

    def run_many(self, layer: int, items: Sequence[RunItem]) -> list[Part]:
        """``run`` of several sets of rows, each with its own plan (requests that selected different blocks), with
        every route of every item posted first: the round trips overlap, those to one owner arrive together (one
        batch there), and the local and fetched parts are computed while they fly. Each item's ``tally`` (if any)
        gets the operations and bytes run for it. A failure raises ``QRouteError`` for the whole call."""
        pending = []
        for k, item in enumerate(items):
            for part in item.plan.parts:
                if part.decision is Decision.ROUTE:
                    started = time.perf_counter()
                    call = self._post_route(layer, item.q_nope, item.q_pe, part, part.owners[0])
                    pending.append((k, part, call, time.perf_counter() - started))
        results: list[list[Part]] = [[] if item.own is None else [item.own] for item in items]
        for item, found in zip(items, results, strict=True):
            self._tally = item.tally
            for part in item.plan.parts:
                if part.decision is Decision.LOCAL:
                    found.append(self._local(layer, item.q_nope, item.q_pe, part))
                    self._count("local", owner=self.config.instance_id)
                elif part.decision is Decision.FETCH:
                    started, fallbacks = time.perf_counter(), self.stats["fallbacks"]
                    found.append(self._fetch_with_fallback(layer, item.q_nope, item.q_pe, part, part.owners))
                    self._timed(layer, part, item.plan.num_rows, time.perf_counter() - started, fallbacks)
        for k, part, call, posting in pending:
            item = items[k]
            self._tally = item.tally
            started, fallbacks = time.perf_counter(), self.stats["fallbacks"]
            results[k].append(self._wait_route(layer, item.q_nope, item.q_pe, part, call))
            self._timed(layer, part, item.plan.num_rows, posting + time.perf_counter() - started, fallbacks)
        self._tally = None
        return [self._merged(item, found) for item, found in zip(items, results, strict=True)]

    def _merged(self, item: RunItem, found: list[Part]) -> Part:
        if len(found) == 1:
            return found[0]
        rows, heads = item.q_nope.shape[:2]
        return merge(found) if found else empty_part(rows, heads, self.params.kv_lora_rank)

    def _count(self, name: str, n: int = 1, *, owner: str | None = None) -> None:
        """Count ``name`` in the router's stats (per ``owner`` too) and in the tally of the item being run."""
        self.stats.add(name, n, label=owner)
        if self._tally is not None:
            self._tally[name] = self._tally.get(name, 0) + n

    def _timed(self, layer: int, part: OwnerPart, rows: int, seconds: float, fallbacks: int) -> None:
        decision = part.decision.value
        fell_back = self.stats["fallbacks"] != fallbacks  # its time then measures the fallback, not the decision
        self.stats.observe("part_s", seconds, label=decision)
        if part.alternative_us is not None and not fell_back:  # the predicate chose: was the rejected mode faster?
            self.stats.add("predictions", label=decision)
            if seconds * 1e6 > part.alternative_us:
                self.stats.add("mispredictions", label=decision)
        if self.timings is not None:
            tokens = sum(block_tokens(self.directory, b) for b in part.block_ids)
            self.timings.append(PartTiming(layer, part.owners[0], part.decision.value, tokens, rows, seconds,
                                           fell_back, part.predicted_us))  # fmt: skip

    def _local(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, part: OwnerPart) -> Part:
        shard = self.local_shard
        return shard.format.attend(q_nope, q_pe, shard.layers[layer], part.slots, self.params.scale)

    def _attend_rows(self, q_nope: torch.Tensor, q_pe: torch.Tensor, rows: torch.Tensor) -> Part:
        return partial_attention(q_nope, q_pe, rows, range(rows.shape[0]), self.params.scale, self.params.kv_lora_rank)

    # route

    def _post_route(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, part: OwnerPart, owner: str):
        """Post a route request; returns (owner, pending call, payload size, start) or the exception."""
        peer = self.peers.get(owner)
        if peer is None or not peer.can_call:
            return owner, _Unreachable(f"owner {owner!r} is not connected or recently failed"), 0, 0.0
        payload = self.route_request(layer, q_nope, q_pe, part.block_ids)
        try:
            return owner, peer.connection.post(payload), len(payload), time.perf_counter()
        except TransportError as exc:
            return owner, exc, 0, 0.0

    def route_request(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, block_ids: tuple[int, ...]) -> bytes:
        """The encoded route request for ``block_ids`` of ``layer``."""
        request = wire.RouteRequest(
            request_id=next(self._request_ids),
            corpus=self.directory.name,
            layer=layer,
            q_nope=wire.to_wire(q_nope),
            q_pe=wire.to_wire(q_pe),
            block_ids=block_ids,
            timeout_us=int(self.config.timeout_s * 1e6),
        )
        return wire.encode(request)

    def _wait_route(self, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor, part: OwnerPart, call) -> Part:
        tried = []
        for owner in part.owners:
            if owner != call[0]:
                call = self._post_route(layer, q_nope, q_pe, part, owner)
            try:
                result = self._route_result(call)
                self._count("route", owner=owner)
                return result
            except (TransportError, RemoteError, ConnectionError, wire.WireError) as exc:
                self._failed(owner, exc, reading=False)
                tried.append(f"route to {owner!r}: {exc}")
                self._count("fallbacks", owner=owner)
        return self._fetch_with_fallback(layer, q_nope, q_pe, part, part.owners, tried)

    def _route_result(self, call) -> Part:
        owner, pending, sent, start = call
        if isinstance(pending, Exception):
            raise pending
        reply = wire.decode(pending.wait(self.config.timeout_s))
        if isinstance(reply, wire.ErrorReply):
            raise reply.as_exception()
        if not isinstance(reply, wire.RouteReply):
            raise wire.WireError(f"owner {owner!r} answered a route with {type(reply).__name__}")
        self.stats.observe("route_s", time.perf_counter() - start, label=self.peers[owner].base_fabric.name)
        self._count("bytes_moved", sent + len(reply.out.data) + len(reply.lse.data), owner=owner)
        return wire.as_torch(reply.out).float(), wire.as_torch(reply.lse)

    # fetch

    def _fetch_with_fallback(self, layer, q_nope, q_pe, part: OwnerPart, owners, tried=None) -> Part:
        tried = list(tried or [])
        if self.cache is not None:
            rows = self.cache.get(self.directory.name, layer, part.block_ids)
            if rows is not None:
                self._count("local", owner=part.owners[0])  # the owner's blocks, answered from the cache
                return self._attend_rows(q_nope, q_pe, rows)
        for owner in owners:
            try:
                rows = self.read_rows(layer, part.block_ids, owner, part=part)
            except (TransportError, ConnectionError, ConfigError, RemoteError) as exc:
                self._failed(owner, exc, reading=True)
                tried.append(f"fetch from {owner!r}: {exc}")
                self._count("fallbacks", owner=owner)
                continue
            self._count("fetch", owner=owner)
            if self.cache is not None:
                self._cache_blocks(layer, part.block_ids, rows)
            return self._attend_rows(q_nope, q_pe, rows)
        raise QRouteError(
            f"corpus {self.directory.name!r} layer {layer}: blocks {part.block_ids[:8]} are unavailable; "
            + "; ".join(tried)
        )

    def read_rows(self, layer: int, block_ids: tuple[int, ...], owner: str, *,
                  part: OwnerPart | None = None) -> torch.Tensor:
        """One-sided read of ``block_ids``' latent rows of ``layer`` from ``owner``: ``[num_tokens, width]``
        (dequantized where owners store FP8 rows; the ranges kept on ``part``, the plan's part of these blocks,
        when given)."""
        peer = self.peers.get(owner)
        if peer is None or not peer.can_read:
            raise _Unreachable(f"owner {owner!r} is not connected or recently failed")
        peer.check_ready(self.directory.name, block_ids, self.config.timeout_s)
        if part is not None:
            ranges = part.read_ranges(peer, self.row_bytes)
        else:
            ranges = byte_ranges(peer.block_rows, block_ids, self.row_bytes)
        total = sum(length for _, length in ranges)
        out = np.empty(total, dtype=np.uint8)
        start = time.perf_counter()
        peer.connection.read(region_name(self.directory.name, layer), ranges, out, self.config.timeout_s)
        self.stats.observe("fetch_s", time.perf_counter() - start, label=peer.base_fabric.name)
        self._count("bytes_moved", total, owner=owner)
        return self.row_format.decode(self.row_format.from_bytes(torch.from_numpy(out)))

    def _cache_blocks(self, layer: int, block_ids: tuple[int, ...], rows: torch.Tensor) -> None:
        sizes = [block_tokens(self.directory, b) for b in block_ids]
        self.cache.put(self.directory.name, layer, block_ids, list(rows.split(sizes)))

    def _failed(self, owner: str, exc: Exception, *, reading: bool) -> None:
        logger.warning("qroute: owner %r failed: %s", owner, exc)
        self.stats.error(owner, f"{owner}: {exc}")
        if isinstance(exc, TransportTimeout) or (isinstance(exc, RemoteError) and exc.code == ErrorCode.DEADLINE):
            self.stats.add("deadline_misses", label=owner)
        peer = self.peers.get(owner)
        # A refusal (bad request, unknown corpus) is not a dead peer, nor is one we skipped; a transport failure is.
        if peer is not None and not isinstance(exc, RemoteError | _Unreachable):
            peer.failed(exc, reading=reading)


class _Unreachable(ConnectionError):
    """A peer that is not connected or is backing off: skipped, not a new failure."""
