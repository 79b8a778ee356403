"""Fairness metrics on a planted campaign whose disparities are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlpkg.evaluation.fairness import group_fairness

pytestmark = pytest.mark.unit

# Planted truth: north is treated at 40%, south at 20% (exposure ratio 0.5); a coupon is worth 10
# in north and 5 in south per treated customer (value per customer 4 vs 1: ratio 0.25); the coupon
# lifts conversion by 0.10 in north and 0.05 in south over a 0.10 base (effect ratio 0.5).
TRUE = {"share_treated": 0.5, "coupon_value": 0.25, "incremental_rate": 0.5}


def _planted(n: int = 40_000, seed: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    region = rng.choice(["north", "south"], n)
    north = region == "north"
    policy = np.where(rng.random(n) < 0.3, "control", "model")
    targeted = rng.random(n) < np.where(north, 0.4, 0.2)
    treated = targeted & (policy == "model")
    p = 0.10 + treated * np.where(north, 0.10, 0.05)
    return pd.DataFrame({
        "region": region, "policy": policy, "treated": treated, "targeted": targeted,
        "converted": (rng.random(n) < p).astype(int),
        "coupon_value": treated * np.where(north, 10.0, 5.0),
    })  # fmt: skip


def test_planted_disparities_are_recovered_with_intervals_that_cover_them():
    result = group_fairness(_planted(), "region", n_boot=200)
    groups = {g["group"]: g for g in result["groups"]}
    assert set(groups) == {"north", "south"}
    assert groups["north"]["share_treated"] == pytest.approx(0.4, abs=0.01)
    assert groups["south"]["share_treated"] == pytest.approx(0.2, abs=0.01)
    assert groups["north"]["incremental_rate"] == pytest.approx(0.10, abs=0.02)
    assert groups["south"]["incremental_rate"] == pytest.approx(0.05, abs=0.02)
    for metric, truth in TRUE.items():
        d = result["disparity"][metric]
        assert d["min_group"] == "south" and d["max_group"] == "north"
        assert d["ratio"] == pytest.approx(truth, abs=0.1 if metric == "incremental_rate" else 0.03)
        low, high = d["ci"]
        assert low <= truth <= high  # the planted value, not the estimate
        assert high - low < 0.8
    north_ci = groups["north"]["incremental_rate_ci"]
    assert north_ci[0] <= 0.10 <= north_ci[1]


def test_parity_gives_ratios_near_one():
    frame = _planted().assign(coupon_value=lambda f: f["treated"] * 5.0)
    frame["targeted"] = np.random.default_rng(1).random(len(frame)) < 0.3
    frame["treated"] = frame["targeted"] & (frame["policy"] == "model")
    frame["coupon_value"] = frame["treated"] * 5.0
    result = group_fairness(frame, "region", n_boot=100)
    assert result["disparity"]["share_treated"]["ratio"] > 0.95
    assert result["disparity"]["coupon_value"]["ratio"] > 0.95


def test_an_effect_ratio_needs_positive_effects_in_every_group():
    frame = _planted()
    south = frame["region"] == "south"
    frame.loc[south & frame["treated"], "converted"] = 0  # coupons in the south now hurt
    result = group_fairness(frame, "region", n_boot=50)
    d = result["disparity"]["incremental_rate"]
    assert np.isnan(d["ratio"]) and d["min_group"] == "south"


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="coupon_value"):
        group_fairness(_planted().drop(columns="coupon_value"), "region")
