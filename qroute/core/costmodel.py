"""The cost model: five phases per remote owner and the closed-form route / fetch / local predicate.

Per layer and per owner, with ``B`` query rows bound for the owner, ``H`` heads per row, ``n``
selected corpus tokens held by the owner and ``R`` the expected number of steps that reuse
fetched blocks:

    T_route = probe + B*H*s_q/bw + compute(B, n) + B*H*s_r/bw + merge(B)     (+ route_overhead)
    T_fetch = (fetch_probe + n*b/fetch_bw + gather*n_desc + splice) / R + compute(B, n)  (+ fetch_overhead/R)
    T_local = compute(B, n)
    compute(B, n) = compute_fixed + n*per_token + B*H*n*per_token_head

``fetch_bw`` defaults to ``bw``: a one-sided READ and a routed message may move bytes at different
rates (on loopback a READ is one CMA copy, a routed row is copied several times in software).
``compute``'s per-token term is the cost of reading the selected rows, independent of the number
of query rows (decode attention is bound by reading the cache); the per-token-head term is the
arithmetic.

``probe`` is the round trip of a small message on the fabric (a route is one round trip; so is
a one-sided READ, which is why fetch pays one too). ``s_q``/``s_r``/``b`` come from
``MLAGeometry``. ``compute(B, n)`` is the same on owner and requester, so it cancels in the
route-versus-fetch comparison and the crossover has a closed form (see ``crossover_tokens``).

Torch-free and engine-free: the predicate runs on the host once per step (STYLE 6).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from qroute.core.geometry import MLAGeometry
from qroute.errors import ConfigError

FABRICS_DIR = Path(__file__).resolve().parents[2] / "configs" / "fabrics"


class Decision(StrEnum):
    ROUTE = "route"
    FETCH = "fetch"
    LOCAL = "local"


@dataclass(frozen=True)
class FabricProfile:
    """Measured or assumed coefficients of one fabric between a requester and an owner."""

    name: str
    probe_us: float  # small-message round trip
    bandwidth_gbps: float  # effective bandwidth, GB/s (1e9 bytes per second)
    gather_us_per_desc: float = 0.0  # cost per non-contiguous block a fetch moves
    splice_us: float = 0.0  # installing a fetched chunk where the engine's kernels can read it
    compute_us_fixed: float = 0.0  # attention launch cost
    compute_ns_per_token_head: float = 0.0  # attention cost per (query row x head x token)
    merge_us_fixed: float = 0.0
    merge_ns_per_head_row: float = 0.0
    fetch_probe_us: float | None = None  # small READ round trip; defaults to probe_us
    route_overhead_us: float = 0.0  # software cost per route on top of the fabric (framing, owner wake-up)
    fetch_overhead_us: float = 0.0  # software cost per fetch on top of the fabric
    description: str = ""
    source: str = ""
    # Appended fields (defaults keep older profiles valid):
    compute_ns_per_token: float = 0.0  # attention cost per selected token whatever the rows: reading its row
    fetch_bandwidth_gbps: float | None = None  # one-sided READ bandwidth, GB/s; defaults to bandwidth_gbps

    def __post_init__(self) -> None:
        if self.bandwidth_gbps <= 0:
            raise ConfigError(f"fabric {self.name!r}: bandwidth_gbps must be positive, got {self.bandwidth_gbps}")
        if self.fetch_bandwidth_gbps is not None and self.fetch_bandwidth_gbps <= 0:
            raise ConfigError(
                f"fabric {self.name!r}: fetch_bandwidth_gbps must be positive or absent, "
                f"got {self.fetch_bandwidth_gbps}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ConfigError(f"fabric {self.name!r}: {f.name} must be >= 0, got {value}")

    @property
    def read_probe_us(self) -> float:
        return self.probe_us if self.fetch_probe_us is None else self.fetch_probe_us

    @property
    def read_bandwidth_gbps(self) -> float:
        return self.bandwidth_gbps if self.fetch_bandwidth_gbps is None else self.fetch_bandwidth_gbps

    def transfer_us(self, num_bytes: float) -> float:
        return num_bytes / (self.bandwidth_gbps * 1e3)

    def read_us(self, num_bytes: float) -> float:
        """Time of the bytes of a one-sided READ (a fetch)."""
        return num_bytes / (self.read_bandwidth_gbps * 1e3)

    def compute_us(self, batch: int, heads: int, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        return (
            self.compute_us_fixed
            + self.compute_ns_per_token * tokens / 1e3
            + self.compute_ns_per_token_head * batch * heads * tokens / 1e3
        )

    def merge_us(self, batch: int, heads: int) -> float:
        return self.merge_us_fixed + self.merge_ns_per_head_row * batch * heads / 1e3

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def list_fabrics() -> list[str]:
    return sorted(p.stem for p in FABRICS_DIR.glob("*.yaml"))


def load_fabric(name_or_path: str | Path) -> FabricProfile:
    """Load a fabric profile by name (``configs/fabrics/NAME.yaml``) or from a YAML path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = FABRICS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown fabric {str(name_or_path)!r}: use a YAML path or one of {list_fabrics()}")
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(FabricProfile)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"fabric file {path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    data.setdefault("name", path.stem)
    try:
        return FabricProfile(**data)
    except TypeError as exc:
        raise ConfigError(f"fabric file {path}: {exc}") from exc


def save_fabric(profile: FabricProfile, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False))


@dataclass(frozen=True)
class Workload:
    """What one (owner, layer) step asks for."""

    batch: int  # B: query rows bound for the owner
    heads: int  # H: heads per row (heads on this TP rank)
    tokens: int  # n: selected tokens the owner holds
    reuse: float = 1.0  # R: expected steps that reuse fetched blocks (>= 1)
    block_size: int = 64  # tokens per cache block: a fetch moves ceil(n / block_size) descriptors
    resident: bool = False  # the blocks are already here (owned or cached)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.heads < 1 or self.tokens < 0:
            raise ConfigError(f"workload needs batch >= 1, heads >= 1, tokens >= 0; got {self}")
        if self.reuse < 1:
            raise ConfigError(f"reuse must be >= 1 (1 means no reuse), got {self.reuse}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")


@dataclass(frozen=True)
class Costs:
    """Each term in microseconds, and the decision they imply."""

    route: dict[str, float]  # probe, transfer, compute, return, merge
    fetch: dict[str, float]  # probe, transfer, gather, splice, compute (already divided by reuse)
    local_us: float
    decision: Decision

    @property
    def route_us(self) -> float:
        return sum(self.route.values())

    @property
    def fetch_us(self) -> float:
        return sum(self.fetch.values())


def route_terms(geometry: MLAGeometry, fabric: FabricProfile, w: Workload) -> dict[str, float]:
    rows = w.batch * w.heads
    return {
        "probe": fabric.probe_us + fabric.route_overhead_us,
        "transfer": fabric.transfer_us(rows * geometry.query_row_bytes),
        "compute": fabric.compute_us(w.batch, w.heads, w.tokens),
        "return": fabric.transfer_us(rows * geometry.return_row_bytes),
        "merge": fabric.merge_us(w.batch, w.heads),
    }


def fetch_terms(geometry: MLAGeometry, fabric: FabricProfile, w: Workload) -> dict[str, float]:
    num_desc = math.ceil(w.tokens / w.block_size)
    return {
        "probe": (fabric.read_probe_us + fabric.fetch_overhead_us) / w.reuse,
        "transfer": fabric.read_us(w.tokens * geometry.latent_bytes_per_token) / w.reuse,
        "gather": fabric.gather_us_per_desc * num_desc / w.reuse,
        "splice": fabric.splice_us / w.reuse,
        "compute": fabric.compute_us(w.batch, w.heads, w.tokens),
    }


def costs(geometry: MLAGeometry, fabric: FabricProfile, w: Workload) -> Costs:
    """All terms for one owner, and the closed-form decision: local if resident, else the cheaper
    of route and fetch (ties go to fetch, which leaves the owner idle)."""
    route = route_terms(geometry, fabric, w)
    fetch = fetch_terms(geometry, fabric, w)
    local_us = fabric.compute_us(w.batch, w.heads, w.tokens)
    if w.resident or w.tokens == 0:
        decision = Decision.LOCAL
    elif sum(route.values()) < sum(fetch.values()):
        decision = Decision.ROUTE
    else:
        decision = Decision.FETCH
    return Costs(route=route, fetch=fetch, local_us=local_us, decision=decision)


def decide(geometry: MLAGeometry, fabric: FabricProfile, w: Workload) -> Decision:
    return costs(geometry, fabric, w).decision


def crossover_tokens(
    geometry: MLAGeometry, fabric: FabricProfile, *, batch: int, heads: int, reuse: float = 1.0, block_size: int = 64
) -> float | None:
    """The ``n`` above which route beats fetch, from the terms that do not cancel.

    Route's fixed cost  ``a = probe + B*H*(s_q+s_r)/bw + merge(B)`` meets fetch's
    ``(read_probe + splice + n*(b/fetch_bw + gather/block_size)) / R``, with descriptors counted as
    ``n / block_size`` (the continuous form of ``ceil``). Returns 0.0 when route wins for every
    ``n`` and None when fetch does (no per-token fetch cost).
    """
    w = Workload(batch=batch, heads=heads, tokens=1, reuse=reuse, block_size=block_size)
    route = route_terms(geometry, fabric, w)
    fixed_route = route["probe"] + route["transfer"] + route["return"] + route["merge"]
    fixed_fetch = (fabric.read_probe_us + fabric.fetch_overhead_us + fabric.splice_us) / reuse
    per_token_bytes = fabric.read_us(geometry.latent_bytes_per_token)
    per_token_fetch = (per_token_bytes + fabric.gather_us_per_desc / block_size) / reuse
    if per_token_fetch <= 0:
        return None
    return max(0.0, (fixed_route - fixed_fetch) / per_token_fetch)
