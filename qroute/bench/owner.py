"""``qroute bench owner``: an owner answering many requesters' routes for the same blocks, batched or not.

In one run, on one ``OwnerService`` (the real handler: decode, validate, attention, encode) holding a generated
corpus: ``C`` requesters each send one route (1 query row x H heads over the same ``n`` tokens at one layer).
Unbatched: ``handle`` once per call, as a transport that serves calls one at a time does. Batched:
``handle_batch`` of all ``C`` calls, as the NIXL poll thread does with the calls one pass finds; the routes share
one attention over all their rows. Reported per concurrency: query rows per second both ways and their ratio
(``batched_over_unbatched``). The transport is not in these figures (``qroute bench transport`` has it); the
two are timed interleaved, round by round, so that both see the same machine.

Beside them, the attention alone, timed the same way: the ``C`` requesters' rows attended one requester at a time
against all at once (``attention_together_over_alone``). It bounds what batching can buy once the handler's own
costs are gone: where one attention over all the rows is compute-bound (a CPU core at 16 requesters of 4 heads),
batching saves the per-call work and the rows' re-reads, not the arithmetic.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONCURRENCY = (1, 4, 16, 64)
TARGET_AT_16 = 4.0


def run_bench(*, heads: int = 4, tokens: int = 1024, rounds: int = 30) -> dict[str, Any]:
    import torch

    from qroute.bench.pair import BLOCKS_PER_CHUNK, queries, select_blocks, write_corpus
    from qroute.core import wire
    from qroute.dataplane.owner import replies_agree
    from qroute.errors import ConfigError
    from qroute.reference.prepared import prepare_corpus
    from qroute.reference.tinymodel import build_tiny_model

    if tokens <= 0 or tokens % 16:
        raise ConfigError(f"--tokens must be a positive multiple of the block size 16, got {tokens}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="qroute-bench-owner-") as tmp:
        corpus = write_corpus(Path(tmp) / "corpus", tokens)
        prepared = prepare_corpus(build_tiny_model(dtype="float32"), corpus, instances=["owner"],
                                  blocks_per_chunk=BLOCKS_PER_CHUNK, max_tokens=tokens)  # fmt: skip
    service = prepared.owner_service("owner", b"bench", max_inflight=1)
    d = prepared.directory
    blocks = select_blocks(tokens, tokens // d.block_size, d.block_size, d.num_blocks)
    shard = service.shards[d.name]
    slots = shard.slots(blocks)

    def attend(q_nope, q_pe):
        return shard.format.attend(q_nope, q_pe, shard.layers[0], slots, service.params.scale)

    calls, rows_of = {}, {}
    for c in CONCURRENCY:
        batch, qs = [], []
        for k in range(c):
            q_nope, q_pe = queries(1, heads, prepared.geometry, seed=k)
            qs.append((q_nope, q_pe))
            batch.append(wire.encode(wire.RouteRequest(k, d.name, 0, wire.to_wire(q_nope), wire.to_wire(q_pe),
                                                       blocks, 60_000_000)))  # fmt: skip
        calls[c] = batch
        rows_of[c] = (qs, torch.cat([q for q, _ in qs]), torch.cat([q for _, q in qs]))
        if not all(map(replies_agree, service.handle_batch(batch), [service.handle(call) for call in batch])):
            raise RuntimeError(f"batched replies differ from one-by-one replies at concurrency {c}")
    ways = {"unbatched": lambda c: [service.handle(call) for call in calls[c]],
            "batched": lambda c: service.handle_batch(calls[c]),
            "attention_alone": lambda c: [attend(*q) for q in rows_of[c][0]],
            "attention_together": lambda c: attend(*rows_of[c][1:])}  # fmt: skip
    seconds: dict[int, dict[str, list[float]]] = {c: {kind: [] for kind in ways} for c in CONCURRENCY}
    for r in range(rounds):
        for c in CONCURRENCY:
            for kind in sorted(ways, reverse=r % 2 == 1):  # alternate the order: no order bias
                start = time.perf_counter()
                ways[kind](c)
                seconds[c][kind].append(time.perf_counter() - start)
    rows: dict[str, dict[str, float]] = {}
    for c, times in seconds.items():
        median = {kind: sorted(ts)[len(ts) // 2] for kind, ts in times.items()}
        rows[str(c)] = {f"{kind}_rows_per_s": c / s for kind, s in median.items()}
        rows[str(c)].update({f"{kind}_ms": s * 1e3 for kind, s in median.items()})
    return {
        "heads": heads, "tokens": tokens, "rounds": rounds, "concurrency": rows,
        "batched_over_unbatched": {c: r["batched_rows_per_s"] / r["unbatched_rows_per_s"] for c, r in rows.items()},
        "attention_together_over_alone": {c: r["attention_together_rows_per_s"] / r["attention_alone_rows_per_s"]
                                          for c, r in rows.items()},
        "target_at_16": TARGET_AT_16,
    }  # fmt: skip


def _print(r: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    print(f"owner: {r['heads']} heads, every requester's route over the same {r['tokens']} tokens; medians of "
          f"{r['rounds']} rounds", file=out)  # fmt: skip
    print(f"  {'requesters':>10s} {'unbatched rows/s':>17s} {'batched rows/s':>15s} {'ratio':>7s}"
          f"   {'attention alone':>15s} {'together':>9s} {'ratio':>7s}", file=out)  # fmt: skip
    for c, row in r["concurrency"].items():
        print(f"  {c:>10s} {row['unbatched_rows_per_s']:17.0f} {row['batched_rows_per_s']:15.0f} "
              f"{r['batched_over_unbatched'][c]:6.2f}x   {row['attention_alone_rows_per_s']:15.0f} "
              f"{row['attention_together_rows_per_s']:9.0f} {r['attention_together_over_alone'][c]:6.2f}x",
              file=out)  # fmt: skip
    print(f"  target at 16 requesters: >= {r['target_at_16']}x; of the batched ratio, the attention's own is what "
          "one pass over all rows gains, the rest is the handler's per-call work saved", file=out)  # fmt: skip


def _cmd(args: argparse.Namespace) -> int:
    from qroute.bench import emit

    return emit(run_bench(heads=args.heads, tokens=args.tokens, rounds=args.rounds), args.json, _print)


def add_cli(sub: argparse._SubParsersAction) -> None:
    from qroute.bench import bench_group

    parser = bench_group(sub).add_parser("owner", help="owner throughput, batched against unbatched routes")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--heads", type=int, default=4, help="heads of each query row (the tiny model has 4)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens every route attends, a multiple of 16")
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds per concurrency")
    parser.set_defaults(handler=_cmd)
