"""The worker side's view of one engine step: each request's corpus work (``RequestRun``) and the groups of
requests that attend to the same blocks under the same modes and run together (``StepGroup``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qroute.connectors.vllm_meta import RequestStep
from qroute.core.config import Selection
from qroute.dataplane.plan import StepPlan
from qroute.numerics.rope import PositionShift


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
