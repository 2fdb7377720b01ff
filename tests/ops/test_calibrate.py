"""The calibration fit (pure functions, exact on synthetic timings) and ``qroute calibrate`` end to end."""

import json
from dataclasses import replace

import numpy as np
import pytest

from qroute.core.costfit import (
    COEFFICIENTS,
    Sample,
    check,
    features,
    fit_coefficients,
    fit_profile,
    nnls,
    predict_us,
)
from qroute.core.costmodel import FabricProfile, load_fabric
from qroute.core.geometry import MODELS_DIR, geometry_from_config
from qroute.ops.calibrate import full_sweep, quick_sweep
from qroute.ops.cli import main
from qroute.reference.tinymodel import build_tiny_model

TINY = geometry_from_config(
    {"model_type": "deepseek_v3", "num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 512,
     "qk_rope_head_dim": 64, "qk_nope_head_dim": 64, "v_head_dim": 64, "torch_dtype": "float32"},
    cache_dtype="float32", dtype="float32",
)  # fmt: skip
V32 = geometry_from_config(MODELS_DIR / "deepseek-v3.2.json")

# The held-out bound of the end-to-end calibration. Measured here: 2-5 % median error on a quiet machine, 20-30 %
# with other jobs on both cores. It stays stable under load because every point is a median over repetitions taken
# in a fresh random order each round (a slow spell spreads over all points rather than biasing one), and the
# headline is the median over points. 45 % is above the loaded figures yet below what a profile 2x too slow (100 %)
# or 2.5x too fast (60 %) gives, checked below on the same measurements.
HELD_OUT_BOUND_PCT = 45.0

# Every coefficient non-zero and distinct, so a fit that confused two of them would show.
KNOWN = FabricProfile(
    name="known", probe_us=9.0, route_overhead_us=31.0, bandwidth_gbps=2.5, fetch_probe_us=17.0,
    fetch_bandwidth_gbps=6.0, gather_us_per_desc=1.5, compute_us_fixed=40.0, compute_ns_per_token=90.0,
    compute_ns_per_token_head=12.0, merge_us_fixed=25.0, merge_ns_per_head_row=300.0,
)  # fmt: skip


def synthetic(points, geometry, profile=KNOWN):
    """Samples whose 'measured' time is exactly what the cost model predicts with ``profile``."""
    out = []
    for pt in points:
        s = Sample(pt.op, pt.batch, 4, pt.tokens, 1.0, desc_tokens=16 * pt.run_blocks)
        out.append(replace(s, measured_us=predict_us(profile, geometry, s)))
    return out


@pytest.mark.parametrize("geometry", [TINY, V32], ids=["tiny-fp32", "v3.2-fp8"])
@pytest.mark.parametrize("sweep", [full_sweep(), quick_sweep()], ids=["full", "quick"])
def test_fit_recovers_known_coefficients_exactly(geometry, sweep):
    samples = synthetic(sweep.fit, geometry)
    fitted = fit_profile(samples, geometry, name="fit", probe_us=KNOWN.probe_us)
    for field in ("probe_us", "route_overhead_us", "bandwidth_gbps", "fetch_probe_us", "fetch_bandwidth_gbps",
                  "gather_us_per_desc", "compute_us_fixed", "compute_ns_per_token", "compute_ns_per_token_head",
                  "merge_us_fixed", "merge_ns_per_head_row"):  # fmt: skip
        assert getattr(fitted, field) == pytest.approx(getattr(KNOWN, field), rel=1e-6), field
    # and it predicts points it never saw, exactly
    held = check(fitted, geometry, synthetic(sweep.held_out, geometry))
    assert held.median_abs_error_pct == pytest.approx(0.0, abs=1e-6)
    assert max(abs(p["error_pct"]) for p in held.points) < 1e-6


def test_design_matrix_is_the_cost_model():
    # features @ coefficients must be what route_terms / fetch_terms add up to, for every kind of point
    coef = fit_coefficients(synthetic(full_sweep().fit, TINY), TINY)
    vector = np.array([coef[k] for k in COEFFICIENTS])
    for s in synthetic(full_sweep().held_out, TINY):
        assert features(s, TINY) @ vector == pytest.approx(s.measured_us, rel=1e-9)


def test_zero_coefficients_stay_zero_and_never_go_negative():
    profile = replace(KNOWN, gather_us_per_desc=0.0, merge_ns_per_head_row=0.0)
    rng = np.random.default_rng(0)
    noisy = [replace(s, measured_us=s.measured_us * (1 + 0.01 * rng.standard_normal()))
             for s in synthetic(full_sweep().fit, TINY, profile)]  # fmt: skip
    coef = fit_coefficients(noisy, TINY)
    assert all(v >= 0 for v in coef.values())
    assert coef["compute_us_fixed"] == pytest.approx(40.0, rel=0.1)


def test_nnls_matches_the_constrained_optimum():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([2.0, -1.0, 1.0])  # unconstrained optimum has x1 < 0
    x = nnls(a, b)
    assert x[1] == 0.0 and x[0] == pytest.approx(1.5)
    exact = np.array([0.5, 2.0, 0.0, 3.0])
    m = np.random.default_rng(1).random((12, 4))
    np.testing.assert_allclose(nnls(m, m @ exact), exact, atol=1e-10)


def test_bandwidth_with_no_measurable_byte_cost_is_finite():
    samples = synthetic(quick_sweep().fit, TINY, replace(KNOWN, bandwidth_gbps=1e9, fetch_bandwidth_gbps=1e9))
    fitted = fit_profile(samples, TINY, name="free-bytes")
    assert 0 < fitted.bandwidth_gbps <= 1e6 and 0 < fitted.fetch_bandwidth_gbps <= 1e6


def _have_nixl() -> bool:
    from qroute.errors import ConfigError
    from qroute.transport.nixl_agent import require_nixl

    try:
        require_nixl()
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("transport", ["tcp", pytest.param("nixl", marks=pytest.mark.skipif(
    not _have_nixl(), reason="NIXL not installed"))])  # fmt: skip
def test_calibrate_quick_end_to_end(transport, tmp_path, capsys):
    out = tmp_path / f"{transport}.yaml"
    assert main(["calibrate", "--transport", transport, "--quick", "--json", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    profile = load_fabric(out)
    assert profile.name == f"loopback-{transport}-calibrated"
    assert "qroute calibrate" in profile.source and "held-out" in profile.source
    assert profile.to_dict() == report["profile"]
    assert profile.probe_us > 0 and profile.bandwidth_gbps > 0 and profile.compute_us_fixed >= 0
    if transport == "nixl":
        assert report["raw_probe_us"] > 0 and profile.probe_us <= report["raw_probe_us"] * 1.001  # 4 digits kept
    for op in ("route", "fetch"):
        assert report[op]["points"] > 0
    held = report["points"]["held_out"]
    assert {p["op"] for p in held} == {"route", "fetch", "compute", "merge"}
    assert all(p["measured_us"] > 0 and p["predicted_us"] > 0 for p in held)
    fit_shapes = {(p["op"], p["batch"], p["tokens"], p["desc_tokens"]) for p in report["points"]["fit"]}
    assert not fit_shapes & {(p["op"], p["batch"], p["tokens"], p["desc_tokens"]) for p in held}
    # The fit predicts the held-out *measured* sweep within HELD_OUT_BOUND_PCT, and the same measurements refute
    # a wrong profile: the bound can fail (see HELD_OUT_BOUND_PCT for why it is stable on a loaded machine).
    assert report["median_abs_error_pct"] <= HELD_OUT_BOUND_PCT, report["median_abs_error_pct"]
    samples = [Sample(p["op"], p["batch"], p["heads"], p["tokens"], p["measured_us"], desc_tokens=p["desc_tokens"])
               for p in held]  # fmt: skip
    geometry = geometry_from_config(build_tiny_model(dtype="float32"), cache_dtype="float32", dtype="float32")
    assert check(profile, geometry, samples).median_abs_error_pct == pytest.approx(report["median_abs_error_pct"],
                                                                                   rel=1e-3)  # fmt: skip
    for wrong in (_slower(profile, 2.0), _slower(profile, 0.4), load_fabric("ibgda-cx7")):
        assert check(wrong, geometry, samples).median_abs_error_pct > HELD_OUT_BOUND_PCT, wrong.name


def _slower(profile: FabricProfile, factor: float) -> FabricProfile:
    """``profile`` with every time ``factor`` times longer (so every prediction is ``factor`` times larger)."""
    times = ("probe_us", "route_overhead_us", "fetch_probe_us", "gather_us_per_desc", "compute_us_fixed",
             "compute_ns_per_token", "compute_ns_per_token_head", "merge_us_fixed", "merge_ns_per_head_row")
    return replace(profile, name=f"{profile.name} x{factor}",
                   **{f: getattr(profile, f) * factor for f in times},
                   bandwidth_gbps=profile.bandwidth_gbps / factor,
                   fetch_bandwidth_gbps=profile.fetch_bandwidth_gbps / factor)  # fmt: skip
