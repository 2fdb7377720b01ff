"""One engine step as an engine adapter (vLLM's connector, SGLang's backend) hands it to ``CorpusWorker``: each
request's corpus work (``RequestStep`` in, ``RequestRun`` planned), the groups of requests that attend to the same
blocks under the same modes and run together (``StepGroup``), and what the step did for each request
(``StepReport``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qroute.core.config import Selection
from qroute.core.placement import CorpusDirectory
from qroute.dataplane.plan import StepPlan
from qroute.numerics.rope import PositionShift

__all__ = ["COUNTERS", "RequestRun", "RequestStep", "StepGroup", "StepReport", "batch_rows"]

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

    @classmethod
    def attending(cls, directory: CorpusDirectory, req_id: str, corpus: str, mode: str, first_pos: int, *,
                  prefill_chunk: int | None = None, computed_block: int | None = None,
                  owner_modes: tuple[tuple[str, str], ...] = (), selection: Selection | None = None) -> RequestStep:
        """The step of a request that attends to the corpus: a user request sees all of it after its own tokens;
        a corpus prefill of ``prefill_chunk`` sees the chunks before it, densely (the rows it stores must be
        exact), and its own tokens are that chunk's."""
        if prefill_chunk is None:
            visible = shift = directory.num_tokens
        else:
            visible = shift = directory.chunks[prefill_chunk].start
            selection = None
        return cls(req_id, corpus, mode, visible, shift, first_pos, prefill_chunk, computed_block=computed_block,
                   owner_modes=owner_modes, selection=selection or Selection())  # fmt: skip


@dataclass
class StepReport:
    """What one step did for each request: ``COUNTERS``, the corpus chunk it stored, its first error."""

    counts: dict[str, list[int]] = field(default_factory=dict)  # req_id -> COUNTERS
    stored: dict[str, int] = field(default_factory=dict)  # req_id -> corpus chunk fully stored this step
    errors: dict[str, str] = field(default_factory=dict)  # req_id -> first error

    def add(self, req_id: str, deltas: Sequence[int]) -> None:
        row = self.counts.setdefault(req_id, [0] * len(COUNTERS))
        for i, delta in enumerate(deltas):
            row[i] += delta

    def aggregate(self, other: StepReport) -> StepReport:
        # Several workers (tensor parallel ranks) each report their own operations: sums.
        assert isinstance(other, StepReport)
        merged = type(self)({k: list(v) for k, v in self.counts.items()}, dict(self.stored), dict(self.errors))
        for req_id, row in other.counts.items():
            merged.add(req_id, row)
        merged.stored.update(other.stored)
        for req_id, error in other.errors.items():
            merged.errors.setdefault(req_id, error)
        return merged

    def __bool__(self) -> bool:
        return bool(self.counts or self.stored or self.errors)


@dataclass
class RequestRun:
    """One request's corpus work for the current step (built in ``start_step``)."""

    step: RequestStep
    start: int  # first query row in the batch
    stop: int
    shift: PositionShift  # own positions -> shift + own positions
    attends: tuple | None = None  # what it attends to, (before_token, mode, owner_modes, selection); None: none
    store_rows: torch.Tensor | None = None  # shard rows of the first len(store_rows) query rows
    error: str | None = None


@dataclass
class StepGroup:
    """The requests of one step that attend to the same corpus blocks under the same modes: their rows go
    together, so each layer makes one router run (one message per owner) for all of them, decided once."""

    runs: list[RequestRun]
    rows: slice | torch.Tensor  # their rows of the batch, in order (a slice where they are adjacent)
    num_rows: int
    shift: PositionShift  # every member's shift, stacked
    plan: StepPlan  # every visible block (dense); a selecting group plans its selected blocks per layer
    selection: Selection = Selection()
    mode: str = "auto"
    owner_modes: tuple[tuple[str, str], ...] = ()
    visible_blocks: int = 0
    error: str | None = None


def batch_rows(runs: list[RequestRun]) -> slice | torch.Tensor:
    """The runs' rows of the batch, in order: a slice where they are adjacent."""
    if all(a.stop == b.start for a, b in zip(runs, runs[1:], strict=False)):
        return slice(runs[0].start, runs[-1].stop)  # a view, no gather
    return torch.cat([torch.arange(run.start, run.stop) for run in runs])
