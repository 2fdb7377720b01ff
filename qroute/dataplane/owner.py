"""The owner service: answers route requests for the corpus blocks this instance holds.

Transport-agnostic: a transport server calls ``on_hello`` once per connection and ``handle`` per
request, on its own thread. ``handle`` never raises: every failure becomes an ``ErrorReply`` with a
typed code, so one bad request never stops the service.

- route: ``partial_attention`` of the absorbed query rows (roped at their corpus positions) over the
  requested blocks (read in the shard's ``RowFormat``: FP8 rows are dequantized) -> ``(out, lse)`` (float32,
  natural log).

Latent rows are not served here: requesters read them one-sidedly from the regions the transport
server exposes (``peering.serve_owner``).

Bounded: at most ``max_inflight`` calls (or batches of calls, ``handle_batch``) are computed at once; more get
``overloaded`` at once rather than queueing without bound. A request whose deadline passed before its turn gets
``deadline``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from qroute.core import handshake, wire
from qroute.dataplane.shard import CorpusShard
from qroute.errors import ErrorCode, HandshakeMismatch, QRouteError, WireError
from qroute.metrics import OWNER, Metrics
from qroute.numerics.attention import AttentionParams


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
            compat=shard.compat_key(self.model_fingerprint),
            corpus_name=shard.directory.name,
            corpus_version=shard.directory.version,
        )
        return wire.encode(handshake.accept_hello(self.instance_id))

    # -- requests -----------------------------------------------------------------------------------

    def handle(self, payload: bytes) -> bytes:
        """Answer one call (a transport's handler): the reply bytes, an ``ErrorReply`` on any failure."""
        return self.handle_batch([payload])[0]

    def handle_batch(self, payloads: Sequence[bytes | memoryview]) -> list[bytes]:
        """Answer calls that arrived together, one reply each, in order. Routes for the same corpus, layer and
        blocks are answered by one attention over all their query rows (one pass over the corpus rows for every
        requester instead of one each); each row's result is the one ``handle`` alone gives. The batch takes one
        in-flight slot."""
        received = time.monotonic()
        start = time.perf_counter()
        if not payloads:
            return []
        if not self._slots.acquire(blocking=False):
            message = f"owner {self.instance_id!r} is at its in-flight limit"
            return [self._error(_request_id(p), ErrorCode.OVERLOADED, message) for p in payloads]
        try:
            replies: list[bytes | None] = [None] * len(payloads)
            groups: dict[tuple, list[tuple[int, wire.RouteRequest]]] = {}
            held: set[tuple[str, tuple[int, ...]]] = set()  # (corpus, blocks) checked once per batch, not per call
            for i, payload in enumerate(payloads):
                try:
                    req = self._check(payload, received, held)
                except _Refused as exc:
                    replies[i] = self._error(exc.request_id, exc.code, exc.message)
                    continue
                # rows stack only where every dimension but the first agrees
                key = (req.corpus, req.layer, req.block_ids, req.q_nope.dtype, req.q_pe.dtype,
                       tuple(req.q_nope.shape[1:]), tuple(req.q_pe.shape[1:]))
                groups.setdefault(key, []).append((i, req))
            for members in groups.values():
                try:
                    answered = self._route_group(members)
                except Exception as exc:  # noqa: BLE001 - every member gets the error, the service keeps serving
                    message = f"{type(exc).__name__}: {exc}"
                    for i, req in members:
                        replies[i] = self._error(req.request_id, ErrorCode.INTERNAL, message)
                    continue
                for i, reply in answered:
                    replies[i] = reply
                self.stats.observe("batch_size", len(members))
                self.stats.add_many({"routes": len(members), "route_batches": 1,
                                     "bytes_in": sum(len(payloads[i]) for i, _ in members),
                                     "bytes_out": sum(len(reply) for _, reply in answered)})  # fmt: skip
            self.stats.observe("route_handle_s", (time.perf_counter() - start) / len(payloads))
            self.stats.observe("queue_depth", len(payloads))
            return replies  # type: ignore[return-value]  # every slot is filled above
        finally:
            self._slots.release()

    def _check(self, payload: bytes, received: float, held: set[tuple[str, tuple[int, ...]]]) -> wire.RouteRequest:
        """The decoded, validated route request; raises ``_Refused`` with the code to answer."""
        request_id = 0
        try:
            msg = wire.decode(payload)
            request_id = getattr(msg, "request_id", 0)
            if not isinstance(msg, wire.RouteRequest):
                raise _Refused(ErrorCode.BAD_REQUEST, f"an owner does not answer {type(msg).__name__}")
            shard = self._shard_for(msg.corpus, msg.layer, msg.block_ids, received, msg.timeout_us, held)
            nope, pe = msg.q_nope.shape, msg.q_pe.shape
            if len(nope) != 3 or len(pe) != 3 or nope[:2] != pe[:2] or nope[-1] != self.params.kv_lora_rank \
                    or nope[-1] + pe[-1] != shard.width:
                raise _Refused(ErrorCode.BAD_REQUEST,
                               f"query rows {tuple(nope)}+{tuple(pe)} do not match latent width {shard.width}")
            return msg
        except _Refused as exc:
            exc.request_id = request_id
            raise
        except (WireError, QRouteError) as exc:
            raise _Refused(ErrorCode.BAD_REQUEST, str(exc), request_id) from None
        except Exception as exc:  # noqa: BLE001 - the service must outlive any one request
            raise _Refused(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", request_id) from None

    def _route_group(self, members: list[tuple[int, wire.RouteRequest]]) -> list[tuple[int, bytes]]:
        """One attention over the stacked query rows of routes with the same corpus, layer and blocks."""
        first = members[0][1]
        shard = self.shards[first.corpus]
        # every member's q_nope | q_pe in one buffer, one copy from the wire: the attention takes it as it is
        joined = wire.as_torch_joined([(req.q_nope, req.q_pe) for _, req in members])
        rank = self.params.kv_lora_rank
        out, lse = shard.format.attend(joined[..., :rank], joined[..., rank:], shard.layers[first.layer],
                                       shard.slots(first.block_ids), self.params.scale)  # fmt: skip
        out, lse = out.numpy(), lse.numpy()  # slices of numpy arrays go to the wire for a fraction of torch's cost
        replies, row = [], 0
        for i, req in members:
            rows = slice(row, row + req.q_nope.shape[0])
            row = rows.stop
            replies.append((i, wire.encode(wire.RouteReply(req.request_id, wire.to_wire(out[rows]),
                                                           wire.to_wire(lse[rows])))))  # fmt: skip
        return replies

    def _shard_for(self, corpus: str, layer: int, block_ids: tuple[int, ...], received: float, timeout_us: int,
                   held: set[tuple[str, tuple[int, ...]]]):
        if (time.monotonic() - received) * 1e6 > timeout_us:
            raise _Refused(ErrorCode.DEADLINE, "deadline passed before the request was served")
        shard = self.shards.get(corpus)
        if shard is None:
            raise _Refused(ErrorCode.UNKNOWN_CORPUS, f"owner {self.instance_id!r} holds no corpus {corpus!r}")
        if layer >= len(shard.layers):
            raise _Refused(ErrorCode.BAD_REQUEST, f"layer {layer} is out of range [0, {len(shard.layers)})")
        if (corpus, block_ids) not in held:
            if not shard.holds(block_ids):
                missing = [b for b in block_ids if b not in shard.block_rows][:8]
                raise _Refused(ErrorCode.BAD_REQUEST, f"owner {self.instance_id!r} does not hold blocks {missing}")
            held.add((corpus, block_ids))
        not_ready = shard.not_ready(block_ids)
        if not_ready:  # its store was emptied (a restart) or not filled yet: zeros would be a wrong answer
            raise _Refused(ErrorCode.NOT_READY, f"owner {self.instance_id!r} has not stored blocks {not_ready[:8]}")
        return shard

    def _error(self, request_id: int, code: ErrorCode, message: str) -> bytes:
        self.stats.error(str(code))
        return wire.encode(wire.ErrorReply(request_id, code, message[:4000]))


class _Refused(Exception):
    def __init__(self, code: ErrorCode, message: str, request_id: int = 0):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def _request_id(payload: bytes) -> int:
    """The request id of a call that is refused before it is read (0 if it cannot be decoded)."""
    try:
        return getattr(wire.decode(payload), "request_id", 0)
    except Exception:  # noqa: BLE001 - an undecodable call is answered with id 0
        return 0


BATCH_ATOL = 1e-5  # how far a batched reply may be from the same call answered alone (see replies_agree)


def replies_agree(got: bytes, want: bytes, atol: float = BATCH_ATOL) -> bool:
    """Whether two encoded replies to the same call say the same: route replies with the same id, dtypes and shapes
    and outputs within ``atol`` (float32 rounding: a stacked GEMM's BLAS blocking depends on its shape, so a row
    answered in a batch may round differently from the row alone; ~5e-6 seen on an AVX-512 host, 0 on others);
    anything else byte for byte."""
    a, b = wire.decode(got), wire.decode(want)
    if not (isinstance(a, wire.RouteReply) and isinstance(b, wire.RouteReply)):
        return got == want
    if a.request_id != b.request_id:
        return False
    for x, y in ((a.out, b.out), (a.lse, b.lse)):
        tx, ty = wire.as_torch(x), wire.as_torch(y)
        if tx.dtype != ty.dtype or tx.shape != ty.shape:
            return False
        if not torch.allclose(tx.float(), ty.float(), rtol=0, atol=atol):
            return False
    return True
