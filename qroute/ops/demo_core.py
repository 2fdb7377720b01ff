"""The engine-free demo: two instances share a corpus through the real data plane.

Instance ``a`` (this process) holds its share of the corpus and asks; instance ``b`` is a separate owner
process holding the rest. The model is the copying model and each prompt the start of a line only ``b`` holds
(``demo_lines``). Each prompt is answered greedily by the reference model three times, with the corpus attended
by route, fetch and auto (the cost model's choice), and once by a single instance holding the whole corpus as a
cached prompt prefix (its exact prefill, with the prompt at global positions after it). The tokens must be
identical.
"""

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qroute.core.config import COMPARED_MODES
from qroute.numerics.rope import PositionShift

NUM_PROMPTS = 3


def default_corpus() -> Path:
    """A small real codebase that every CPython has: the stdlib ``sqlite3`` package (about 4.5 K tokens
    with the tiny model's tokenizer)."""
    import sqlite3

    return Path(sqlite3.__file__).parent


@dataclass
class ModeResult:
    tokens: list[list[int]] = field(default_factory=list)
    seconds_per_token: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def question_ids(model_dir: Path, question: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.no_grad()
def greedy(model, prompt: list[int], max_new: int, attend=None, position_shift: int = 0) -> tuple[list[int], float]:
    """Greedy tokens (recomputing the own tokens each step: this reference model keeps no own cache)."""
    tokens = list(prompt)
    start = time.perf_counter()
    for _ in range(max_new):
        ids = torch.tensor(tokens, dtype=torch.int64)
        logits = model.forward(ids, torch.arange(len(tokens)) + position_shift, attend)
        tokens.append(int(logits[-1].argmax()))
    return tokens[len(prompt) :], (time.perf_counter() - start) / max_new


def _sharded_attend(model, router, corpus_tokens: int):
    """Per layer: the own tokens' causal part merged with the corpus parts; planned once per step, the queries
    moved from own positions ``i`` to corpus positions ``corpus_tokens + i`` once per step too."""
    step = {}

    def attend(layer, q_nope, q_pe, own, q_positions):
        if layer == 0:
            step["plan"] = router.plan(q_nope.shape[0])
            step["shift"] = PositionShift(q_positions, q_positions + corpus_tokens, router.params.inv_freq,
                                          interleaved=router.params.interleaved, engine_table=False)  # fmt: skip
        own_part = model.self_attention(layer, q_nope, q_pe, own, q_positions)
        return router.run(layer, q_nope, step["shift"](q_pe), step["plan"], own=own_part)

    return attend


def run_core_demo(
    *, corpus: Path | None, transport: str, max_new: int, max_corpus_tokens: int | None, out=sys.stdout
) -> int:
    from transformers import AutoTokenizer

    from qroute.core.costmodel import load_fabric
    from qroute.dataplane.peering import connect_owners
    from qroute.dataplane.router import Router, RouterConfig
    from qroute.ops.demo_lines import WordBoundaries, pick_line_prompts
    from qroute.ops.owner_process import start_owner
    from qroute.reference.prepared import prefix_attend, prepare_corpus
    from qroute.reference.tinymodel import copy_model_dir
    from qroute.transport import get_transport

    torch.set_num_threads(1)  # the owner process needs the other core
    model_dir = copy_model_dir()
    corpus = corpus or default_corpus()
    instances = ["a", "b"]
    print(f"model: {model_dir}\ncorpus: {corpus}", file=out)
    prepared = prepare_corpus(model_dir, corpus, instances=instances, max_tokens=max_corpus_tokens)
    d = prepared.directory
    print(f"corpus: {d.num_tokens} tokens, {len(d.chunks)} chunks of {d.chunk_tokens} tokens; "
          f"a holds {len(d.chunks_of('a'))}, b holds {len(d.chunks_of('b'))}", file=out)  # fmt: skip
    secret = secrets.token_hex(16).encode()
    owner = start_owner(instance="b", transport=transport, model_dir=model_dir, corpus=corpus, instances=instances,
                        secret=secret, max_tokens=max_corpus_tokens)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lines = pick_line_prompts(prepared.token_ids.tolist(), d, asker="a", boundaries=WordBoundaries.of(tokenizer),
                              count=NUM_PROMPTS, continuation_tokens=max_new)  # fmt: skip
    results: dict[str, ModeResult] = {}
    try:
        kind = get_transport(transport)
        connections = connect_owners(
            kind,
            {"b": owner.address},
            instance_id="a",
            directory=d,
            model_fingerprint=prepared.fingerprint,
            compat=prepared.compat,
            secret=secret,
        )
        model, n = prepared.model, d.num_tokens
        prompts = [line.prompt for line in lines]
        reference = ModeResult()
        whole = prefix_attend(model, prepared.all_rows)  # one instance holding the corpus as a cached prefix
        for prompt in prompts:
            tokens, tpot = greedy(model, prompt, max_new, whole, position_shift=n)
            reference.tokens.append(tokens)
            reference.seconds_per_token.append(tpot)
        results["single instance"] = reference
        fabric = load_fabric(f"loopback-{transport}")
        for mode in COMPARED_MODES:
            router = Router(RouterConfig(instance_id="a", mode=mode), d, prepared.geometry, fabric,
                            prepared.params, connections, local_shard=prepared.shard("a"))  # fmt: skip
            result = ModeResult()
            attend = _sharded_attend(model, router, n)
            for prompt in prompts:
                tokens, tpot = greedy(model, prompt, max_new, attend)
                result.tokens.append(tokens)
                result.seconds_per_token.append(tpot)
            result.counts = dict(router.stats.snapshot().counters)
            results[mode] = result
        for connection in connections.values():
            connection.close()
    finally:
        owner.stop()
    return _report(results, lines, tokenizer, out)


def _report(results: dict[str, ModeResult], lines, tokenizer, out) -> int:
    reference = results["single instance"]
    for i, line in enumerate(lines):
        print(f"\nprompt: {tokenizer.decode(line.prompt)!r} (a line only {line.owner} holds)\n"
              f"the corpus goes on: {tokenizer.decode(line.continuation)!r}\n"
              f"single instance:    {tokenizer.decode(reference.tokens[i])!r}", file=out)  # fmt: skip
    print(f"\n{'mode':16s} {'identical':>9s} {'route':>6s} {'fetch':>6s} {'local':>6s} {'bytes moved':>12s} "
          f"{'s/token':>8s}", file=out)  # fmt: skip
    all_identical = True
    for mode, r in results.items():
        identical = r.tokens == reference.tokens
        all_identical &= identical
        c = r.counts
        tpot = sum(r.seconds_per_token) / len(r.seconds_per_token)
        print(f"{mode:16s} {str(identical):>9s} {c.get('route', 0):>6d} {c.get('fetch', 0):>6d} "
              f"{c.get('local', 0):>6d} {c.get('bytes_moved', 0):>12d} {tpot:>8.3f}", file=out)  # fmt: skip
    print("\nrouted, fetched and local attention reproduce the single instance" if all_identical
          else "\nMISMATCH: a sharded run differs from the single instance", file=out)  # fmt: skip
    return 0 if all_identical else 1
