"""The ``qroute`` command line. Each subcommand imports what it needs lazily, so ``qroute plan``
starts fast and never imports torch."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qroute.errors import QRouteError

Handler = Callable[[argparse.Namespace], int]


def _cmd_model_build(args: argparse.Namespace) -> int:
    from qroute.reference.tinymodel import build_tiny_model

    path = build_tiny_model(
        Path(args.out) if args.out else None,
        dtype=args.dtype,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=args.heads,
        moe=args.moe,
        seed=args.seed,
        skill=args.skill,
    )
    print(path)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from qroute.core.costmodel import Workload, costs, crossover_tokens, load_fabric
    from qroute.core.geometry import geometry_from_config

    geometry = geometry_from_config(args.model, cache_dtype=args.cache_dtype)
    fabric = load_fabric(args.fabric)
    heads = args.heads or geometry.num_heads
    workload = Workload(
        batch=args.batch,
        heads=heads,
        tokens=args.tokens,
        reuse=args.reuse,
        block_size=args.block_size,
        resident=args.resident,
    )
    result = costs(geometry, fabric, workload)
    crossover = crossover_tokens(
        geometry, fabric, batch=args.batch, heads=heads, reuse=args.reuse, block_size=args.block_size
    )
    report = {
        "decision": result.decision.value,
        "route_us": result.route_us,
        "fetch_us": result.fetch_us,
        "local_us": result.local_us,
        "crossover_tokens": crossover,
        "route_terms_us": result.route,
        "fetch_terms_us": result.fetch,
        "fabric": fabric.name,
        "workload": {
            "batch": args.batch,
            "heads": heads,
            "tokens": args.tokens,
            "reuse": args.reuse,
            "block_size": args.block_size,
            "resident": args.resident,
        },
        "geometry": geometry.to_dict(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    g = geometry
    print(
        f"model {g.model_type}: {g.num_layers} layers, {g.num_heads} heads, latent {g.latent_width} "
        f"({g.latent_bytes_per_token} B/token/layer as {g.cache_dtype}), query row {g.query_row_bytes} B/head, "
        f"return row {g.return_row_bytes} B/head"
    )
    print(f"fabric {fabric.name}: probe {fabric.probe_us} us, {fabric.bandwidth_gbps} GB/s")
    print(f"workload: B={args.batch} H={heads} n={args.tokens} reuse={args.reuse} block={args.block_size}")
    for label, terms in (("route", result.route), ("fetch", result.fetch)):
        parts = "  ".join(f"{k} {v:.2f}" for k, v in terms.items())
        print(f"  {label:5s} {sum(terms.values()):10.2f} us   = {parts}")
    print(f"  local {result.local_us:10.2f} us   (valid only if the blocks are resident)")
    print(f"decision: {result.decision.value}")
    if crossover is None:
        print("crossover: none (fetch wins at every n)")
    else:
        print(f"crossover: route wins above n = {crossover:.1f} tokens for B={args.batch}, H={heads}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qroute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="tiny test models").add_subparsers(dest="model_command", required=True)
    build = model.add_parser("build", help="build (or reuse from cache) a deterministic tiny MLA model")
    build.add_argument("--out", help="output directory (default: a content-hashed cache directory)")
    build.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    build.add_argument("--layers", type=int, default=2)
    build.add_argument("--hidden", type=int, default=256)
    build.add_argument("--heads", type=int, default=4)
    build.add_argument("--moe", action="store_true", help="MoE layers after the first")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--skill", choices=["random", "copy"], default="random",
                       help="copy: the demo's copying model (needs --hidden >= 385, e.g. 512)")
    build.set_defaults(handler=_cmd_model_build)

    plan = sub.add_parser("plan", help="route / fetch / local decision with every cost term")
    plan.add_argument("--model", required=True, help="HF config.json, model directory, or configs/models/*.json")
    plan.add_argument("--fabric", required=True, help="fabric name in configs/fabrics or a YAML path")
    plan.add_argument("--batch", type=int, default=1, help="query rows bound for the owner (B)")
    plan.add_argument("--heads", type=int, default=0, help="heads per row (H); default: all of the model's")
    plan.add_argument("--tokens", type=int, default=2048, help="selected tokens the owner holds (n)")
    plan.add_argument("--reuse", type=float, default=1.0, help="expected steps reusing fetched blocks (R)")
    plan.add_argument("--block-size", type=int, default=64, help="tokens per cache block")
    plan.add_argument("--cache-dtype", default=None, help="override the latent cache dtype")
    plan.add_argument("--resident", action="store_true", help="the blocks are already local")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(handler=_cmd_plan)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands defined next to the code they drive (data plane, cluster, demo)."""
    registrars = []
    for module_name in (
        "qroute.ops.owner_process",
        "qroute.ops.calibrate",
        "qroute.bench.transport",
        "qroute.bench.owner",
        "qroute.bench.decode",
        "qroute.bench.sparse",
        "qroute.bench.soak",
        "qroute.bench.ab",
        "qroute.bench.sglang",
        "qroute.ops.cluster_cli",
        "qroute.ops.check",
        "qroute.ops.fuzz",
        "qroute.ops.whatif",
        "qroute.ops.demo",
    ):
        try:
            module = __import__(module_name, fromlist=["add_cli"])
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        registrars.append(module.add_cli)
    return registrars


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except QRouteError as exc:
        print(f"qroute: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
