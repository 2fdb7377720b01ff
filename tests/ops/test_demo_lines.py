"""The demo's prompts (qroute.ops.demo_lines): lines another instance holds, whose continuation the corpus
decides."""

from qroute.core.placement import build_directory
from qroute.ops.demo_lines import CONTEXT, WordBoundaries, pick_line_prompts

NEWLINE, SPACE_WORD = 1, 2
BOUNDARIES = WordBoundaries(line_breaks=frozenset({NEWLINE}), word_starts=frozenset({SPACE_WORD}))


def _directory(ids: list[int]):
    return build_directory("c", ids, instances=["a", "b"], model_fingerprint="fp", blocks_per_chunk=2)


def _pick(ids: list[int], asker: str = "a"):
    return pick_line_prompts(ids, _directory(ids), asker=asker, boundaries=BOUNDARIES, count=100, prompt_tokens=4,
                             continuation_tokens=4)  # fmt: skip


def _lines(num_lines: int, width: int = 12) -> list[int]:
    """Lines of distinct tokens (every context unique), each ended by a newline."""
    ids, next_id = [], 10
    for _ in range(num_lines):
        ids += list(range(next_id, next_id + width)) + [NEWLINE]
        next_id += width
    return ids


def test_prompts_are_line_starts_in_chunks_the_asker_does_not_hold():
    ids = _lines(40)
    directory = _directory(ids)
    prompts = _pick(ids)
    held_by_b = [c for c in directory.chunks if "a" not in c.owners]
    assert prompts and len(held_by_b) >= 2
    assert len(prompts) == len({directory.chunk_for_token(p.start).chunk_id for p in prompts}) <= len(held_by_b)
    for p in prompts:
        assert "a" not in directory.chunk_for_token(p.start).owners and p.owner == "b"
        assert ids[p.start - 1] == NEWLINE
        assert p.prompt == ids[p.start:p.start + 4] and p.continuation == ids[p.start + 4:p.start + 8]
    few = pick_line_prompts(ids, directory, asker="a", boundaries=BOUNDARIES, count=2, prompt_tokens=4,
                            continuation_tokens=4)  # fmt: skip
    assert len(few) == 2 and few[0].start < few[1].start


def test_a_continuation_the_other_instances_do_not_decide_is_never_asked():
    ids = _lines(40)
    target = _pick(ids)[0]
    last = target.start + 7  # the continuation's last token
    context = ids[last - CONTEXT:last]
    # Elsewhere the same context goes on differently: the corpus does not decide the answer.
    ambiguous = ids + context + [9]
    assert target.start not in {p.start for p in _pick(ambiguous)}
    # The same context, going on the same way, also in a chunk the asker holds: its own part could answer.
    echoed = list(ids)
    held = next(c for c in _directory(ids).chunks if c.owners == ("a",))
    echoed[held.start + 1:held.start + 1 + CONTEXT + 1] = context + [ids[last]]
    assert len(echoed) == len(ids)
    assert target.start not in {p.start for p in _pick(echoed)}
    # The same prompt text twice (a shared licence header) is asked once.
    prompts = [tuple(p.prompt) for p in _pick(ids + ids)]
    assert len(prompts) == len(set(prompts))
