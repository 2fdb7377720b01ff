"""The demo's questions: "continue this text", for lines that only another instance holds.

The copying model (``qroute.reference.copymodel``) emits the token that followed the last three tokens
wherever they occur in its context. A line is a fair question when every token of the wanted continuation
follows a three-token context that the whole corpus always continues the same way, and that occurs only in
chunks the asking instance does not hold: then the other instances' part of the corpus alone decides the answer,
a single instance holding everything reproduces the line, and one without the corpus cannot.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from qroute.core.placement import CorpusDirectory

CONTEXT = 3  # the copying model matches on the last three tokens


@dataclass(frozen=True)
class LinePrompt:
    start: int  # corpus position of the prompt's first token
    prompt: list[int]
    continuation: list[int]  # what the corpus has after the prompt
    owner: str  # the instance holding the line's chunk


@dataclass(frozen=True)
class WordBoundaries:
    line_breaks: frozenset[int]  # tokens holding a newline (byte-level BPE merges indentation into them)
    word_starts: frozenset[int]  # tokens starting with a space

    @classmethod
    def of(cls, tokenizer) -> WordBoundaries:
        texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        return cls(frozenset(i for i, t in enumerate(texts) if "\n" in t),
                   frozenset(i for i, t in enumerate(texts) if t.startswith(" ") and t.strip()))  # fmt: skip


def pick_line_prompts(
    token_ids: Sequence[int],
    directory: CorpusDirectory,
    *,
    asker: str,
    boundaries: WordBoundaries,
    count: int,
    prompt_tokens: int = 8,
    continuation_tokens: int = 8,
) -> list[LinePrompt]:
    """Up to ``count`` prompts of ``prompt_tokens`` starting at a word in a chunk ``asker`` does not hold, whose
    next ``continuation_tokens`` only the other instances' chunks decide (each follows a context the corpus always
    continues that way and the asker's chunks never hold); at most one per chunk, line starts first, spread over
    the corpus."""
    ids = list(token_ids)
    followers: dict[tuple[int, ...], set[int]] = defaultdict(set)  # context -> the tokens that follow it
    on_asker: set[tuple[int, ...]] = set()  # contexts that occur in a chunk the asker holds
    for i in range(CONTEXT, len(ids)):
        context = tuple(ids[i - CONTEXT:i])
        followers[context].add(ids[i])
        if asker in directory.chunk_for_token(i).owners:
            on_asker.add(context)

    def decided_elsewhere(i: int) -> bool:
        context = tuple(ids[i - CONTEXT:i])
        return len(followers[context]) == 1 and context not in on_asker
    span = prompt_tokens + continuation_tokens
    candidates: list[LinePrompt] = []
    seen: set[tuple[int, ...]] = set()  # files often share text (a licence header): ask each prompt once
    for chunk in directory.chunks:
        if asker in chunk.owners:
            continue
        starts = [i for i in range(max(chunk.start, 1), chunk.end - span) if ids[i] not in boundaries.line_breaks
                  and (ids[i - 1] in boundaries.line_breaks or ids[i] in boundaries.word_starts)]  # fmt: skip
        starts.sort(key=lambda i: ids[i - 1] not in boundaries.line_breaks)  # stable: line starts first
        for start in starts:
            wanted = range(start + prompt_tokens, start + span)  # the positions the model must copy
            prompt = tuple(ids[start:start + prompt_tokens])
            if prompt not in seen and all(decided_elsewhere(i) for i in wanted):
                seen.add(prompt)
                candidates.append(LinePrompt(start, ids[start:start + prompt_tokens],
                                             ids[start + prompt_tokens:start + span], chunk.owners[0]))  # fmt: skip
                break
    if len(candidates) <= count:
        return candidates
    stride = len(candidates) / count
    return [candidates[int(k * stride)] for k in range(count)]
