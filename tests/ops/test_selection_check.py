"""Summary selection end to end through real ``vllm serve`` instances: the corpus sharded over three qroute
instances whose requests attend only to their top-k blocks per layer reproduces one qroute instance holding the
whole corpus and selecting the same way (tokens, and logprobs within ``TOLERANCE``), each run attending to fewer
owner groups than a dense one; and top-k of every block is the dense answer, which one stock instance gives."""

import pytest

from qroute.core.config import COMPARED_MODES
from qroute.ops.check import MIXED, TOLERANCE, run_check

INSTANCES = ["i0", "i1", "i2"]
TOPK = 2


@pytest.fixture(scope="module")
def selective(vllm, state_dir, tiny_fp32_model, sample_corpus):
    return run_check(tiny_fp32_model, sample_corpus, num_instances=len(INSTANCES), max_tokens=8, base_port=8480,
                     selector="summary", topk=TOPK)


@pytest.fixture(scope="module")
def every_block(vllm, state_dir, tiny_fp32_model, sample_corpus):
    return run_check(tiny_fp32_model, sample_corpus, num_instances=len(INSTANCES), max_tokens=4, base_port=8480,
                     selector="summary", topk=10_000)


@pytest.mark.parametrize("instance", INSTANCES)
@pytest.mark.parametrize("mode", [str(m) for m in COMPARED_MODES] + [MIXED])
def test_top_k_selection_reproduces_one_instance_selecting_the_same(selective, instance, mode):
    assert selective["reference_kind"] == "one qroute instance, same selection"
    assert all(n >= 2 for n in selective["chunks_per_instance"].values())  # every instance holds part of it
    run = selective["runs"][f"{instance}/{mode}"]
    assert run["tokens_identical"], (run["tokens"], selective["reference"]["tokens"])
    assert run["max_abs_dlogprob"] <= TOLERANCE and run["max_abs_dlogprob_prompt"] <= TOLERANCE
    counts, dense = run["qroute"], run["expected_operations"]
    assert counts["selection"] == {"selector": "summary", "topk": TOPK, "window": 0}
    total = counts["route"] + counts["fetch"] + counts["local"]
    assert total < dense["local"] + dense["remote"]  # fewer owner groups than attending to every block
    assert run["counts_ok"]


def test_selection_attended_remote_blocks_and_the_check_passed(selective):
    remote = sum(r["qroute"]["route"] + r["qroute"]["fetch"] for r in selective["runs"].values())
    assert remote > 0  # selected blocks of other instances were routed or fetched, not only local ones
    assert selective["negative_control_fails"] and selective["passed"]


def test_top_k_of_every_block_is_the_dense_answer(every_block):
    assert every_block["reference_kind"] == "stock instance"
    for run in every_block["runs"].values():
        assert run["tokens_identical"] and run["max_abs_dlogprob"] <= TOLERANCE, run
    assert every_block["passed"]
