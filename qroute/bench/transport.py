"""``qroute bench transport``: one route and one fetch over NIXL and over TCP, next to the bare NIXL round trip.

In one run, against real owner processes on loopback (``qroute.bench.pair``):

- the raw NIXL notification round trip (``NixlConnection.raw_notif_rtt``): the floor;
- the route round trip: 1 query row x H heads, the owner attends n tokens: a ``RouteRequest`` encoded, sent
  with ``connection.call``, the reply decoded;
- the fetch: one-sided READ of the same n tokens' rows;
- the same route and fetch over TCP.

Each operation is timed back to back (alone in a loop: the headline figures), then again interleaved with the
others (one of each per round: each finds the caches as the others left them, as in real use). What a route
costs on top of the raw round trip is broken down: the requester's encode and decode (timed alone here), the
owner's handler (``OwnerService.handle``: decode, attention, encode) as the owner process itself timed it
during the run (its ``qroute.metrics.OWNER`` timings), and for reference the same handler and
``partial_attention`` alone in a hot loop here; the remainder is the transport's own work (copies into and out
of the slots, WRITEs, polling).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO


def _time(fn, iters: int, warmup: int = 50) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _measure_pair(kind: str, workdir: Path, heads: int, tokens: int, iters: int) -> dict[str, Any]:
    from qroute.bench.pair import fetch_rows, open_pair, queries, route_request, select_blocks, summary_us
    from qroute.core import wire
    from qroute.transport import SupportsRawPing

    with open_pair(kind, workdir=workdir / kind, num_tokens=max(4 * tokens, 256)) as pair:
        blocks = select_blocks(tokens, tokens // pair.directory.block_size, pair.directory.block_size,
                               pair.num_blocks)  # fmt: skip
        q_nope, q_pe = queries(1, heads, pair.geometry)
        conn = pair.connection

        def route() -> None:
            reply = wire.decode(conn.call(route_request(pair, q_nope, q_pe, blocks), 10.0))
            if not isinstance(reply, wire.RouteReply):
                raise RuntimeError(f"route answered with {reply!r}")

        ops = {"route": route, "fetch": lambda: fetch_rows(pair, blocks)}
        if isinstance(conn, SupportsRawPing):
            ops["raw"] = lambda: conn.raw_notif_rtt(1)
        for op in ops.values():  # warm up: handles prepared, caches hot
            for _ in range(min(100, iters)):
                op()
        # back to back: each operation alone in a loop (the usual micro-benchmark)
        times: dict[str, list[float]] = {name: _time(op, iters, warmup=0) for name, op in ops.items() if name != "raw"}
        if "raw" in ops:
            times["raw"] = conn.raw_notif_rtt(iters)  # its own timer: the notification alone
        # interleaved: one of each per round, so each finds the caches as the others left them
        mixed: dict[str, list[float]] = {name: [] for name in ops}
        for _ in range(iters):
            for name, op in ops.items():
                if name == "raw":
                    mixed[name] += op()
                else:
                    start = time.perf_counter()
                    op()
                    mixed[name].append(time.perf_counter() - start)
        result: dict[str, Any] = {name: summary_us(ts) for name, ts in times.items()}
        result["interleaved"] = {name: summary_us(ts) for name, ts in mixed.items()}
        result["request_bytes"] = len(route_request(pair, q_nope, q_pe, blocks))
        result["fetch_bytes"] = tokens * pair.row_bytes
    result["owner_handle_us"] = (pair.owner_stats or {}).get("route_handle_s", {}).get("median_us")  # in the owner
    return result


def _breakdown(workdir: Path, heads: int, tokens: int, iters: int) -> dict[str, float]:
    """The route's pieces, timed in this process with the owner's own code."""
    import torch

    from qroute.bench.pair import BLOCKS_PER_CHUNK, queries, select_blocks, summary_us, write_corpus
    from qroute.core import wire
    from qroute.core.costmodel import load_fabric
    from qroute.dataplane.router import Router, RouterConfig
    from qroute.numerics.attention import partial_attention
    from qroute.reference.prepared import prepare_corpus
    from qroute.reference.tinymodel import build_tiny_model

    num_tokens = max(4 * tokens, 256)
    corpus = write_corpus(workdir / "local-corpus", num_tokens)
    prepared = prepare_corpus(build_tiny_model(dtype="float32"), corpus, instances=["owner"],
                              blocks_per_chunk=BLOCKS_PER_CHUNK, max_tokens=num_tokens)  # fmt: skip
    service = prepared.owner_service("owner", b"bench")
    shard = service.shards[prepared.directory.name]
    block = prepared.directory.block_size
    blocks = select_blocks(tokens, tokens // block, block, prepared.directory.num_blocks)
    q_nope, q_pe = queries(1, heads, prepared.geometry)
    p = prepared.params

    router = Router(RouterConfig("requester"), prepared.directory, prepared.geometry, load_fabric("loopback-tcp"),
                    p, {})  # fmt: skip

    def encode() -> bytes:  # the router's own encoding
        return router.route_request(0, q_nope, q_pe, blocks)

    payload = encode()
    reply = service.handle(payload)
    if not isinstance(wire.decode(reply), wire.RouteReply):
        raise RuntimeError(f"local owner refused the route: {wire.decode(reply)!r}")
    slots = shard.slots(blocks)
    rows = shard.layers[0]
    parts = {
        "encode": encode,
        "owner_handler": lambda: service.handle(payload),
        "owner_compute": lambda: partial_attention(q_nope, q_pe, rows, slots, p.scale, p.kv_lora_rank),
        "decode": lambda: wire.decode(reply),
    }
    torch.set_num_threads(1)
    out = {name: summary_us(_time(fn, iters, warmup=min(50, iters)))["median_us"] for name, fn in parts.items()}
    out["reply_bytes"] = len(reply)
    return out


def run_bench(*, heads: int = 4, tokens: int = 64, iters: int = 2000) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # the owner process needs the other core
    if tokens <= 0 or tokens % 16:
        from qroute.errors import ConfigError

        raise ConfigError(f"--tokens must be a positive multiple of the block size 16, got {tokens}")
    with tempfile.TemporaryDirectory(prefix="qroute-bench-") as tmp:
        work = Path(tmp)
        nixl = _measure_pair("nixl", work, heads, tokens, iters)
        tcp = _measure_pair("tcp", work, heads, tokens, iters)
        parts = _breakdown(work, heads, tokens, iters)
    raw, route, fetch = nixl["raw"], nixl["route"], nixl["fetch"]
    # the owner's own timing of its handler, in context; the hot-loop figure from this process if it is missing
    in_owner = nixl["owner_handle_us"] if nixl["owner_handle_us"] is not None else parts["owner_handler"]
    return {
        "heads": heads,
        "tokens": tokens,
        "iters": iters,
        "request_bytes": nixl["request_bytes"],
        "reply_bytes": parts["reply_bytes"],
        "fetch_bytes": nixl["fetch_bytes"],
        "raw_rtt_us": raw["median_us"],
        "raw_nixl_rtt_us": raw["median_us"],
        "raw_nixl_rtt_p99_us": raw["p99_us"],
        "route_rtt_us": route["median_us"],
        "route_rtt_p99_us": route["p99_us"],
        "fetch_us": fetch["median_us"],
        "fetch_p99_us": fetch["p99_us"],
        "tcp_route_rtt_us": tcp["route"]["median_us"],
        "tcp_route_rtt_p99_us": tcp["route"]["p99_us"],
        "tcp_fetch_us": tcp["fetch"]["median_us"],
        "tcp_fetch_p99_us": tcp["fetch"]["p99_us"],
        "route_over_raw": route["median_us"] / raw["median_us"],
        # what qroute adds beyond the attention itself, in raw round trips (issue 9's target: <= 2)
        "route_overhead_over_raw": (route["median_us"] - parts["owner_compute"]) / raw["median_us"],
        "fetch_over_raw": fetch["median_us"] / raw["median_us"],
        "tcp_route_over_nixl_route": tcp["route"]["median_us"] / route["median_us"],
        "tcp_fetch_over_nixl_fetch": tcp["fetch"]["median_us"] / fetch["median_us"],
        "breakdown_us": {
            "raw_nixl_rtt": raw["median_us"],
            "encode": parts["encode"],
            "owner_handle_in_owner": in_owner,
            "owner_handle_hot_loop": parts["owner_handler"],
            "owner_compute": parts["owner_compute"],
            "decode": parts["decode"],
            "transport_beyond_raw": route["median_us"] - raw["median_us"] - parts["encode"] - in_owner
            - parts["decode"],
            "tcp_owner_handle_in_owner": tcp["owner_handle_us"],
        },
        "interleaved": {
            "raw_nixl_rtt_us": nixl["interleaved"]["raw"]["median_us"],
            "route_rtt_us": nixl["interleaved"]["route"]["median_us"],
            "fetch_us": nixl["interleaved"]["fetch"]["median_us"],
            "tcp_route_rtt_us": tcp["interleaved"]["route"]["median_us"],
            "tcp_fetch_us": tcp["interleaved"]["fetch"]["median_us"],
            "route_over_raw": nixl["interleaved"]["route"]["median_us"] / nixl["interleaved"]["raw"]["median_us"],
        },
        "owner_compute_us": parts["owner_compute"],
        "target_route_over_raw": 1.5,
        "target_route_overhead_over_raw": 2.0,
    }


def _print(r: dict[str, Any], out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up per call: pytest and callers swap sys.stdout
    print(f"route: 1 row x {r['heads']} heads, owner attends {r['tokens']} tokens ({r['request_bytes']} B request, "
          f"{r['reply_bytes']} B reply); fetch: READ of {r['tokens']} tokens ({r['fetch_bytes']} B); "
          f"{r['iters']} iterations", file=out)  # fmt: skip
    rows = [("raw NIXL notification round trip", "raw_nixl_rtt_us", "raw_nixl_rtt_p99_us"),
            ("route round trip, NIXL", "route_rtt_us", "route_rtt_p99_us"),
            ("fetch (READ), NIXL", "fetch_us", "fetch_p99_us"),
            ("route round trip, TCP", "tcp_route_rtt_us", "tcp_route_rtt_p99_us"),
            ("fetch, TCP", "tcp_fetch_us", "tcp_fetch_p99_us")]  # fmt: skip
    print(f"  {'':34s} {'median':>9s} {'p99':>9s}", file=out)
    for label, median, p99 in rows:
        print(f"  {label:34s} {r[median]:8.1f}us {r[p99]:8.1f}us", file=out)
    print(f"  route / raw NIXL round trip      {r['route_over_raw']:6.2f}x  (target <= {r['target_route_over_raw']}x)",
          file=out)  # fmt: skip
    print(f"  (route - owner compute) / raw     {r['route_overhead_over_raw']:6.2f}x  (target <= "
          f"{r['target_route_overhead_over_raw']}x; owner compute {r['owner_compute_us']:.1f}us)",
          file=out)  # fmt: skip
    print(f"  TCP route / NIXL route           {r['tcp_route_over_nixl_route']:6.2f}x", file=out)
    print(f"  TCP fetch / NIXL fetch           {r['tcp_fetch_over_nixl_fetch']:6.2f}x", file=out)
    m = r["interleaved"]
    print(f"interleaved (one of each per round), medians: raw {m['raw_nixl_rtt_us']:.1f}us, route "
          f"{m['route_rtt_us']:.1f}us ({m['route_over_raw']:.2f}x raw), fetch {m['fetch_us']:.1f}us; TCP route "
          f"{m['tcp_route_rtt_us']:.1f}us, fetch {m['tcp_fetch_us']:.1f}us", file=out)  # fmt: skip
    print("route breakdown (medians; in_owner: timed by the owner process during the run; the others: timed "
          "alone in a hot loop in this process):", file=out)  # fmt: skip
    for key, value in r["breakdown_us"].items():
        print(f"  {key:32s} {value:8.1f}us" if value is not None else f"  {key:32s}      n/a", file=out)


def _cmd_bench_transport(args: argparse.Namespace) -> int:
    from qroute.bench import emit

    return emit(run_bench(heads=args.heads, tokens=args.tokens, iters=args.iters), args.json, _print)


def add_cli(sub: argparse._SubParsersAction) -> None:
    from qroute.bench import bench_group

    parser = bench_group(sub).add_parser(
        "transport", help="route and fetch round trips over NIXL and TCP vs the raw NIXL RTT"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--heads", type=int, default=4, help="heads of the query row (H; the tiny model has 4)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens the owner attends (n), a multiple of 16")
    parser.add_argument("--iters", type=int, default=2000, help="measured iterations per operation")
    parser.set_defaults(handler=_cmd_bench_transport)
