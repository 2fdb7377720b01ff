"""The owner service: answers route requests for the corpus blocks this instance holds.

Transport-agnostic: a transport server calls ``on_hello`` once per connection and ``handle`` per
request, on its own thread. ``handle`` never raises: every failure becomes an ``ErrorReply`` with a
typed code, so one bad request never stops the service.

- route: ``partial_attention`` of the absorbed query rows (roped at their corpus positions) over the
  requested blocks -> ``(out, lse)`` (float32, natural log).

Latent rows are not served here: requesters read them one-sidedly from the regions the transport
server exposes (``peering.serve_owner``).

Bounded: at most ``max_inflight`` requests are computed at once; more get ``overloaded`` at once
rather than queueing without bound. A request whose deadline passed before its turn gets ``deadline``.
"""

from __future__ import annotations

import threading
import time

from qroute.core import handshake, wire
from qroute.dataplane.shard import CorpusShard
from qroute.errors import ErrorCode, HandshakeMismatch, QRouteError, WireError
from qroute.metrics import OWNER, Metrics
from qroute.numerics.attention import AttentionParams, partial_attention


class OwnerService:
    """Serves route requests for the corpora in ``shards`` (name -> shard)."""

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
        self.stats = Metrics(OWNER)
        self._slots = threading.BoundedSemaphore(max_inflight)

    # -- handshake ----------------------------------------------------------------------------------

    def on_hello(self, payload: bytes) -> bytes:
        """Check a requester's ``Hello``; raise ``HandshakeMismatch`` naming what differs."""
        hello = wire.decode_hello(payload)
        shard = self.shards.get(hello.corpus_name)
        if shard is None:
            raise HandshakeMismatch(
                f"owner {self.instance_id!r} holds no corpus {hello.corpus_name!r}; it holds {sorted(self.shards)}"
            )
        handshake.check_hello(
            hello,
            model_fingerprint=self.model_fingerprint,
            compat=shard.compat_hash(self.model_fingerprint),
            corpus_name=shard.directory.name,
            corpus_version=shard.directory.version,
        )
        return wire.encode(handshake.accept_hello(self.instance_id))

    # -- requests -----------------------------------------------------------------------------------

    def handle(self, payload: bytes) -> bytes:
        received = time.monotonic()
        start = time.perf_counter()
        request_id = 0
        if not self._slots.acquire(blocking=False):
            return self._error(0, ErrorCode.OVERLOADED, f"owner {self.instance_id!r} is at its in-flight limit")
        try:
            msg = wire.decode(payload)
            request_id = getattr(msg, "request_id", 0)
            if not isinstance(msg, wire.RouteRequest):
                return self._error(request_id, ErrorCode.BAD_REQUEST, f"an owner does not answer {type(msg).__name__}")
            reply = self._route(msg, received)
            self.stats.add_many({"routes": 1, "bytes_in": len(payload), "bytes_out": len(reply)})
            self.stats.observe("route_handle_s", time.perf_counter() - start)
            return reply
        except WireError as exc:
            return self._error(request_id, ErrorCode.BAD_REQUEST, str(exc))
        except _Refused as exc:
            return self._error(request_id, exc.code, exc.message)
        except QRouteError as exc:
            return self._error(request_id, ErrorCode.BAD_REQUEST, str(exc))
        except Exception as exc:  # noqa: BLE001 - the service must outlive any one request
            return self._error(request_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            self._slots.release()

    def _shard_for(self, corpus: str, layer: int, block_ids: tuple[int, ...], received: float, timeout_us: int):
        if (time.monotonic() - received) * 1e6 > timeout_us:
            raise _Refused(ErrorCode.DEADLINE, "deadline passed before the request was served")
        shard = self.shards.get(corpus)
        if shard is None:
            raise _Refused(ErrorCode.UNKNOWN_CORPUS, f"owner {self.instance_id!r} holds no corpus {corpus!r}")
        if layer >= len(shard.layers):
            raise _Refused(ErrorCode.BAD_REQUEST, f"layer {layer} is out of range [0, {len(shard.layers)})")
        if not shard.holds(block_ids):
            missing = [b for b in block_ids if b not in shard.block_rows][:8]
            raise _Refused(ErrorCode.BAD_REQUEST, f"owner {self.instance_id!r} does not hold blocks {missing}")
        return shard

    def _route(self, req: wire.RouteRequest, received: float) -> bytes:
        shard = self._shard_for(req.corpus, req.layer, req.block_ids, received, req.timeout_us)
        q_nope, q_pe = wire.as_torch(req.q_nope), wire.as_torch(req.q_pe)
        p = self.params
        if q_nope.shape[-1] != p.kv_lora_rank or q_nope.shape[-1] + q_pe.shape[-1] != shard.width:
            raise _Refused(
                ErrorCode.BAD_REQUEST,
                f"query rows {tuple(q_nope.shape)}+{tuple(q_pe.shape)} do not match latent width {shard.width}",
            )
        slots = shard.slots(req.block_ids)
        out, lse = partial_attention(q_nope, q_pe, shard.layers[req.layer], slots, p.scale, p.kv_lora_rank)
        return wire.encode(wire.RouteReply(req.request_id, wire.to_wire(out), wire.to_wire(lse)))

    def _error(self, request_id: int, code: ErrorCode, message: str) -> bytes:
        self.stats.error(str(code))
        return wire.encode(wire.ErrorReply(request_id, code, message[:4000]))


class _Refused(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
