"""The soak's CI run: two real qroute instances over NIXL under four clients without pause for a minute (after a
warm-up that outlasts the first probe refresh), through completions and chat, streamed and not. The full run is
``qroute bench soak`` (30 minutes; its figures are in the issue notes). About 2.5 minutes."""

import pytest

from qroute.bench.soak import KINDS, LEAK_COUNTS, RSS_GROWTH_MAX, SoakSpec, run_soak


@pytest.fixture(scope="module")
def report(vllm, tiny_fp32_model, sample_corpus, state_dir):
    spec = SoakSpec(corpus_dir=sample_corpus, model_dir=tiny_fp32_model, minutes=1.0, warmup_s=35.0, concurrency=4,
                    instances=2, transport="nixl", base_port=8940)  # fmt: skip
    return run_soak(spec)


def test_no_errors_and_no_wrong_token_under_load(report):
    assert report["errors"] == 0, report["first_errors"]
    assert report["mismatches"] == 0, report["first_mismatches"]
    assert report["requests_main_run"] >= 100
    assert set(report["by_kind"]) == set(KINDS)


def test_nothing_leaks_and_rss_stays_flat(report):
    for name, r in report["instances"].items():
        assert r["leaks"] == {}, (name, r)
        assert r["rss_growth"] < RSS_GROWTH_MAX, (name, r["rss_growth"])
        assert r["after"]["nixl_registrations"] > 0 and r["after"]["nixl_remote_agents"] > 0  # NIXL really ran
        assert set(LEAK_COUNTS) <= set(r["after"])
    assert report["passed"]
