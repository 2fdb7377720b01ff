"""Fitting a ``FabricProfile`` to measured operation times, and checking the cost model against others.

Four kinds of measured operation (``Sample.op``), each a sum of cost-model terms (``qroute/core/costmodel.py``):

    compute  compute(B, n)                        = c_fixed + c_tok*n + c_th*B*H*n
    merge    merge(B)                             = m_fixed + m_row*B*H
    route    route_us   = route_fixed + B*H*(s_q+s_r)/bw + compute(B, n) + merge(B)
    fetch    fetch_us   = fetch_fixed + n*b/fetch_bw + gather*n_desc + compute(B, n)      (R = 1, no splice)

Every coefficient enters linearly (bandwidths as their inverse), so one non-negative least-squares problem
fits all of them together; each row is divided by its measured time, so the fit minimises relative error,
which is what a decision between two costs needs. ``route_fixed`` is ``probe_us + route_overhead_us`` and
``fetch_fixed`` is ``fetch_probe_us + fetch_overhead_us``: given the fabric's bare round trip, the fit
splits them. Predictions come from ``route_terms``/``fetch_terms`` themselves, never from the design matrix,
so a fit that disagreed with the model would show. Torch-free.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from qroute.core.costmodel import FabricProfile, Workload, fetch_terms, route_terms
from qroute.core.geometry import MLAGeometry
from qroute.errors import ConfigError

OPS = ("route", "fetch", "compute", "merge")
# Coefficients in the order of the design matrix's columns, in the profile's units.
COEFFICIENTS = (
    "route_fixed_us",
    "route_ns_per_byte",  # = 1 / bandwidth_gbps
    "fetch_fixed_us",
    "fetch_ns_per_byte",  # = 1 / fetch_bandwidth_gbps
    "gather_us_per_desc",
    "compute_us_fixed",
    "compute_ns_per_token",
    "compute_ns_per_token_head",
    "merge_us_fixed",
    "merge_ns_per_head_row",
)
MAX_BANDWIDTH_GBPS = 1e6  # written when a fit finds bytes free next to everything else (1/0)


@dataclass(frozen=True)
class Sample:
    """One measured (or predicted) point: an operation and its shape.

    ``desc_tokens``: tokens per READ descriptor of a fetch (the cost model's ``block_size``: a fetch of ``n``
    tokens moves ``ceil(n / desc_tokens)`` descriptors).
    """

    op: str
    batch: int
    heads: int
    tokens: int
    measured_us: float
    desc_tokens: int = 16

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"sample op {self.op!r} is not one of {OPS}")
        if not self.measured_us > 0:
            raise ConfigError(f"sample {self}: measured_us must be positive")

    def workload(self) -> Workload:
        return Workload(batch=self.batch, heads=self.heads, tokens=self.tokens, block_size=self.desc_tokens)


def features(sample: Sample, geometry: MLAGeometry) -> np.ndarray:
    """The sample's row of the design matrix: its time is ``features @ coefficients``."""
    b, h, n = sample.batch, sample.heads, sample.tokens
    rows = b * h
    x = dict.fromkeys(COEFFICIENTS, 0.0)
    if sample.op in ("compute", "route", "fetch") and n > 0:
        x["compute_us_fixed"] = 1.0
        x["compute_ns_per_token"] = n / 1e3
        x["compute_ns_per_token_head"] = rows * n / 1e3
    if sample.op in ("merge", "route"):
        x["merge_us_fixed"] = 1.0
        x["merge_ns_per_head_row"] = rows / 1e3
    if sample.op == "route":
        x["route_fixed_us"] = 1.0
        x["route_ns_per_byte"] = rows * (geometry.query_row_bytes + geometry.return_row_bytes) / 1e3
    if sample.op == "fetch":
        x["fetch_fixed_us"] = 1.0
        x["fetch_ns_per_byte"] = n * geometry.latent_bytes_per_token / 1e3
        x["gather_us_per_desc"] = math.ceil(n / sample.desc_tokens)
    return np.array([x[k] for k in COEFFICIENTS])


def predict_us(profile: FabricProfile, geometry: MLAGeometry, sample: Sample) -> float:
    """What the cost model says the sample's operation costs."""
    w = sample.workload()
    if sample.op == "route":
        return sum(route_terms(geometry, profile, w).values())
    if sample.op == "fetch":
        return sum(fetch_terms(geometry, profile, w).values())
    if sample.op == "compute":
        return profile.compute_us(w.batch, w.heads, w.tokens)
    return profile.merge_us(w.batch, w.heads)


def nnls(a: np.ndarray, b: np.ndarray, *, max_iter: int = 200) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0 (Lawson-Hanson active set; numpy only, for small problems)."""
    m, k = a.shape
    x = np.zeros(k)
    passive = np.zeros(k, dtype=bool)
    tol = 10 * np.finfo(float).eps * np.linalg.norm(a, 1) * max(m, k)
    for _ in range(max_iter):
        gradient = a.T @ (b - a @ x)
        if passive.all() or gradient[~passive].max(initial=-np.inf) <= tol:
            break
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        while True:
            z = np.zeros(k)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                x = z
                break
            # step back to the boundary and drop the coefficients that reached zero
            shrinking = passive & (z <= tol)
            gap = x[shrinking] - z[shrinking]
            alpha = np.min(np.where(gap > 0, x[shrinking] / np.where(gap > 0, gap, 1.0), 0.0))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def fit_coefficients(samples: Sequence[Sample], geometry: MLAGeometry) -> dict[str, float]:
    """Non-negative least squares of relative error over all samples."""
    if not samples:
        raise ConfigError("fit: no samples")
    a = np.stack([features(s, geometry) for s in samples])
    t = np.array([s.measured_us for s in samples])
    a = a / t[:, None]  # relative error: each row scaled by its own time
    used = np.abs(a).sum(axis=0) > 0
    scale = np.linalg.norm(a[:, used], axis=0)  # unit columns: coefficients span orders of magnitude
    coef = np.zeros(len(COEFFICIENTS))
    coef[used] = nnls(a[:, used] / scale, np.ones(len(samples))) / scale
    return dict(zip(COEFFICIENTS, (float(c) for c in coef), strict=True))


def profile_from_coefficients(
    coef: dict[str, float], *, name: str, probe_us: float | None = None, description: str = "", source: str = ""
) -> FabricProfile:
    """A profile holding the fitted coefficients. ``probe_us``: the fabric's bare round trip, if measured; the
    rest of the route's fixed cost is then ``route_overhead_us``."""
    route_fixed = coef["route_fixed_us"]
    probe = route_fixed if probe_us is None else min(probe_us, route_fixed)

    def bandwidth(ns_per_byte: float) -> float:
        return MAX_BANDWIDTH_GBPS if ns_per_byte <= 1.0 / MAX_BANDWIDTH_GBPS else 1.0 / ns_per_byte

    return FabricProfile(
        name=name,
        probe_us=probe,
        route_overhead_us=route_fixed - probe,
        bandwidth_gbps=bandwidth(coef["route_ns_per_byte"]),
        fetch_probe_us=coef["fetch_fixed_us"],
        fetch_bandwidth_gbps=bandwidth(coef["fetch_ns_per_byte"]),
        gather_us_per_desc=coef["gather_us_per_desc"],
        splice_us=0.0,
        compute_us_fixed=coef["compute_us_fixed"],
        compute_ns_per_token=coef["compute_ns_per_token"],
        compute_ns_per_token_head=coef["compute_ns_per_token_head"],
        merge_us_fixed=coef["merge_us_fixed"],
        merge_ns_per_head_row=coef["merge_ns_per_head_row"],
        description=description,
        source=source,
    )


def fit_profile(samples: Sequence[Sample], geometry: MLAGeometry, *, name: str, probe_us: float | None = None,
                description: str = "", source: str = "") -> FabricProfile:
    coef = fit_coefficients(samples, geometry)
    return profile_from_coefficients(coef, name=name, probe_us=probe_us, description=description, source=source)


def rounded(profile: FabricProfile, digits: int = 4) -> FabricProfile:
    """The profile with its coefficients to ``digits`` significant figures (for a readable YAML)."""
    def r(v: float) -> float:
        return float(f"{v:.{digits}g}")

    numeric = {k: r(v) for k, v in profile.to_dict().items() if isinstance(v, float)}
    return replace(profile, **numeric)


@dataclass(frozen=True)
class Check:
    """Predicted against measured for a set of samples."""

    points: list[dict]
    median_abs_error_pct: float
    per_op: dict[str, dict[str, float]]  # op -> median_abs_error_pct, max_abs_error_pct, points


def check(profile: FabricProfile, geometry: MLAGeometry, samples: Sequence[Sample]) -> Check:
    points = []
    for s in samples:
        predicted = predict_us(profile, geometry, s)
        points.append({
            "op": s.op, "batch": s.batch, "heads": s.heads, "tokens": s.tokens, "desc_tokens": s.desc_tokens,
            "measured_us": s.measured_us, "predicted_us": predicted,
            "error_pct": 100.0 * (predicted - s.measured_us) / s.measured_us,
        })  # fmt: skip
    per_op = {}
    for op in OPS:
        errs = [abs(p["error_pct"]) for p in points if p["op"] == op]
        if errs:
            per_op[op] = {"median_abs_error_pct": statistics.median(errs), "max_abs_error_pct": max(errs),
                          "points": len(errs)}  # fmt: skip
    # the headline is over the operations the cost model decides between
    headline = [abs(p["error_pct"]) for p in points if p["op"] in ("route", "fetch")]
    return Check(points, statistics.median(headline) if headline else math.nan, per_op)
