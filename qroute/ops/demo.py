"""``qroute demo``: the README's main job.

By default two ``vllm serve`` instances share the corpus (``demo_vllm``); ``--engine core`` runs the same
questions through the engine-free data plane and the reference model instead (``demo_core``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from qroute.ops.demo_core import default_corpus

    corpus = Path(args.corpus).resolve() if args.corpus else default_corpus()
    if args.engine == "core":
        from qroute.ops.demo_core import run_core_demo

        return run_core_demo(corpus=corpus, transport=args.transport, max_new=args.max_tokens,
                             max_corpus_tokens=args.max_corpus_tokens)  # fmt: skip
    from qroute.ops.demo_vllm import run_vllm_demo

    return run_vllm_demo(corpus=corpus, transport=args.transport, max_tokens=args.max_tokens)


def add_cli(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="two local instances sharing a corpus on the tiny model")
    parser.add_argument("--engine", choices=["vllm", "core"], default="vllm")
    parser.add_argument("--corpus", help="corpus directory (default: the stdlib sqlite3 package)")
    parser.add_argument("--transport", choices=["tcp", "nixl"], default="tcp")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens to generate per question")
    parser.add_argument("--max-corpus-tokens", type=int, default=None, help="core engine: keep the first tokens")
    parser.set_defaults(handler=_run)
