"""The main demo: two ``vllm serve`` instances share a corpus and answer from the part the other one holds.

The model is the built-in copying model (``qroute.reference.copymodel``): asked to continue a piece of text, it
copies what follows that text in its context. Each prompt is the start of a line that only ``i1`` holds, asked on
``i0``. One stock instance holding the corpus as a plain prompt prefix answers first (the reference); then the
sharded cluster answers in modes route, fetch and auto, and once without the corpus. Printed per prompt: what the
corpus has, the reference's answer and each mode's, identical or not; then what each mode moved. The exit status
is 1 when any mode's tokens differ from the reference.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qroute.core.config import COMPARED_MODES
from qroute.ops.check import greedy_completion, reference_answers
from qroute.ops.cluster import ClusterSpec, start_cluster, stop_cluster
from qroute.ops.demo_lines import LinePrompt, WordBoundaries, pick_line_prompts

NUM_PROMPTS = 3
BLOCKS_PER_CHUNK = 4  # 64-token chunks: the instances' shares interleave, so many lines have a fair prompt
NO_CORPUS = "no corpus"
COUNTERS = ("route", "fetch", "local", "bytes_moved")


def _prompts(model_dir: Path, corpus: Path, spec: ClusterSpec, max_tokens: int):
    from transformers import AutoTokenizer

    from qroute.core.corpus import place_model_corpus

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    token_ids, directory = place_model_corpus(model_dir, corpus, name="corpus", instances=spec.instance_ids(),
                                              blocks_per_chunk=spec.blocks_per_chunk)  # fmt: skip
    prompts = pick_line_prompts(token_ids.tolist(), directory, asker=spec.instance_ids()[0],
                                boundaries=WordBoundaries.of(tokenizer), count=NUM_PROMPTS,
                                continuation_tokens=max_tokens)  # fmt: skip
    return tokenizer, token_ids.tolist(), directory, prompts


def _ask_all(url: str, prompts: list[LinePrompt], max_tokens: int, params: dict) -> tuple[list[dict[str, Any]], float]:
    """Every prompt at once (several requests share each engine step); the answers and the wall time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: greedy_completion(url, p.prompt, max_tokens, params), prompts))
    return answers, time.perf_counter() - start


@dataclass
class DemoRun:
    tokenizer: Any
    prompts: list[LinePrompt]
    reference: list[dict[str, Any]]  # the single instance's answer to each prompt
    answers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # mode or NO_CORPUS -> answers
    seconds: dict[str, float] = field(default_factory=dict)  # mode -> wall time of its prompts


def run_vllm_demo(*, corpus: Path, transport: str, max_tokens: int, base_port: int = 8200, out=sys.stdout) -> int:
    run = demo_answers(corpus=corpus, transport=transport, max_tokens=max_tokens, base_port=base_port,
                       log=lambda msg: print(msg, file=out))  # fmt: skip
    if run is None:
        print("no line of this corpus that i1 holds is decided by the corpus alone; try a larger corpus", file=out)
        return 1
    return _report(run, out)


def demo_answers(*, corpus: Path, transport: str, max_tokens: int, base_port: int, log) -> DemoRun | None:
    """The reference's and the cluster's answers to the demo's prompts (None: the corpus offers no prompt)."""
    from qroute.reference.tinymodel import copy_model_dir

    model_dir = copy_model_dir()
    spec = ClusterSpec(model_dir=model_dir, corpus_dir=corpus, num_instances=2, transport=transport,
                       base_port=base_port, blocks_per_chunk=BLOCKS_PER_CHUNK)  # fmt: skip
    tokenizer, corpus_ids, directory, prompts = _prompts(model_dir, corpus, spec, max_tokens)
    log(f"model: {model_dir} (the copying model)\ncorpus: {corpus}, {len(corpus_ids)} tokens in "
        f"{len(directory.chunks)} chunks")  # fmt: skip
    if not prompts:
        return None
    log(f"reference: one stock instance with the whole corpus as a prompt prefix, {len(prompts)} prompts")
    reference = reference_answers(model_dir, corpus_ids, [p.prompt for p in prompts], max_tokens,
                                  base_port=base_port, log=log)  # fmt: skip
    run = DemoRun(tokenizer, prompts, reference)
    state = start_cluster(spec, log=log)
    try:
        log(", ".join(f"{i.instance_id} at {i.url} holds {i.chunks} chunks" for i in state.instances))
        url = state.instances[0].url
        runs = {str(m): {"qroute": {"corpus": "corpus", "mode": str(m)}} for m in COMPARED_MODES}
        runs[NO_CORPUS] = {"qroute": {"corpus": None}}
        greedy_completion(url, prompts[0].prompt, 1, runs[str(COMPARED_MODES[0])])  # warm-up: not in a mode's time
        for name, params in runs.items():
            run.answers[name], run.seconds[name] = _ask_all(url, prompts, max_tokens, params)
    finally:
        stop_cluster(state)
    return run


def _report(run: DemoRun, out) -> int:
    prompts, reference, answers, seconds = run.prompts, run.reference, run.answers, run.seconds

    def text(tokens: list[int]) -> str:
        return repr(run.tokenizer.decode(tokens))

    identical = {name: [a["tokens"] == r["tokens"] for a, r in zip(runs, reference, strict=True)]
                 for name, runs in answers.items()}  # fmt: skip
    for k, prompt in enumerate(prompts):
        print(f"\n[{k + 1}] asked on i0; the line is in a chunk only {prompt.owner} holds (corpus token "
              f"{prompt.start})\n  prompt:            {text(prompt.prompt)}\n"
              f"  the corpus goes on: {text(prompt.continuation)}\n"
              f"  single instance:   {text(reference[k]['tokens'])}", file=out)  # fmt: skip
        for name, runs in answers.items():
            same = "identical" if identical[name][k] else "DIFFERS"
            if name == NO_CORPUS:
                same = "differs, as it must" if not identical[name][k] else "same (the corpus did not matter here)"
            print(f"  {name + ':':18s} {text(runs[k]['tokens'])}  {same}", file=out)
    print(f"\n{'mode':10s} {'identical':>9s} {'route':>6s} {'fetch':>6s} {'local':>6s} {'bytes moved':>12s} "
          f"{'wall s':>7s}", file=out)  # fmt: skip
    for name, runs in answers.items():
        totals = {c: sum(int((a["qroute"] or {}).get(c, 0)) for a in runs) for c in COUNTERS}
        print(f"{name:10s} {str(all(identical[name])):>9s} {totals['route']:>6d} {totals['fetch']:>6d} "
              f"{totals['local']:>6d} {totals['bytes_moved']:>12d} {seconds[name]:>7.1f}", file=out)  # fmt: skip
    print("(counts: owner-layer operations over all prompts, asked at once; wall: the prompts of one mode)", file=out)
    mismatched = [name for name in answers if name != NO_CORPUS and not all(identical[name])]
    if mismatched:
        print(f"MISMATCH: {', '.join(mismatched)} differ from the single instance", file=out)
        return 1
    print("route, fetch and auto reproduce the single instance holding everything", file=out)
    return 0
