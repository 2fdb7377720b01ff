"""End to end through real ``vllm serve`` instances: the corpus sharded over two qroute instances
reproduces one stock instance holding corpus + question (DESIGN.md section 5), in every mode; an
unknown corpus is an HTTP 400. One reference instance, then two qroute instances (about 3 minutes)."""

import pytest

from qroute.ops.check import TOLERANCE, run_check


@pytest.fixture(scope="module")
def report(vllm, tiny_fp32_model, sample_corpus, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("QROUTE_STATE_DIR", str(tmp_path_factory.mktemp("qroute-state")))
    return run_check(tiny_fp32_model, sample_corpus, num_instances=2, max_tokens=8, base_port=8450)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("mode", ["route", "fetch", "auto"])
def test_sharded_corpus_reproduces_single_instance(report, mode):
    result = report["modes"][mode]
    assert result["tokens_identical"], (result["tokens"], report["reference"]["tokens"])
    assert result["max_abs_dlogprob"] <= TOLERANCE
    counts = result["qroute"]
    assert counts is not None and counts["corpus"] == "corpus"
    if mode in ("route", "fetch"):
        # The other instance holds part of the corpus, so every layer reached it in this mode.
        assert counts[mode] > 0
        assert counts["fetch" if mode == "route" else "route"] == 0
    assert counts["bytes_moved"] > 0


def test_unknown_corpus_is_a_400(report):
    assert report["unknown_corpus"]["status"] == 400
    assert "no-such-corpus" in report["unknown_corpus"]["message"]
