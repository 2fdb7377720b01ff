"""Benchmarks (``qroute bench ...``). Each module registers its subcommand under one shared group."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def bench_group(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The subparsers of ``qroute bench``, created by whichever benchmark module registers first (argparse
    refuses a second ``bench`` parser)."""
    parser = sub.choices.get("bench")
    if parser is None:
        parser = sub.add_parser("bench", help="benchmarks")
        parser.set_defaults(_bench_group=parser.add_subparsers(dest="bench_command", required=True))
    return parser.get_default("_bench_group")


def cluster_bench_parser(sub: argparse._SubParsersAction, name: str, help_text: str, *, base_port: int,
                         transport: str) -> argparse.ArgumentParser:
    """``qroute bench NAME`` with the options every benchmark that starts ``vllm serve`` instances takes."""
    parser = bench_group(sub).add_parser(name, help=help_text)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--corpus", help="corpus directory (default: the demo's corpus)")
    parser.add_argument("--model-dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=base_port)
    parser.add_argument("--transport", choices=("tcp", "nixl"), default=transport)
    return parser


def emit(report: dict[str, Any], as_json: bool, print_report: Callable[[dict[str, Any]], None]) -> int:
    """A benchmark's figures: its JSON (``--json``) or its table; the command's exit status."""
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0
