"""`qroute demo` through real ``vllm serve`` instances (one reference, then two sharing the corpus; about 3
minutes): the copying model continues lines only the other instance holds, exactly as one instance holding
everything does, in every mode; without the corpus it cannot; the report says so and exits 0."""

import io

import pytest

from qroute.core.config import COMPARED_MODES
from qroute.ops.demo_core import default_corpus
from qroute.ops.demo_vllm import NO_CORPUS, NUM_PROMPTS, _report, demo_answers

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def run(vllm, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QROUTE_STATE_DIR", str(tmp_path_factory.mktemp("qroute-state")))
        result = demo_answers(corpus=default_corpus(), transport="tcp", max_tokens=MAX_TOKENS, base_port=8700,
                              log=lambda _: None)  # fmt: skip
    assert result is not None
    return result


def test_the_reference_continues_each_line_from_the_other_instances_chunks(run):
    assert len(run.prompts) == NUM_PROMPTS
    for prompt, reference in zip(run.prompts, run.reference, strict=True):
        assert prompt.owner == "i1"
        assert reference["tokens"] == prompt.continuation


@pytest.mark.parametrize("mode", [str(m) for m in COMPARED_MODES])
def test_every_mode_reproduces_the_reference(run, mode):
    for answer, reference in zip(run.answers[mode], run.reference, strict=True):
        assert answer["tokens"] == reference["tokens"]
        assert answer["qroute"]["local"] > 0 and answer["qroute"]["route"] + answer["qroute"]["fetch"] > 0


def test_without_the_corpus_no_line_is_reproduced(run):
    for answer, prompt in zip(run.answers[NO_CORPUS], run.prompts, strict=True):
        assert answer["tokens"] != prompt.continuation


def test_the_report_compares_and_exits_0(run):
    out = io.StringIO()
    assert _report(run, out) == 0
    text = out.getvalue()
    assert text.count("identical") >= len(run.prompts) * len(COMPARED_MODES) and "differs, as it must" in text
    mismatched = type(run)(run.tokenizer, run.prompts, run.reference, dict(run.answers), run.seconds)
    wrong = dict(run.answers["route"][0], tokens=run.answers[NO_CORPUS][0]["tokens"])
    mismatched.answers["route"] = [wrong, *run.answers["route"][1:]]
    out = io.StringIO()
    assert _report(mismatched, out) == 1 and "MISMATCH: route" in out.getvalue()
