"""The redemption model: what a contact costs in coupons, and how the allocator and the pyfunc use it."""

from __future__ import annotations

from datetime import UTC, datetime

import joblib
import numpy as np
import pandas as pd
import pytest

from mlpkg.allocation.campaign import build_catalog, option_economics
from mlpkg.models.baseline import fit_t_learner
from mlpkg.models.pyfunc import UpliftPyfunc, write_redemption_artifact, write_tlearner_artifacts
from mlpkg.models.redemption import FLOOR, fit_redemption

pytestmark = pytest.mark.unit

ARMS = ["control", "PCT10@email", "USD5@sms"]


def _logged(n: int = 6000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows where redemption depends on one feature and on the arm; returns the frame and true P(redeem)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    arm = rng.choice(ARMS, n)
    logit = -3.0 + 1.5 * x + np.where(arm == "USD5@sms", -1.0, 0.0)
    p = np.where(arm == "control", 0.0, 1 / (1 + np.exp(-logit)))
    redeemed = (rng.random(n) < p).astype(float)
    converted = np.maximum(redeemed, (rng.random(n) < 0.05).astype(float))
    frame = pd.DataFrame(
        {
            "x": x,
            "noise": rng.standard_normal(n),
            "region": rng.choice(["north", "south"], n),
            "arm": arm,
            "converted": converted,
            "revenue": converted * 50.0,
            "propensity": 1 / 3,
            "redeemed": redeemed,
        }
    )
    return frame, p


def test_no_model_without_recorded_redemptions_or_enough_of_them():
    frame, _ = _logged()
    assert fit_redemption(frame.drop(columns="redeemed"), ["x"], ["region"]) is None
    assert fit_redemption(frame.assign(redeemed=np.nan), ["x"], ["region"]) is None
    assert fit_redemption(frame.head(150), ["x"], ["region"]) is None  # under MIN_ROWS treated rows
    assert fit_redemption(frame.assign(redeemed=0.0), ["x"], ["region"]) is None  # nobody redeemed


def test_the_model_learns_who_redeems_and_through_which_arm():
    frame, _ = _logged(seed=1)
    model = fit_redemption(frame, ["x", "noise"], ["region"])
    assert model is not None and model.rows == int((frame["arm"] != "control").sum())
    fresh, truth = _logged(n=4000, seed=2)
    p = model.predict(fresh, ARMS)
    assert p.shape == (4000, 3) and p.dtype == np.float32
    assert (p[:, 0] == 0).all() and (p[:, 1:] >= FLOOR).all() and (p[:, 1:] <= 1).all()
    # Close to the truth for every customer under both arms, not only on average.
    for j, arm in enumerate(ARMS[1:], start=1):
        true = 1 / (1 + np.exp(-(-3.0 + 1.5 * fresh["x"] + (-1.0 if arm == "USD5@sms" else 0.0))))
        assert np.corrcoef(p[:, j], true)[0, 1] > 0.95
        assert abs(p[:, j].mean() - true.mean()) < 0.2 * true.mean()
    assert p[:, 2].mean() < p[:, 1].mean()  # the sms arm redeems less
    # An arm it never saw gets a prediction from the features alone (its coupon and channel unknown).
    unseen = model.predict(fresh, ["control", "FREESHIP@push"])
    assert np.isfinite(unseen).all() and (unseen[:, 1] >= FLOOR).all()


def _catalog():
    coupons = pd.DataFrame(
        {
            "coupon_id": ["PCT10", "USD5"],
            "kind": ["percent_off", "fixed_amount"],
            "face_value": [10.0, 5.0],
            "min_basket": [0.0, 0.0],
            "valid_from": ["2025-01-01", "2025-01-01"],
            "valid_to": ["2026-01-01", "2026-01-01"],
            "inventory": [100, 100],
            "issued": [0, 0],
        }
    )
    channels = pd.DataFrame(
        {"channel": ["email", "sms"], "send_cost": [0.01, 0.05], "daily_capacity": [100, 100]}
    )
    return build_catalog(ARMS, coupons, channels, datetime(2025, 6, 1, tzinfo=UTC))


def test_coupons_are_priced_at_the_redemption_probability_when_the_model_has_one():
    catalog = _catalog()
    p_conv = np.array([[0.10, 0.30, 0.20]], dtype=np.float32)
    revenue = np.full((1, 3), 50.0, dtype=np.float32)
    p_redeem = np.array([[0.0, 0.25, 0.02]], dtype=np.float32)
    _, every, uplift, _ = option_economics(
        p_conv, revenue, ARMS, catalog, objective="conversions", margin=0.3
    )
    _, priced, same, _ = option_economics(
        p_conv, revenue, ARMS, catalog, objective="conversions", margin=0.3, p_redeem=p_redeem
    )
    # Without a model every treated conversion redeems; with one, only the redeemed share costs,
    # and never less than the conversions the coupon causes (uplift 0.10 for USD5@sms: its
    # predicted 0.02 redemptions cannot pay for 0.10 extra orders).
    assert every[0].tolist() == pytest.approx([0.30 * 5.0 + 0.01, 0.20 * 5.0 + 0.05])
    assert priced[0].tolist() == pytest.approx([0.25 * 5.0 + 0.01, 0.10 * 5.0 + 0.05])
    assert np.array_equal(uplift, same)


def test_a_logged_model_scores_redemptions_beside_conversions(tmp_path):
    frame, _ = _logged(seed=3)
    learner = fit_t_learner(frame, ["x", "noise"], ["region"], ARMS, family="logistic", n_threads=1)
    redemption = fit_redemption(frame, ["x", "noise"], ["region"])
    artifacts = write_tlearner_artifacts(learner, tmp_path)
    path = write_redemption_artifact(redemption, tmp_path)
    with_model = UpliftPyfunc().load_artifacts(artifacts["config"], artifacts["weights"], path)
    without = UpliftPyfunc().load_artifacts(artifacts["config"], artifacts["weights"])
    fresh, _ = _logged(n=50, seed=4)
    scores = with_model.score_arrays(fresh)
    assert np.allclose(scores["p_redeem"], redemption.predict(fresh, with_model.arms))
    assert "p_redeem" not in without.score_arrays(fresh)
    out = with_model.predict(None, fresh)
    redeem_columns = [c for c in out.columns if c.startswith("p_redeem__")]
    assert redeem_columns == ["p_redeem__PCT10@email", "p_redeem__USD5@sms"]
    joblib.dump({"not": "a model"}, tmp_path / "bad.joblib")
    with pytest.raises(ValueError, match="does not hold a redemption model"):
        UpliftPyfunc().load_artifacts(artifacts["config"], artifacts["weights"], tmp_path / "bad.joblib")


def _per_channel(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Customers who redeem through the channel they engage with, and rarely through the other."""
    rng = np.random.default_rng(seed)
    email, sms = rng.exponential(1.0, n), rng.exponential(1.0, n)
    arm = rng.choice(ARMS, n)
    logit = (
        -3.5
        + np.where(arm == "PCT10@email", 3.0 * (email > 1), 0.0)
        + np.where(arm == "USD5@sms", 3.0 * (sms > 1), 0.0)
    )
    p = np.where(arm == "control", 0.0, 1 / (1 + np.exp(-logit)))
    redeemed = (rng.random(n) < p).astype(float)
    frame = pd.DataFrame({
        "email_opens": email, "sms_clicks": sms, "region": rng.choice(["north", "south"], n), "arm": arm,
        "converted": redeemed, "revenue": redeemed * 50.0, "propensity": 1 / 3, "redeemed": redeemed,
    })  # fmt: skip
    return frame, p


def test_a_channel_that_depends_on_engagement_with_it_is_learnt_by_the_family_that_can_say_so():
    frame, _ = _per_channel(9000, seed=5)
    model = fit_redemption(frame, ["email_opens", "sms_clicks"], ["region"])
    assert model.family == "gbm", model.validation_log_loss
    assert model.validation_log_loss["gbm"] < model.validation_log_loss["logistic"]
    # An e-mail reader who ignores SMS: likely to redeem by e-mail, unlikely by SMS (truth 0.38, 0.03).
    reader = pd.DataFrame({"email_opens": [3.0], "sms_clicks": [0.2], "region": ["north"]})
    p = model.predict(reader, ARMS)[0]
    assert p[1] > 0.25 and p[2] < 0.08
    # On the additive data of the other tests the families are compared too, and both recorded.
    linear = fit_redemption(_logged(seed=1)[0], ["x", "noise"], ["region"])
    assert set(linear.validation_log_loss) == {"logistic", "gbm"} and linear.family in {"logistic", "gbm"}
