"""Expected coupon costs calibrated on what measured campaigns really paid."""

import numpy as np
import pandas as pd
import pytest

from mlpkg import stages
from mlpkg.allocation.campaign import allocate_campaign, read_offer, score_population
from mlpkg.allocation.cost_calibration import (
    FACTOR_BOUNDS,
    UNCALIBRATED,
    CostCalibration,
    calibrate,
    coupon_cost_calibration,
)
from mlpkg.data import training_frame
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.feedback import attribute_campaign
from mlpkg.gate import gate_economics
from mlpkg.simulator.lab import harness
from tests.fixtures import use_oracle

pytestmark = pytest.mark.unit


def _one(redemptions: int, realised: float, expected: float) -> dict:
    return {"redemptions": redemptions, "realised": realised, "expected": expected}


def _measured(costs: dict, factors: dict | None = None, pooled: float = 1.0) -> dict:
    summary = {"measurement": {"coupon_costs": costs}}
    if factors is not None:
        summary["cost_calibration"] = {"factors": factors, "pooled": pooled}
    return summary


def test_each_coupon_is_weighted_by_its_redemptions_against_the_pooled_ratio():
    summaries = [
        ("c2", _measured({"A": _one(30, 60.0, 100.0)})),
        # c1 priced B at half its model cost: 50 expected is 100 before calibration.
        ("c1", _measured({"B": _one(20, 50.0, 50.0)}, {"B": 0.5})),
    ]
    cal = calibrate(summaries, credibility=30.0)
    # Pooled: 110 paid on 200 expected (0.55), 50 redemptions against a credibility of 30.
    pooled = 1 + 50 / 80 * (0.55 - 1)
    assert cal.pooled == pytest.approx(pooled, abs=1e-4)
    assert cal.factor("A") == pytest.approx(pooled + 30 / 60 * (0.6 - pooled), abs=1e-4)
    assert cal.factor("B") == pytest.approx(pooled + 20 / 50 * (0.5 - pooled), abs=1e-4)
    assert cal.factor("never-sent") == cal.pooled
    assert cal.redemptions == 50 and cal.campaigns == ["c2", "c1"]


def test_a_calibration_that_was_right_is_kept_not_compounded():
    # The campaign priced A at 0.6 of the model's cost and paid exactly that: 0.6 stays.
    summaries = [("c1", _measured({"A": _one(10_000, 60.0, 60.0)}, {"A": 0.6}))]
    assert calibrate(summaries, credibility=30.0).factor("A") == pytest.approx(0.6, abs=0.01)


def test_few_redemptions_keep_the_cost_near_the_models_and_extremes_are_bounded():
    few = calibrate([("c1", _measured({"A": _one(1, 40.0, 10.0)}))], 30.0)
    assert 1.0 < few.factor("A") < 1.25
    many = calibrate([("c1", _measured({"A": _one(10**6, 1e6, 1.0)}))], 30.0)
    assert many.factor("A") == FACTOR_BOUNDS[1]
    nothing = calibrate([("c1", _measured({"A": _one(10**6, 0.0, 5.0)}))], 1)
    assert nothing.factor("A") == FACTOR_BOUNDS[0]


def test_campaigns_without_expected_costs_give_no_calibration():
    assert calibrate([], 30.0) == UNCALIBRATED
    assert calibrate([("c1", {"measurement": {"final": True}})], 30.0) == UNCALIBRATED
    assert calibrate([("c1", _measured({"A": _one(0, 0.0, 0.0)}))], 30.0) == UNCALIBRATED
    cal = CostCalibration(factors={"A": 0.7}, pooled=0.8, redemptions=12, campaigns=["c1"])
    assert CostCalibration.from_dict(cal.as_dict()) == cal and CostCalibration.from_dict(None) == UNCALIBRATED


def test_a_measured_campaign_calibrates_the_next_allocations_coupon_costs(ingested, monkeypatch):
    settings, engine = ingested
    assert settings.campaign.cost_calibration_campaigns == 0  # off unless asked for (see its description)
    settings.campaign.cost_calibration_campaigns = 4
    settings.campaign.cost_calibration_credibility = 1.0
    shop = harness.load_world(settings)
    use_oracle(monkeypatch, shop)
    now = shop.now.to_pydatetime()
    allocate_campaign(
        engine, settings, campaign_id="c1", as_of=now, run_key="t/1", model_uri="oracle", model_version="0",
        now=now, budget=80.0, objective="conversions",
    )  # fmt: skip
    stages.deliver(settings, "c1", now=now)
    batch = harness.simulate_responses(settings, "c1")
    later = now + pd.Timedelta(days=8)
    stages.ingest_feedback(settings, batch["feedback_dir"], now=later)
    stages.measure(settings, "c1", now=later)

    # The measurement keeps, per coupon, what the model-policy rows were expected to and did cost.
    rows = attribute_campaign(engine, "c1", settings.campaign.attribution_window_days)
    targeted = rows[(rows["policy"] == "model") & rows["coupon_id"].notna()]
    with session_scope(engine) as session:
        stored = q.get_campaign(session, "c1").summary["measurement"]["coupon_costs"]
        cal = coupon_cost_calibration(session, settings.campaign, before=later)
    assert set(stored) == set(targeted["coupon_id"])
    for coupon, part in targeted.groupby("coupon_id"):
        assert stored[coupon]["realised"] == pytest.approx(part["coupon_cost"].sum(), abs=1e-3)
        assert stored[coupon]["redemptions"] == int(part["redeem"].sum())
        assert stored[coupon]["expected"] == pytest.approx(part["expected_coupon_cost"].sum(), abs=1e-3)
    # The expected coupon cost is the ledger's expected spend less the channel's send cost.
    _, channels = read_offer(engine)
    send = targeted["channel"].map(channels.set_index("channel")["send_cost"])
    np.testing.assert_allclose(targeted["expected_coupon_cost"], targeted["expected_cost"] - send, atol=1e-6)
    assert cal == calibrate([("c1", {"measurement": {"coupon_costs": stored}})], 1.0)
    assert cal.campaigns == ["c1"] and cal.redemptions > 0 and cal.pooled != 1.0

    # The gate prices coupons the same way, at the campaign's own budget per customer of its population.
    frame = training_frame(engine, ["campaign:c1"]).head(150)
    arms = ["control", *sorted(set(targeted["arm"]))]
    econ = gate_economics(engine, settings, frame, arms)
    assert econ.budget == pytest.approx(80.0 * 150 / 600)
    settings.campaign.cost_calibration_campaigns = 0
    plain = gate_economics(engine, settings, frame, arms)
    settings.campaign.cost_calibration_campaigns = 4
    factors = [cal.factor(a.split("@")[0]) for a in econ.arms]
    np.testing.assert_allclose(econ.coupon_cost, plain.coupon_cost * factors, rtol=1e-6)

    # The next campaign's expected coupon cost is the model's times each coupon's factor.
    settings.campaign.cooldown_days = 0
    pop = score_population(engine, settings, as_of=later, model_uri="oracle", objective="conversions")
    settings.campaign.cost_calibration_campaigns = 0
    raw = score_population(engine, settings, as_of=later, model_uri="oracle", objective="conversions")
    assert pop.calibration == cal and raw.calibration == UNCALIBRATED
    send = pop.catalog.send_cost[None, :]
    factor = np.array([cal.factor(pop.catalog.coupon_ids[c]) for c in pop.catalog.option_coupon])
    np.testing.assert_allclose(pop.cost - send, (raw.cost - send) * factor[None, :], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(pop.value, raw.value)
