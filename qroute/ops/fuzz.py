"""``qroute fuzz``: malformed and hostile calls against the wire decoder and a real owner service.

Each case starts from a valid encoded message (route requests of several layers, block sets, row counts and
dtypes; hellos; replies) and breaks it one way: flipped bytes, a cut or an extended tail, two messages spliced,
random bytes, or one field of a route request set to a hostile value (layer, blocks, corpus, shapes, dtypes,
deadline, id) and encoded again. Checked for every case: the decoder raises only ``WireError`` (what it accepts
encodes back to itself); the owner's handler never raises and answers a ``RouteReply`` of the request's shape or a
typed ``ErrorReply``, never ``internal`` (an unforeseen exception); every 50th case the broken call is answered in
one batch with two valid ones, whose replies must be those they get alone; every 1,000th case and at the end the
owner still answers a valid request exactly as at the start. A share of the cases also goes over a real TCP
connection to the same owner (its server must keep serving). Prints counts by outcome and the owner's RSS growth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import torch

from qroute.core import wire
from qroute.dataplane.owner import OwnerService, replies_agree
from qroute.errors import WireError

__all__ = ["FuzzReport", "run_fuzz", "seed_messages"]

BATCH_EVERY = 50
PROBE_EVERY = 1000


@dataclasses.dataclass
class FuzzReport:
    cases: int = 0
    decoded: int = 0  # cases the decoder accepted (valid messages, possibly hostile in meaning)
    outcomes: Counter = dataclasses.field(default_factory=Counter)  # "route_reply" or "error:<code>"
    over_tcp: int = 0
    batches: int = 0
    probes: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)  # property violations, first 20
    seconds: float = 0.0
    rss_growth_mib: float = 0.0

    def fail(self, text: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "outcomes": dict(self.outcomes), "ok": not self.failures,
                "cases_per_s": round(self.cases / self.seconds, 1) if self.seconds else None}  # fmt: skip


def seed_messages(service: OwnerService, rng: random.Random) -> tuple[list[wire.RouteRequest], list[bytes]]:
    """Valid route requests for blocks the owner holds (and whose answers are therefore replies), and every
    message kind encoded."""
    corpus, shard = next(iter(service.shards.items()))
    held = sorted(shard.block_rows)
    heads, rank = 4, service.params.kv_lora_rank
    rope = shard.width - rank
    requests = []
    for k in range(8):
        rows = rng.choice([1, 2, 5])
        dtype = [torch.float32, torch.bfloat16, torch.float16][k % 3]
        blocks = tuple(sorted(rng.sample(held, rng.randint(1, min(4, len(held))))))
        q_nope = torch.randn(rows, heads, rank, generator=torch.Generator().manual_seed(k)).to(dtype)
        q_pe = torch.randn(rows, heads, rope, generator=torch.Generator().manual_seed(100 + k)).to(dtype)
        requests.append(wire.RouteRequest(k + 1, corpus, k % len(shard.layers), wire.to_wire(q_nope),
                                          wire.to_wire(q_pe), blocks, 10_000_000))  # fmt: skip
    others = [wire.Hello(wire.WIRE_VERSION, "x", "fp", corpus, "v", "c"), wire.HelloReply(wire.WIRE_VERSION, True),
              wire.ErrorReply(9, 11, "no")]  # fmt: skip
    return requests, [wire.encode(m) for m in [*requests, *others]]


def _hostile_field(req: wire.RouteRequest, rng: random.Random) -> wire.RouteRequest:
    """``req`` with one field set to a value an honest requester would not send."""
    huge = rng.choice([2**31, 2**40, 2**63 - 1])
    field = rng.choice(["layer", "blocks", "corpus", "shape", "dtype", "deadline", "id", "empty"])
    if field == "layer":
        return msgspec.structs.replace(req, layer=rng.choice([1000, huge]))
    if field == "blocks":
        blocks = rng.choice([(huge,), tuple(range(10_000, 10_050)), (*req.block_ids, 10**6), ()])
        return msgspec.structs.replace(req, block_ids=blocks)
    if field == "corpus":
        return msgspec.structs.replace(req, corpus=rng.choice(["", "other", "x" * 256, "corpus\x00"]))
    if field == "shape":  # the same bytes in another consistent shape: one head per row, or half-width latents
        t, p = req.q_nope, req.q_pe
        rows, heads = t.shape[:2]
        reshape = rng.choice([lambda s: (rows * heads, 1, s[2]), lambda s: (rows, heads * 2, s[2] // 2)])
        return msgspec.structs.replace(req, q_nope=wire.Tensor(t.dtype, reshape(t.shape), t.data),
                                       q_pe=wire.Tensor(p.dtype, reshape(p.shape), p.data))  # fmt: skip
    if field == "dtype":  # the same bytes read as another float type of the same size
        swap = {"bfloat16": "float16", "float16": "bfloat16"}.get(req.q_nope.dtype)
        if swap is None:
            return msgspec.structs.replace(req, request_id=huge)
        return msgspec.structs.replace(req, q_nope=wire.Tensor(swap, req.q_nope.shape, req.q_nope.data),
                                       q_pe=wire.Tensor(swap, req.q_pe.shape, req.q_pe.data))  # fmt: skip
    if field == "deadline":
        return msgspec.structs.replace(req, timeout_us=1)
    if field == "empty":  # no query rows at all
        z = wire.Tensor(req.q_nope.dtype, (0, *req.q_nope.shape[1:]), b"")
        return msgspec.structs.replace(req, q_nope=z, q_pe=wire.Tensor(req.q_pe.dtype, (0, *req.q_pe.shape[1:]), b""))
    return msgspec.structs.replace(req, request_id=huge)


def _mutate(seeds: list[bytes], requests: list[wire.RouteRequest], rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    buf = bytearray(rng.choice(seeds))
    if kind == 0:  # flipped bytes
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)
    if kind == 1:  # cut
        return bytes(buf[: rng.randrange(len(buf))])
    if kind == 2:  # extended
        return bytes(buf) + rng.randbytes(rng.randint(1, 64))
    if kind == 3:  # spliced
        other = rng.choice(seeds)
        return bytes(buf[: rng.randrange(len(buf))]) + other[rng.randrange(len(other)):]
    if kind == 4:  # random
        return rng.randbytes(rng.randint(0, 512))
    try:
        return wire.encode(_hostile_field(rng.choice(requests), rng))
    except WireError:  # the encoder's own validation refused it: send the seed's bytes with a flipped field tag
        return bytes(buf)


def _check_decoder(payload: bytes, report: FuzzReport) -> wire.Message | None:
    try:
        msg = wire.decode(payload)
    except WireError:
        return None
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
        report.fail(f"decoder raised {type(exc).__name__}: {exc}")
        return None
    report.decoded += 1
    if wire.decode(wire.encode(msg)) != msg:
        report.fail(f"{type(msg).__name__} does not encode back to itself")
    return msg


def _check_reply(payload: bytes, reply: bytes, msg: wire.Message | None, report: FuzzReport) -> None:
    try:
        answer = wire.decode(reply)
    except WireError as exc:
        report.fail(f"the owner answered something undecodable: {exc}")
        return
    if isinstance(answer, wire.ErrorReply):
        report.outcomes[f"error:{answer.code}"] += 1
        if answer.code == 14:  # ErrorCode.INTERNAL: an exception nobody foresaw
            report.fail(f"internal error for {msg!r}: {answer.message[:300]}")
    elif isinstance(answer, wire.RouteReply):
        report.outcomes["route_reply"] += 1
        if not isinstance(msg, wire.RouteRequest) or answer.out.shape[:2] != msg.q_nope.shape[:2]:
            report.fail(f"a route reply of shape {answer.out.shape} to {msg!r}")
    else:
        report.fail(f"the owner answered a {type(answer).__name__}")


def run_fuzz(service: OwnerService, cases: int, *, seed: int = 0, call: Callable[[bytes], bytes] | None = None,
             call_every: int = 10) -> FuzzReport:  # fmt: skip
    """``cases`` broken calls to ``service`` (see the module docstring); ``call``, if given, sends every
    ``call_every``-th case over a real connection to a server of the same service instead."""
    rng = random.Random(seed)
    requests, seeds = seed_messages(service, rng)
    probe = wire.encode(requests[0])
    expected = service.handle(probe)
    alone = [service.handle(wire.encode(r)) for r in requests[:2]]
    report = FuzzReport()
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for case in range(1, cases + 1):
        payload = _mutate(seeds, requests, rng)
        msg = _check_decoder(payload, report)
        try:
            if case % BATCH_EVERY == 0:
                replies = service.handle_batch([wire.encode(requests[0]), payload, wire.encode(requests[1])])
                report.batches += 1
                if not (replies_agree(replies[0], alone[0]) and replies_agree(replies[2], alone[1])):
                    report.fail(f"a broken call changed its batch's valid replies: {msg!r}")
                reply = replies[1]
            elif call is not None and case % call_every == 0:
                reply = call(payload)
                report.over_tcp += 1
            else:
                reply = service.handle(payload)
        except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
            report.fail(f"the owner raised {type(exc).__name__}: {exc} for {msg!r}")
            continue
        _check_reply(payload, reply, msg, report)
        if case % PROBE_EVERY == 0 or case == cases:
            report.probes += 1
            if service.handle(probe) != expected or (call is not None and call(probe) != expected):
                report.fail(f"after case {case} the owner answers a valid request differently")
        report.cases = case
    report.seconds = time.perf_counter() - start
    report.rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_start) / 1024
    return report


def fuzz_owner(model_dir: Path, corpus_dir: Path, cases: int, *, seed: int = 0, over_tcp: bool = True,
               ) -> FuzzReport:  # fmt: skip
    """A real owner service over the tiny model and ``corpus_dir`` (reference prefill), fuzzed in process and,
    with ``over_tcp``, also through a TCP server of it."""
    from qroute.dataplane.peering import connect_owner, serve_owner
    from qroute.reference.prepared import prepare_corpus
    from qroute.transport import get_transport

    secret = b"fuzz-secret"
    prepared = prepare_corpus(model_dir, corpus_dir, instances=["a", "b"], blocks_per_chunk=2)
    service = prepared.owner_service("b", secret)
    if not over_tcp:
        return run_fuzz(service, cases, seed=seed)
    transport = get_transport("tcp")
    server = serve_owner(transport, service)
    connection = connect_owner(transport, server.start(), instance_id="a", directory=prepared.directory,
                               model_fingerprint=prepared.fingerprint, compat=prepared.compat,
                               secret=secret)  # fmt: skip
    try:
        return run_fuzz(service, cases, seed=seed, call=lambda payload: connection.call(payload, 10.0))
    finally:
        connection.close()
        server.stop()
        transport.close()


def _run(args: argparse.Namespace) -> int:
    from qroute.ops.cluster_cli import model_dir_or_tiny

    report = fuzz_owner(model_dir_or_tiny(args.model_dir), Path(args.corpus).resolve(), args.cases, seed=args.seed)
    result = report.as_dict()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{report.cases} cases in {report.seconds:.1f} s ({result['cases_per_s']}/s): {report.decoded} decoded, "
              f"{report.over_tcp} over TCP, {report.batches} in batches, {report.probes} probes")  # fmt: skip
        for outcome, n in sorted(report.outcomes.items()):
            print(f"  {outcome:24s} {n}")
        print(f"owner RSS growth: {report.rss_growth_mib:.1f} MiB")
        print("OK" if not report.failures else "FAILED:\n  " + "\n  ".join(report.failures))
    return 0 if not report.failures else 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("fuzz", help="malformed and hostile calls against the wire decoder and an owner")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run)
