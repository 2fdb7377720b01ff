"""The owner service: answers route and fetch requests for the corpus blocks this instance holds.

Transport-agnostic: a transport server calls ``on_hello`` once per connection and ``handle`` per
request, on its own thread. ``handle`` never raises: every failure becomes an ``ErrorReply`` with a
typed code, so one bad request never stops the service.

- route: ``partial_attention`` of the absorbed query rows over the requested blocks -> ``(out, lse)``
  (float32, natural log), after rotating ``q_pe`` by ``position_shift``;
- fetch: the blocks' latent rows, in the requested order.

Bounded: at most ``max_inflight`` requests are computed at once; more get ``overloaded`` at once
rather than queueing without bound. A request whose deadline passed before its turn gets ``deadline``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from qroute.core import wire
from qroute.core.corpus import CorpusDirectory
from qroute.dataplane.shard import CorpusShard, corpus_positions
from qroute.errors import HandshakeMismatch, QRouteError, WireError
from qroute.numerics.attention import partial_attention, rotate_query_rope


@dataclass(frozen=True)
class AttentionParams:
    """What an owner needs to know of the model to attend: softmax scale and RoPE."""

    scale: float
    kv_lora_rank: int
    inv_freq: torch.Tensor  # [rope_dim // 2] float32
    interleaved: bool

    @classmethod
    def from_config(cls, config: dict) -> AttentionParams:
        from qroute.numerics.rope import rope_inv_freq, rope_is_interleaved, softmax_scale

        return cls(
            softmax_scale(config), int(config["kv_lora_rank"]), rope_inv_freq(config), rope_is_interleaved(config)
        )


ROUTE_TIMES_KEPT = 8192  # recent routes whose handling time the stats keep


@dataclass
class OwnerStats:
    routes: int = 0
    fetches: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    # seconds ``handle`` spent on each recent route (decode, attention, encode): the owner's share of a round trip
    route_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=ROUTE_TIMES_KEPT))

    def summary(self) -> dict:
        """JSON-ready counters, with the median and p99 route handling time in microseconds."""
        times = sorted(self.route_seconds)
        return {
            "routes": self.routes, "fetches": self.fetches, "errors": dict(self.errors),
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "route_handle_us_median": statistics.median(times) * 1e6 if times else None,
            "route_handle_us_p99": times[min(len(times) - 1, int(0.99 * len(times)))] * 1e6 if times else None,
        }  # fmt: skip


def compat_for(model_fingerprint: str, directory: CorpusDirectory, width: int, dtype: torch.dtype) -> str:
    """What two instances must agree on before exchanging rows: model, latent width, block size, dtype."""
    return wire.compat_hash(model_fingerprint, width, directory.block_size, str(dtype).removeprefix("torch."))


def shard_compat_hash(shard: CorpusShard, model_fingerprint: str) -> str:
    return compat_for(model_fingerprint, shard.directory, shard.width, shard.layers[0].dtype)


class OwnerService:
    """Serves route and fetch requests for the corpora in ``shards`` (name -> shard)."""

    def __init__(
        self,
        shards: dict[str, CorpusShard],
        params: AttentionParams,
        *,
        instance_id: str,
        model_fingerprint: str,
        secret: bytes,
        max_inflight: int = 8,
    ):
        self.shards = shards
        self.params = params
        self.instance_id = instance_id
        self.model_fingerprint = model_fingerprint
        self.secret = secret
        self.stats = OwnerStats()
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._lock = threading.Lock()

    # -- handshake ----------------------------------------------------------------------------------

    def on_hello(self, payload: bytes) -> bytes:
        """Check a requester's ``Hello``; raise ``HandshakeMismatch`` naming what differs."""
        hello = wire.decode_hello(payload)
        shard = self.shards.get(hello.corpus_name)
        if shard is None:
            raise HandshakeMismatch(
                f"owner {self.instance_id!r} holds no corpus {hello.corpus_name!r}; it holds {sorted(self.shards)}"
            )
        wire.check_hello(
            hello,
            model_fingerprint=self.model_fingerprint,
            compat=shard_compat_hash(shard, self.model_fingerprint),
            corpus_name=shard.directory.name,
            corpus_version=shard.directory.version,
            secret=self.secret,
        )
        return wire.encode(wire.accept_hello(hello, instance_id=self.instance_id, secret=self.secret))

    # -- requests -----------------------------------------------------------------------------------

    def handle(self, payload: bytes) -> bytes:
        received = time.monotonic()
        start = time.perf_counter()
        request_id = 0
        if not self._slots.acquire(blocking=False):
            return self._error(0, wire.ErrorCode.OVERLOADED, f"owner {self.instance_id!r} is at its in-flight limit")
        try:
            msg = wire.decode(payload)
            request_id = getattr(msg, "request_id", 0)
            if isinstance(msg, wire.RouteRequest):
                reply = self._route(msg, received)
            elif isinstance(msg, wire.FetchRequest):
                reply = self._fetch(msg, received)
            else:
                return self._error(
                    request_id, wire.ErrorCode.BAD_REQUEST, f"an owner does not answer {type(msg).__name__}"
                )
            with self._lock:
                self.stats.bytes_in += len(payload)
                self.stats.bytes_out += len(reply)
                if isinstance(msg, wire.RouteRequest):
                    self.stats.route_seconds.append(time.perf_counter() - start)
            return reply
        except WireError as exc:
            return self._error(request_id, wire.ErrorCode.BAD_REQUEST, str(exc))
        except _Refused as exc:
            return self._error(request_id, exc.code, exc.message)
        except QRouteError as exc:
            return self._error(request_id, wire.ErrorCode.BAD_REQUEST, str(exc))
        except Exception as exc:  # noqa: BLE001 - the service must outlive any one request
            return self._error(request_id, wire.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            self._slots.release()

    def _shard_for(self, corpus: str, layer: int, block_ids: tuple[int, ...], received: float, timeout_us: int):
        if (time.monotonic() - received) * 1e6 > timeout_us:
            raise _Refused(wire.ErrorCode.DEADLINE, "deadline passed before the request was served")
        shard = self.shards.get(corpus)
        if shard is None:
            raise _Refused(wire.ErrorCode.UNKNOWN_CORPUS, f"owner {self.instance_id!r} holds no corpus {corpus!r}")
        if layer >= len(shard.layers):
            raise _Refused(wire.ErrorCode.BAD_REQUEST, f"layer {layer} is out of range [0, {len(shard.layers)})")
        if not shard.holds(block_ids):
            missing = [b for b in block_ids if b not in shard.block_rows][:8]
            raise _Refused(wire.ErrorCode.BAD_REQUEST, f"owner {self.instance_id!r} does not hold blocks {missing}")
        return shard

    def _route(self, req: wire.RouteRequest, received: float) -> bytes:
        shard = self._shard_for(req.corpus, req.layer, req.block_ids, received, req.timeout_us)
        q_nope, q_pe = wire.as_torch(req.q_nope), wire.as_torch(req.q_pe)
        p = self.params
        if q_nope.shape[-1] != p.kv_lora_rank or q_nope.shape[-1] + q_pe.shape[-1] != shard.width:
            raise _Refused(
                wire.ErrorCode.BAD_REQUEST,
                f"query rows {tuple(q_nope.shape)}+{tuple(q_pe.shape)} do not match latent width {shard.width}",
            )
        if req.position_shift:
            q_pe = rotate_query_rope(q_pe, req.position_shift, p.inv_freq, p.interleaved)
        slots = shard.slots(req.block_ids)
        masks = {}
        if req.q_positions is not None:
            masks = {
                "q_positions": wire.as_torch(req.q_positions).long(),
                "kv_positions": corpus_positions(shard.directory, req.block_ids),
            }
        out, lse = partial_attention(q_nope, q_pe, shard.layers[req.layer], slots, p.scale, p.kv_lora_rank, **masks)
        with self._lock:
            self.stats.routes += 1
        return wire.encode(wire.RouteReply(req.request_id, wire.to_wire(out), wire.to_wire(lse)))

    def _fetch(self, req: wire.FetchRequest, received: float) -> bytes:
        shard = self._shard_for(req.corpus, req.layer, req.block_ids, received, req.timeout_us)
        rows = shard.layers[req.layer].index_select(0, shard.slots(req.block_ids))
        with self._lock:
            self.stats.fetches += 1
        return wire.encode(wire.FetchReply(req.request_id, wire.to_wire(rows), req.block_ids))

    def _error(self, request_id: int, code: wire.ErrorCode, message: str) -> bytes:
        with self._lock:
            self.stats.errors[str(code)] = self.stats.errors.get(str(code), 0) + 1
        return wire.encode(wire.ErrorReply(request_id, code, message[:4000]))


class _Refused(Exception):
    def __init__(self, code: wire.ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
