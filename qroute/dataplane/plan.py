"""What a requester's step plan is (``Router.plan`` makes it, ``Router.run`` runs it): the router's configuration,
and per step the corpus blocks of each owner group with their decision, and what running them needs, prepared
once per step rather than per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qroute.core.config import MODES
from qroute.core.costmodel import Decision
from qroute.dataplane.peer import Peer
from qroute.dataplane.shard import byte_ranges
from qroute.errors import ConfigError


@dataclass(frozen=True)
class RouterConfig:
    instance_id: str
    mode: str = "auto"
    timeout_s: float = 2.0
    cache_bytes: int = 0  # bounded cache of fetched blocks; 0 disables it

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {MODES}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class OwnerPart:
    """Blocks of one step that one owner group answers, and how; with what running it needs, prepared once per
    step rather than per layer: the local rows (``slots``) and each owner's READ ranges (``read_ranges``)."""

    block_ids: tuple[int, ...]
    decision: Decision
    owners: tuple[str, ...]  # replicas in preference order; empty for local blocks
    predicted_us: float = 0.0  # the predicate's cost of the decision (0 for local blocks)
    alternative_us: float | None = None  # the predicate's cost of the mode it rejected (None: the mode was forced)
    slots: torch.Tensor | range | None = field(default=None, compare=False, repr=False)  # local rows of the blocks
    _ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict, compare=False, repr=False)

    def read_ranges(self, peer: Peer, row_bytes: int) -> list[tuple[int, int]]:
        """Byte ranges of the blocks in ``peer``'s regions (computed on first use, then kept for the step)."""
        ranges = self._ranges.get(peer.instance_id)
        if ranges is None:
            ranges = self._ranges[peer.instance_id] = byte_ranges(peer.block_rows, self.block_ids, row_bytes)
        return ranges


@dataclass(frozen=True)
class StepPlan:
    corpus: str
    num_rows: int
    parts: tuple[OwnerPart, ...]


@dataclass
class RunItem:
    """One set of query rows for ``Router.run_many``: ``q_nope [T, H, R]`` / ``q_pe [T, H, P]`` (roped at corpus
    positions), its plan, its own part, and a ``tally`` that gets the operations run for it (route, fetch, local,
    fallbacks, bytes_moved), if one is given."""

    q_nope: torch.Tensor
    q_pe: torch.Tensor
    plan: StepPlan
    own: tuple[torch.Tensor, torch.Tensor] | None = None
    tally: dict[str, int] | None = None
