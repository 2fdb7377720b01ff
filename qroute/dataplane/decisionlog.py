"""The decision log: every remote part a requester ran, its planned decision and how long it took, one JSON line
each in ``<dir>/<instance id>.jsonl`` when ``QROUTE_DECISION_LOG=<dir>`` is set (off by default).

A diagnostic: ``qroute bench sparse`` reads which way ``auto`` decided each owner's parts, to count the decisions
that differ from the route/fetch assignment that measured fastest; the times show where a layer's time goes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DECISION_LOG_ENV = "QROUTE_DECISION_LOG"


@dataclass(frozen=True)
class PartTiming:
    """What one remote part of one layer cost the requester (``Router.run``): a route, the time it spent posting
    it and then blocked waiting for its reply (the local and fetched parts computed while it flew are not counted:
    that overlap is what routing buys); a fetch, from its read to its attention."""

    layer: int
    owner: str  # the group's first replica
    decision: str  # as planned
    tokens: int
    rows: int
    seconds: float
    fell_back: bool  # it ran on another replica or as a fetch: not a measure of its decision
    predicted_us: float = 0.0  # what the predicate priced the decision at (before the peer's measured ratio)


class DecisionLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", buffering=1 << 16)

    @classmethod
    def from_env(cls, instance_id: str) -> DecisionLog | None:
        root = os.environ.get(DECISION_LOG_ENV)
        return cls(Path(root) / f"{instance_id}.jsonl") if root else None

    def write(self, timings: list[PartTiming], **tags: Any) -> None:
        """One line per timing, with ``tags`` (e.g. the requested mode and selection); empties ``timings``."""
        for timing in timings:
            self._file.write(json.dumps({**dataclasses.asdict(timing), **tags}) + "\n")
        timings.clear()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_decision_log(path: Path) -> list[dict[str, Any]]:
    """The records of a decision log (none if it was never written)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
