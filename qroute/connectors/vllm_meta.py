"""What the two sides of the qroute connector tell each other, once per engine step.

Scheduler -> worker (``QRouteStepMeta``, pickled into ``SchedulerOutput.kv_connector_metadata``): for each
scheduled request that attends to the corpus, keyed by the KV-cache **slot of its first scheduled token**
(unique within a step), a ``RequestStep``. The worker finds each request's query rows with ``map_rows``
(``slot_mapping[query_start_loc[:-1]]``), because nothing in vLLM 0.32's forward context carries request
ids (docs/vllm-internals.md (b)).

Worker -> scheduler (``QRouteWorkerMeta``, via ``build_connector_worker_meta``): per request, the owner-layer
operations of this step (route / fetch / local counts, bytes moved, operations shared with other requests),
stored corpus chunks and errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from qroute.dataplane.step import COUNTERS, RequestStep, StepReport

__all__ = ["COUNTERS", "QRouteStepMeta", "QRouteWorkerMeta", "RequestStep", "computed_block", "first_slot", "map_rows"]


@dataclass
class QRouteStepMeta(KVConnectorMetadata):
    requests: dict[int, RequestStep] = field(default_factory=dict)  # slot of first scheduled token -> step


@dataclass
class QRouteWorkerMeta(StepReport, KVConnectorWorkerMetadata):
    """The worker's ``StepReport``, as vLLM carries it to the scheduler (``aggregate``: tensor-parallel ranks)."""


def computed_block(block_ids: Sequence[int], num_computed_tokens: int, block_size: int) -> int | None:
    """Block of a request's last computed token (own position ``num_computed_tokens - 1``); None if none.

    vLLM's scheduler fails (policy "fail") a running request whose blocks among its first
    ``ceil(num_computed_tokens / block_size)`` (before this step) include a reported load-error block.
    """
    return block_ids[(num_computed_tokens - 1) // block_size] if num_computed_tokens > 0 else None


def first_slot(block_ids: Sequence[int], num_computed_tokens: int, block_size: int) -> int:
    """KV-cache slot of a request's first scheduled token (its own position ``num_computed_tokens``)."""
    return block_ids[num_computed_tokens // block_size] * block_size + num_computed_tokens % block_size


def map_rows(
    slot_mapping: Sequence[int], query_start_loc: Sequence[int], requests: Mapping[int, RequestStep]
) -> list[tuple[int, int, RequestStep]]:
    """``(first row, end row, step)`` of every request in the batch that has a step this time.

    ``slot_mapping [T]``, ``query_start_loc [num_reqs + 1]``: this step's attention metadata (host lists).
    """
    out = []
    for start, stop in zip(query_start_loc[:-1], query_start_loc[1:], strict=True):
        if stop > start:
            step = requests.get(int(slot_mapping[start]))
            if step is not None:
                out.append((int(start), int(stop), step))
    return out
