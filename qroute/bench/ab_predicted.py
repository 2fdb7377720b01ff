"""Predicted against measured, for ``qroute bench ab``: what the cost model priced each remote part of a qroute run
at (the decision log's ``predicted_us``, the predicate's cost of the mode it ran) against what the part measured
(its ``seconds``: a route's post and wait for its reply, a fetch's read to its attention). Parts, not phases: the
requester measures a part whole, so the phase split (probe, transfer, compute, return, merge) is the model's only.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from qroute.bench.ab_workload import percentiles

__all__ = ["DecisionTail", "predicted_vs_measured"]

PLOT_POINTS = 2000  # per decision, evenly spaced over the run's parts


class DecisionTail:
    """The decision-log records the instances of one cluster appended since the last ``take`` (the workers flush at
    the end of each step, so after ``flush_owner_stats`` every earlier part is on disk)."""

    def __init__(self, root: Path):
        self.root = root
        self._offsets: dict[Path, int] = {}

    def take(self) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self.root.glob("*.jsonl")):
            with path.open("rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next take
            self._offsets[path] = self._offsets.get(path, 0) + len(complete)
            records += [json.loads(line) for line in complete.splitlines() if line.strip()]
        return records


def predicted_vs_measured(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per decision: parts, predicted and measured medians (us), measured / predicted at p50 and p90, the share
    within 2x either way, and points for the plot. Parts that fell back to another replica or a fetch measure
    something other than their decision and are left out (counted)."""
    out: dict[str, Any] = {"fell_back": sum(1 for r in records if r["fell_back"])}
    for decision in ("route", "fetch"):
        parts = [r for r in records if r["decision"] == decision and not r["fell_back"] and r["predicted_us"] > 0]
        if not parts:
            continue
        predicted = [r["predicted_us"] for r in parts]
        measured = [r["seconds"] * 1e6 for r in parts]
        ratios = [m / p for m, p in zip(measured, predicted, strict=True)]
        spread = percentiles(ratios, scale=1.0)
        step = max(1, len(parts) // PLOT_POINTS)
        out[decision] = {
            "parts": len(parts),
            "predicted_us_p50": round(statistics.median(predicted), 2),
            "measured_us_p50": round(statistics.median(measured), 2),
            "measured_over_predicted_p50": spread["p50"], "measured_over_predicted_p90": spread["p90"],
            "within_2x": round(sum(1 for x in ratios if 0.5 <= x <= 2.0) / len(ratios), 3),
            "points": [[round(p, 2), round(m, 2)] for p, m in list(zip(predicted, measured, strict=True))[::step]],
        }  # fmt: skip
    return out
