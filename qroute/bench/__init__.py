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


def emit(report: dict[str, Any], as_json: bool, print_report: Callable[[dict[str, Any]], None]) -> int:
    """A benchmark's figures: its JSON (``--json``) or its table; the command's exit status."""
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0
