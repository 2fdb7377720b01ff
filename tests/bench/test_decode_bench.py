"""``qroute bench decode`` counts only the steady state: gaps while every request is decoding."""

from __future__ import annotations

import pytest

from qroute.bench.decode import steady_gaps


def test_steady_gaps_skip_prefill_and_the_tail():
    # request 0 starts at 0 and decodes every 1.0 s; request 1's first token is at 3.5 (its prefill overlapped
    # request 0's decode) and it ends first, at 6.5
    runs = [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [3.5, 4.5, 5.5, 6.5]]
    # 4-5 and 5-6 of request 0 (3-4 began before 3.5, 6-7 ends after 6.5), all three of request 1
    assert steady_gaps(runs) == pytest.approx([1.0] * 5)


def test_cli_registers_bench_decode():
    from qroute.ops.cli import build_parser

    args = build_parser().parse_args(["bench", "decode", "--json", "--repeats", "1"])
    assert args.json and args.repeats == 1 and callable(args.handler)
