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

from qroute.core.config import Selection

__all__ = ["COUNTERS", "QRouteStepMeta", "QRouteWorkerMeta", "RequestStep", "computed_block", "first_slot", "map_rows"]

# Per request and step: owner-layer operations by kind, bytes moved for it (its rows' share of a shared message),
# and how many of its operations also served other requests of the same step (one message for all of them).
COUNTERS = ("route", "fetch", "local", "bytes_moved", "shared")


@dataclass(frozen=True)
class RequestStep:
    """One request's corpus work in one step.

    ``visible_tokens``: corpus tokens ``[0, visible_tokens)`` its rows attend to (all ``N`` for a user
    request, ``chunk.start`` for a corpus-prefill request). ``position_shift``: corpus tokens in front of
    its own tokens (``N``, or ``chunk.start``); own token ``i`` sits at corpus position ``shift + i``.
    ``first_pos``: own position of the first scheduled token (vLLM's ``num_computed_tokens``).
    ``store_chunk``: corpus chunk whose latent rows this request's rows are (prefill), else None.
    ``computed_block``: paged-cache block holding the request's last computed token (own position
    ``first_pos - 1``), None on its first step or when failures are not reported (``kv_load_failure_policy``
    "recompute"). ``failed``: the request's corpus attention already failed; the worker only reports
    ``computed_block`` as a load error, which makes vLLM finish the request with FINISHED_ERROR.
    ``owner_modes``: (owner, mode) pairs deciding that owner's blocks instead of ``mode``. ``selection``: which
    corpus blocks it attends to (a corpus prefill always attends densely: its rows must be exact).
    """

    req_id: str
    corpus: str
    mode: str
    visible_tokens: int
    position_shift: int
    first_pos: int
    store_chunk: int | None = None
    computed_block: int | None = None
    failed: bool = False
    owner_modes: tuple[tuple[str, str], ...] = ()  # the request's per-owner overrides of ``mode``
    selection: Selection = Selection()


@dataclass
class QRouteStepMeta(KVConnectorMetadata):
    requests: dict[int, RequestStep] = field(default_factory=dict)  # slot of first scheduled token -> step


@dataclass
class QRouteWorkerMeta(KVConnectorWorkerMetadata):
    counts: dict[str, list[int]] = field(default_factory=dict)  # req_id -> COUNTERS
    stored: dict[str, int] = field(default_factory=dict)  # req_id -> corpus chunk fully stored this step
    errors: dict[str, str] = field(default_factory=dict)  # req_id -> first error

    def add(self, req_id: str, deltas: Sequence[int]) -> None:
        row = self.counts.setdefault(req_id, [0] * len(COUNTERS))
        for i, delta in enumerate(deltas):
            row[i] += delta

    def aggregate(self, other: KVConnectorWorkerMetadata) -> QRouteWorkerMeta:
        # Several workers (tensor parallel ranks) each report their own operations: sums.
        assert isinstance(other, QRouteWorkerMeta)
        merged = QRouteWorkerMeta({k: list(v) for k, v in self.counts.items()}, dict(self.stored), dict(self.errors))
        for req_id, row in other.counts.items():
            merged.add(req_id, row)
        merged.stored.update(other.stored)
        for req_id, error in other.errors.items():
            merged.errors.setdefault(req_id, error)
        return merged

    def __bool__(self) -> bool:
        return bool(self.counts or self.stored or self.errors)


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
