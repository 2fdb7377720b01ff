"""``qroute calibrate``: measure a live requester/owner pair and fit a fabric profile to it.

An owner runs as a real separate process on loopback (``qroute.bench.pair``); this process is the requester.
Two sweeps of the same four operations, with different sizes: the *fit* sweep gives the coefficients
(``qroute.core.costfit``), the *held-out* sweep checks the cost model's ``route_us`` / ``fetch_us`` against
measurements it was not fitted to.

- route:   ``Router.run`` of one owner group planned as route: B query rows x H heads to the owner, which
           attends n tokens; the reply decoded and merged with another part;
- fetch:   ``Router.run`` of one owner group planned as fetch: one-sided READ of n tokens' rows in runs of k
           blocks (k blocks per descriptor), then local attention of B rows over them;
- compute: ``partial_attention`` of B x H rows over n tokens, alone;
- merge:   ``merge`` of two parts of B x H rows.

Each point's time is the median over repetitions, taken in interleaved random order after warm-up rounds; the
points of both sweeps are measured in the same rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

HEADS = 4  # the tiny model's heads
# Fetches start at 32 tokens (74 KB): NIXL reads up to its 64 KiB staging buffer skip a per-call memory
# registration and run faster than the line the larger ones follow (see docs/costmodel.md).
FETCH_FIT_TOKENS = (32, 64, 256, 1024, 2048)


@dataclass(frozen=True)
class Point:
    op: str
    batch: int
    tokens: int = 0
    run_blocks: int = 1  # fetch: adjacent blocks per READ descriptor


@dataclass(frozen=True)
class Sweep:
    fit: tuple[Point, ...]
    held_out: tuple[Point, ...]
    corpus_tokens: int
    reps: int
    warmup: int


def _grid(op: str, batches, tokens, runs=(1,), max_work: int = 1 << 17) -> tuple[Point, ...]:
    """Every combination, except those whose attention work B*H*n exceeds ``max_work`` (slow on a CPU)."""
    return tuple(Point(op, b, n, k) for b in batches for n in tokens for k in runs if b * HEADS * n <= max_work)


def full_sweep(reps: int = 51) -> Sweep:
    fit = (
        _grid("compute", (1, 4, 16, 64), (16, 128, 512, 2048))
        + tuple(Point("merge", b) for b in (1, 2, 8, 32, 64))
        + _grid("route", (1, 2, 8, 32), (16, 128, 512, 2048))
        + _grid("fetch", (1,), FETCH_FIT_TOKENS, (1, 8, 128))
    )
    held_out = (
        _grid("compute", (3, 12, 48), (48, 320, 1280))
        + tuple(Point("merge", b) for b in (3, 12, 48))
        + _grid("route", (1, 4, 16), (48, 320, 1280))
        + _grid("fetch", (1,), (48, 160, 640, 1536), (2, 4))
        + _grid("fetch", (4,), (96, 800), (1, 3))
    )
    return Sweep(fit, held_out, corpus_tokens=4096, reps=reps, warmup=3)


def quick_sweep(reps: int = 5) -> Sweep:
    """Seconds, not minutes: for tests and a first look (its numbers are noisy)."""
    fit = (
        _grid("compute", (1, 4), (16, 64, 128))
        + tuple(Point("merge", b) for b in (1, 4))
        + _grid("route", (1, 4), (16, 64, 128))
        + _grid("fetch", (1,), (32, 64, 128), (1, 8))
    )
    held_out = (
        _grid("compute", (2,), (32, 96))
        + tuple(Point("merge", b) for b in (2,))
        + _grid("route", (2,), (32, 96))
        + _grid("fetch", (1,), (48, 96), (2,))
    )
    return Sweep(fit, held_out, corpus_tokens=512, reps=reps, warmup=1)


def _ops(pair, points: tuple[Point, ...]) -> list:
    """A zero-argument callable per point, with inputs made beforehand."""
    import torch

    from qroute.bench.pair import queries, select_blocks
    from qroute.core.config import Mode
    from qroute.numerics.attention import merge, partial_attention

    g, p, router = pair.geometry, pair.params, pair.router
    block = pair.directory.block_size
    rows = torch.randn(pair.directory.num_tokens, g.latent_width, generator=torch.Generator().manual_seed(1))
    ops = []
    for pt in points:
        q_nope, q_pe = queries(pt.batch, HEADS, g, seed=pt.batch)
        other = (torch.randn(pt.batch, HEADS, g.kv_lora_rank), torch.randn(pt.batch, HEADS))  # a part to merge with
        if pt.op in ("route", "fetch"):  # the router's own run of one owner group, planned beforehand
            runs = pt.tokens // block if pt.op == "route" else pt.run_blocks
            blocks = select_blocks(pt.tokens, runs, block, pair.num_blocks)
            plan = router.plan(pt.batch, block_ids=blocks, mode=Mode.ROUTE if pt.op == "route" else Mode.FETCH)
            own = other if pt.op == "route" else None
            ops.append(lambda q=q_nope, r=q_pe, pl=plan, o=own: router.run(0, q, r, pl, own=o))
        elif pt.op == "compute":
            slots = torch.arange(pt.tokens)
            ops.append(lambda q=q_nope, r=q_pe, s=slots: partial_attention(q, r, rows, s, p.scale, p.kv_lora_rank))
        else:
            part = (torch.randn(pt.batch, HEADS, g.kv_lora_rank), torch.randn(pt.batch, HEADS))
            ops.append(lambda a=other, b=part: merge([a, b]))
    return ops


def measure(pair, points: tuple[Point, ...], reps: int, warmup: int, seed: int) -> list:
    """One ``Sample`` per point, in the order given: the median of ``reps`` timings. Operations of one kind are
    interleaved with each other only, so the owner's poll thread is in the same state (busy) for every route."""
    import statistics

    from qroute.bench.pair import time_interleaved
    from qroute.core.costfit import Sample

    block = pair.directory.block_size
    samples = {}
    for op in ("compute", "merge", "route", "fetch"):
        chosen = [pt for pt in points if pt.op == op]
        if not chosen:
            continue
        times = time_interleaved(_ops(pair, tuple(chosen)), reps, warmup, seed=seed)
        for pt, ts in zip(chosen, times, strict=True):
            desc_tokens = pt.run_blocks * block
            samples[pt] = Sample(pt.op, pt.batch, HEADS, pt.tokens, statistics.median(ts) * 1e6, desc_tokens)
    return [samples[pt] for pt in points]


def calibrate(kind: str, *, quick: bool = False, reps: int | None = None, name: str | None = None,
              transport_opts: dict | None = None) -> dict[str, Any]:
    """Run both sweeps against a fresh owner process; returns the report (see ``add_cli``)."""
    import statistics

    import torch

    from qroute.bench.pair import open_pair
    from qroute.core.costfit import check, fit_profile, rounded
    from qroute.transport import SupportsRawPing

    torch.set_num_threads(1)  # the owner process needs the other core
    sweep = quick_sweep() if quick else full_sweep()
    reps = reps or sweep.reps
    name = name or f"loopback-{kind}-calibrated"
    with tempfile.TemporaryDirectory(prefix="qroute-calibrate-") as tmp:
        with open_pair(kind, workdir=Path(tmp), num_tokens=sweep.corpus_tokens,
                       transport_opts=transport_opts) as pair:  # fmt: skip
            raw_probe = None
            if isinstance(pair.connection, SupportsRawPing):
                pings = pair.connection.raw_notif_rtt(max(50, 20 * reps))
                raw_probe = statistics.median(pings[len(pings) // 5:]) * 1e6  # the first ones warm up
            # both sweeps in the same rounds: a change in the machine's load hits both alike
            samples = measure(pair, sweep.fit + sweep.held_out, reps, sweep.warmup, seed=1)
            fit_samples, held_samples = samples[:len(sweep.fit)], samples[len(sweep.fit):]
            geometry = pair.geometry
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    # rounded first, so the errors reported are those of the profile as written
    profile = rounded(fit_profile(
        fit_samples, geometry, name=name, probe_us=raw_probe,
        description=f"{kind} between two local processes (requester and owner) on this machine, measured",
    ))  # fmt: skip
    held = check(profile, geometry, held_samples)
    fitted = check(profile, geometry, fit_samples)
    route_err = held.per_op.get("route", {}).get("median_abs_error_pct", float("nan"))
    fetch_err = held.per_op.get("fetch", {}).get("median_abs_error_pct", float("nan"))
    source = (
        f"qroute calibrate --transport {kind}{' --quick' if quick else ''} on {socket.gethostname()} "
        f"({os.cpu_count()} CPUs), {when}: owner process on loopback, tiny MLA model (float32, H={HEADS}), "
        f"{len(fit_samples)} fit points, median of {reps} repetitions each; on {len(held_samples)} held-out points "
        f"the median absolute error is {route_err:.1f}% for route, {fetch_err:.1f}% for fetch."
        + (" probe_us is the raw NIXL notification round trip; route_overhead_us the rest of a route's fixed cost."
           if raw_probe is not None else " probe_us includes the software cost of a route (no raw ping on TCP).")
    )  # fmt: skip
    profile = replace(profile, source=source)
    return {
        "transport": kind,
        "quick": quick,
        "median_abs_error_pct": held.median_abs_error_pct,
        "route": held.per_op.get("route", {}),
        "fetch": held.per_op.get("fetch", {}),
        "compute": held.per_op.get("compute", {}),
        "merge": held.per_op.get("merge", {}),
        "fit_median_abs_error_pct": fitted.median_abs_error_pct,
        "raw_probe_us": raw_probe,
        "profile": profile.to_dict(),
        "points": {"fit": fitted.points, "held_out": held.points},
        "settings": {"reps": reps, "warmup": sweep.warmup, "heads": HEADS, "corpus_tokens": sweep.corpus_tokens,
                     "measured_at": when},  # fmt: skip
    }


def _print_report(report: dict[str, Any], out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up per call: pytest and callers swap sys.stdout
    print(f"transport {report['transport']}: held-out median |error| {report['median_abs_error_pct']:.1f}% "
          f"(fit sweep {report['fit_median_abs_error_pct']:.1f}%)", file=out)  # fmt: skip
    for op in ("route", "fetch", "compute", "merge"):
        s = report[op]
        if s:
            print(f"  {op:8s} median {s['median_abs_error_pct']:5.1f}%  max {s['max_abs_error_pct']:5.1f}%  "
                  f"({s['points']} points)", file=out)  # fmt: skip
    print("held-out points:", file=out)
    for p in report["points"]["held_out"]:
        shape = f"B={p['batch']:<3d} n={p['tokens']:<5d}" + (f" desc={p['desc_tokens']}" if p["op"] == "fetch" else "")
        print(f"  {p['op']:8s} {shape:28s} measured {p['measured_us']:9.1f} us  predicted {p['predicted_us']:9.1f} us"
              f"  {p['error_pct']:+6.1f}%", file=out)  # fmt: skip
    print("profile:", file=out)
    for key, value in report["profile"].items():
        if key != "source":
            print(f"  {key}: {value}", file=out)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from qroute.core.costmodel import FabricProfile, save_fabric

    report = calibrate(args.transport, quick=args.quick, reps=args.reps, name=args.name)
    if args.out:
        save_fabric(FabricProfile(**report["profile"]), args.out)
        report["written_to"] = str(args.out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
        if args.out:
            print(f"wrote {args.out}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("calibrate", help="measure a live owner on loopback and fit a fabric profile to it")
    parser.add_argument("--transport", choices=["nixl", "tcp"], required=True)
    parser.add_argument("--out", help="write the fitted profile here (configs/fabrics YAML format)")
    parser.add_argument("--json", action="store_true", help="the whole report, points included, as JSON")
    parser.add_argument("--quick", action="store_true", help="a tiny sweep in seconds (noisy; for tests)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per point (default 51; quick 5)")
    parser.add_argument("--name", default=None, help="profile name (default loopback-<transport>-calibrated)")
    parser.set_defaults(handler=_cmd_calibrate)
