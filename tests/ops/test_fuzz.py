"""The fuzzer's CI run: a real owner service (reference prefill of the sample corpus) answers 5,000 broken calls,
in process, in batches with valid calls, and over a real TCP connection. The full run (10^5 cases and more) is
``qroute fuzz``; its figures are in the issue notes."""

import pytest

from qroute.core import wire
from qroute.ops.fuzz import fuzz_owner, run_fuzz


@pytest.fixture(scope="module")
def report(tiny_model_dir, sample_corpus):
    return fuzz_owner(tiny_model_dir, sample_corpus, 5000, seed=1)


def test_every_broken_call_gets_a_typed_answer_and_the_owner_keeps_serving(report):
    assert report.failures == []
    assert report.cases == 5000 and sum(report.outcomes.values()) == 5000
    assert report.over_tcp > 0 and report.batches > 0 and report.probes >= 5


def test_the_cases_reach_past_the_decoder(report):
    """Not just garbage that the decoder drops: hostile valid messages reach each of the owner's refusals, and
    some are honest enough to be answered."""
    for outcome in ("route_reply", "error:bad_request", "error:unknown_corpus", "error:deadline"):
        assert report.outcomes[outcome] > 0, report.outcomes
    assert 0 < report.decoded < report.cases


def test_the_fuzzer_reports_an_owner_that_raises(tiny_model_dir, sample_corpus):
    """A deliberately broken handler (a fake: the real one does not raise) must fail the run."""
    from qroute.reference.prepared import prepare_corpus

    service = prepare_corpus(tiny_model_dir, sample_corpus, instances=["a", "b"],
                             blocks_per_chunk=2).owner_service("b", b"s")  # fmt: skip
    real = service.handle

    def handle(payload: bytes) -> bytes:
        try:
            if isinstance(wire.decode(payload), wire.RouteRequest) and wire.decode(payload).corpus != "corpus":
                raise RuntimeError("boom")
        except wire.WireError:
            pass
        return real(payload)

    service.handle = handle
    broken = run_fuzz(service, 2000, seed=2)
    assert any("raised RuntimeError: boom" in f for f in broken.failures), broken.failures
