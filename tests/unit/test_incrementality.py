"""Holdout-based incrementality intervals and the population stability index."""

import numpy as np
import pandas as pd
import pytest

from mlpkg.evaluation.incrementality import incremental_lift, incremental_mean, psi, psi_by_column

pytestmark = pytest.mark.unit


def test_incremental_lift_point_values():
    res = incremental_lift(130, 1000, 100, 1000)
    assert res["rate_treated"] == pytest.approx(0.13)
    assert res["absolute_lift_pp"] == pytest.approx(3.0)
    assert res["relative_lift"] == pytest.approx(0.3)
    assert res["incremental_conversions"] == pytest.approx(30.0)
    assert res["ci_low"] < 0.03 < res["ci_high"]
    assert res["incremental_conversions_ci_low"] == pytest.approx(1000 * res["ci_low"])
    assert 0 < res["p_value"] < 0.1
    assert res["incremental_ci_high"] == res["incremental_conversions_ci_high"]
    with pytest.raises(ValueError):
        incremental_lift(11, 10, 0, 10)


def test_empty_groups_give_nan_instead_of_failing_the_report():
    empty = incremental_lift(0, 0, 5, 100)
    assert np.isnan(empty["absolute_lift"]) and np.isnan(empty["incremental_ci_low"])
    one = incremental_mean(np.array([10.0]), np.array([0.0, 5.0, 1.0]))
    assert one["difference"] == pytest.approx(8.0) and np.isnan(one["ci_low"])
    assert np.isnan(incremental_mean(np.array([]), np.array([1.0, 2.0]))["incremental_total"])
    assert np.isnan(psi(np.array([np.nan, np.nan]), np.array([1.0, 2.0])))


@pytest.mark.parametrize("method", ["newcombe", "wald"])
def test_incremental_lift_interval_covers_about_95_percent(method):
    rng = np.random.default_rng(0)
    reps, n_t, n_c, p_t, p_c = 400, 2000, 1000, 0.13, 0.10
    conv_t = rng.binomial(n_t, p_t, reps)
    conv_c = rng.binomial(n_c, p_c, reps)
    hits = 0
    for ct, cc in zip(conv_t, conv_c, strict=True):
        res = incremental_lift(int(ct), n_t, int(cc), n_c, method=method)
        hits += res["ci_low"] <= p_t - p_c <= res["ci_high"]
    assert 0.92 <= hits / reps <= 0.98


def test_incremental_mean_welch_interval_covers_and_scales():
    rng = np.random.default_rng(0)
    reps, hits = 400, 0
    for _ in range(reps):
        # Revenue: mostly zeros, skewed positive amounts; treated spend 2.0 more per customer on average.
        treated = rng.binomial(1, 0.2, 800) * rng.exponential(60.0, 800)
        control = rng.binomial(1, 0.2, 400) * rng.exponential(50.0, 400)
        res = incremental_mean(treated, control)
        hits += res["ci_low"] <= 2.0 <= res["ci_high"]
    assert 0.92 <= hits / reps <= 0.98
    scaled = incremental_mean(treated, control, treated_population=10_000)
    assert scaled["incremental_total"] == pytest.approx(10_000 * scaled["difference"])
    assert scaled["incremental_total_ci_low"] == pytest.approx(10_000 * scaled["ci_low"])


def test_psi_is_near_zero_for_same_distribution_and_large_for_shift():
    rng = np.random.default_rng(2)
    reference = rng.normal(size=10_000)
    assert psi(reference, rng.normal(size=10_000)) < 0.02
    assert psi(reference, rng.normal(0.8, 1.0, size=10_000)) > 0.2
    # Values outside the reference range and empty bins stay finite.
    assert np.isfinite(psi(reference, np.full(100, 50.0)))


def test_psi_by_column_handles_numeric_and_categorical():
    rng = np.random.default_rng(3)
    before = pd.DataFrame({"spend": rng.gamma(2, 10, 5000), "segment": rng.choice(["new", "vip"], 5000)})
    after = pd.DataFrame(
        {"spend": rng.gamma(2, 10, 5000), "segment": rng.choice(["new", "vip"], 5000, p=[0.1, 0.9])}
    )
    result = psi_by_column(before, after)
    assert result.index[0] == "segment"
    assert result["segment"] > 0.2 and result["spend"] < 0.05
