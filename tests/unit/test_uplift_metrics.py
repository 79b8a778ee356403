"""Uplift ranking metrics, calibration, plots and the T-learner baseline on planted effects."""

import numpy as np
import pandas as pd
import pytest

from mlpkg.evaluation.uplift_metrics import (
    auuc,
    calibration_table,
    consent_eligibility,
    expected_calibration_error,
    ipw_policy_value,
    multi_arm_auuc,
    multi_arm_qini,
    plot_calibration,
    plot_qini,
    plot_uplift_by_decile,
    qini_coefficient,
    qini_curve,
    uplift_at_k,
    uplift_by_decile,
)
from mlpkg.models.baseline import fit_t_learner

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def experiment() -> dict[str, np.ndarray]:
    """Randomised 50/50 experiment whose true uplift grows linearly with x (0 to 0.2)."""
    rng = np.random.default_rng(0)
    n = 20_000
    x = rng.uniform(0, 1, n)
    tau = 0.2 * x
    treated = rng.random(n) < 0.5
    y = (rng.random(n) < 0.1 + tau * treated).astype(float)
    return {"tau": tau, "treated": treated, "y": y, "rng": rng}


def test_oracle_ranking_beats_random_which_is_near_zero(experiment):
    tau, t, y, rng = experiment["tau"], experiment["treated"], experiment["y"], experiment["rng"]
    oracle = qini_coefficient(tau, t, y)
    # Analytic value for tau = 0.2 x, x ~ U(0, 1): 0.1 * (2/3) - 0.05 = 0.0167.
    assert oracle == pytest.approx(0.0167, abs=0.004)
    random_scores = [qini_coefficient(rng.random(len(y)), t, y) for _ in range(10)]
    assert abs(float(np.mean(random_scores))) < 0.003
    assert max(abs(q) for q in random_scores) < oracle / 2
    assert auuc(tau, t, y) > auuc(rng.random(len(y)), t, y)


def test_qini_is_antisymmetric_and_ties_are_not_split(experiment):
    tau, t, y = experiment["tau"], experiment["treated"], experiment["y"]
    q = qini_coefficient(tau, t, y)
    assert qini_coefficient(-tau, t, y) == pytest.approx(-q, abs=1e-12)
    assert qini_coefficient(tau, ~t, y) == pytest.approx(-q, abs=1e-12)
    # Ranking only matters: a monotone transform gives the same coefficient.
    assert qini_coefficient(np.exp(5 * tau), t, y) == pytest.approx(q, abs=1e-12)
    # A constant score is random targeting with no arbitrary tie order: exactly zero.
    assert qini_coefficient(np.zeros_like(tau), t, y) == 0.0
    fraction, curve = qini_curve(tau, t, y)
    assert fraction[0] == 0.0 and fraction[-1] == 1.0
    ate = y[t].mean() - y[~t].mean()
    assert curve[-1] == pytest.approx(ate)


def test_constant_propensity_weights_change_nothing_and_unbalanced_ipw_still_ranks(experiment):
    tau, t, y = experiment["tau"], experiment["treated"], experiment["y"]
    prop = np.where(t, 0.5, 0.5)
    assert qini_coefficient(tau, t, y, prop) == pytest.approx(qini_coefficient(tau, t, y), abs=1e-12)
    # Unequal logging shares that depend on x: weighting by 1/propensity keeps the oracle's qini.
    rng = np.random.default_rng(3)
    n = len(tau)
    p_treat = np.where(tau > 0.1, 0.8, 0.3)
    t2 = rng.random(n) < p_treat
    y2 = (rng.random(n) < 0.1 + tau * t2).astype(float)
    prop2 = np.where(t2, p_treat, 1 - p_treat)
    assert qini_coefficient(tau, t2, y2, prop2) == pytest.approx(0.0167, abs=0.005)


def test_uplift_at_k_and_deciles_follow_the_planted_effect(experiment):
    tau, t, y = experiment["tau"], experiment["treated"], experiment["y"]
    assert uplift_at_k(tau, t, y, 0.1) == pytest.approx(0.19, abs=0.04)
    assert uplift_at_k(tau, t, y, 1.0) == pytest.approx(y[t].mean() - y[~t].mean())
    table = uplift_by_decile(tau, t, y)
    assert list(table["decile"]) == list(range(1, 11))
    assert table["n"].sum() == len(y)
    assert table["predicted_uplift"].is_monotonic_decreasing
    assert table["observed_uplift"].iloc[0] > table["observed_uplift"].iloc[-1] + 0.1
    with pytest.raises(ValueError):
        uplift_at_k(tau, t, y, 0.0)


def test_ece_separates_calibrated_from_miscalibrated():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.05, 0.95, 20_000)
    y = (rng.random(p.size) < p).astype(float)
    assert expected_calibration_error(p, y) < 0.02
    assert expected_calibration_error(p**2, y) > 0.1
    table = calibration_table(p, y, n_bins=10)
    assert table["n"].sum() == p.size
    assert set(table.columns) >= {"mean_predicted", "observed_rate", "abs_gap"}
    # p == 1 must land in the last bin, not an extra one.
    assert calibration_table(np.array([1.0, 0.0]), np.array([1.0, 0.0]), 4)["bin"].tolist() == [0, 3]


def test_ipw_policy_value_and_multi_arm_qini():
    rng = np.random.default_rng(2)
    n, arms = 30_000, ["control", "A", "B"]
    x = rng.uniform(0, 1, n)
    logged = rng.integers(0, 3, n)
    p_true = np.column_stack([np.full(n, 0.1), 0.1 + 0.3 * x, np.full(n, 0.15)])
    y = (rng.random(n) < p_true[np.arange(n), logged]).astype(float)
    prop = np.full(n, 1 / 3)
    # Policy "always A" is worth E[0.1 + 0.3 x] = 0.25 per customer.
    chosen = np.array(["A"] * n)
    logged_names = np.array(arms)[logged]
    assert ipw_policy_value(chosen, logged_names, y, prop) == pytest.approx(0.25, rel=0.05)
    assert ipw_policy_value(np.ones(n, int), logged, y, prop, snips=False) == pytest.approx(0.25, rel=0.05)
    per_arm = multi_arm_qini(p_true, logged, y, prop, arms=arms)
    assert set(per_arm) == {"A", "B"}
    assert per_arm["A"] > 0.01  # heterogeneous arm ranked by its true effect
    assert abs(per_arm["B"]) < 0.005  # constant effect: ranking carries no information
    assert set(multi_arm_qini(p_true, logged, y, prop)) == {"1", "2"}


def _consent_campaign(n: int = 20_000) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """A campaign where only email-consented customers could get ``PCT10@email``; the rest are control.

    The unconsented customers convert at 40 % (a different crowd), the consented ones at 10 %,
    plus ``0.2 x`` under the coupon. The model's scores are the true probabilities.
    """
    rng = np.random.default_rng(5)
    arms = ["control", "PCT10@email", "USD5"]
    consent = rng.random(n) < 0.6
    x = rng.uniform(0, 1, n)
    # Consented customers draw among control and both arms, the others among control and USD5.
    logged = np.where(consent, rng.integers(0, 3, n), 2 * rng.integers(0, 2, n))
    propensity = np.where(consent, 1 / 3, 1 / 2)
    base = np.where(consent, 0.1, 0.4)
    p_conv = np.column_stack([base, base + 0.2 * x * consent, base + 0.05])
    y = (rng.random(n) < p_conv[np.arange(n), logged]).astype(np.int64)
    frame = pd.DataFrame(
        {
            "consent_email": consent.astype(np.int64),
            "arm": np.asarray(arms, dtype=object)[logged],
            "converted": y,
            "revenue": np.where(y > 0, 50.0, 0.0),
            "propensity": propensity,
        }
    )
    return frame, p_conv, arms


def test_consent_eligibility_reads_the_arms_channel():
    """An arm on a channel is open to the customers consented to it; an arm without one to everybody."""
    frame, _, arms = _consent_campaign(50)
    eligible = consent_eligibility(frame, arms)
    assert eligible.shape == (50, 2)
    np.testing.assert_array_equal(eligible[:, 0], frame["consent_email"].to_numpy() > 0)
    assert eligible[:, 1].all()
    # A channel without a consent column says nothing about reach.
    assert consent_eligibility(frame.drop(columns=["consent_email"]), arms).all()


def test_test_qini_uses_only_control_rows_the_arm_could_reach():
    """test/qini and per-arm Qini/AUUC ignore the control rows of customers without consent.

    Re-scoring the unconsented customers (who were never logged in the email arm) must not move
    the email arm's metrics; under the former definition (every control row) it does.
    """
    from mlpkg.train import compute_test_metrics, metric_key

    frame, p_conv, arms = _consent_campaign()
    logged = frame["arm"].map({a: i for i, a in enumerate(arms)}).to_numpy()
    y, prop = frame["converted"].to_numpy(float), frame["propensity"].to_numpy()
    consent = frame["consent_email"].to_numpy() > 0
    revenue = np.full_like(p_conv, 50.0)
    metrics = compute_test_metrics(frame, {"p_conv": p_conv, "revenue": revenue}, arms)

    rows = consent & np.isin(logged, [0, 1])
    score = p_conv[rows, 1] - p_conv[rows, 0]
    key = metric_key("test/qini", "PCT10@email")
    assert metrics[key] == pytest.approx(qini_coefficient(score, logged[rows] == 1, y[rows], prop[rows]))
    assert metrics[metric_key("test/auuc", "PCT10@email")] == pytest.approx(
        auuc(score, logged[rows] == 1, y[rows], prop[rows])
    )
    assert metrics["test/qini"] == pytest.approx(
        np.mean([metrics[key], metrics[metric_key("test/qini", "USD5")]])
    )
    assert metrics[key] > 0.01

    rescored = p_conv.copy()
    rescored[~consent, 1] = 0.9  # a large predicted uplift where the arm cannot reach anyone
    moved = compute_test_metrics(frame, {"p_conv": rescored, "revenue": revenue}, arms)
    for name in ("test/qini", key, metric_key("test/auuc", "PCT10@email")):
        assert moved[name] == pytest.approx(metrics[name])
    everyone = multi_arm_qini(p_conv, logged, y, prop, arms)["PCT10@email"]
    everyone_moved = multi_arm_qini(rescored, logged, y, prop, arms)["PCT10@email"]
    assert abs(everyone_moved - everyone) > 0.01
    # The per-arm AUUC helper takes the same rows as the Qini.
    restricted = multi_arm_auuc(p_conv, logged, y, prop, arms, eligible=consent_eligibility(frame, arms))
    assert restricted["PCT10@email"] == pytest.approx(metrics[metric_key("test/auuc", "PCT10@email")])


def test_plots_write_png_files(experiment, tmp_path):
    tau, t, y = experiment["tau"][:2000], experiment["treated"][:2000], experiment["y"][:2000]
    paths = [
        plot_qini(tau, t, y, tmp_path / "q" / "qini.png"),
        plot_calibration(np.clip(tau * 3, 0, 1), y, tmp_path / "cal.png"),
        plot_uplift_by_decile(tau, t, y, tmp_path / "dec.png"),
    ]
    for path in paths:
        assert path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def test_t_learner_recovers_planted_heterogeneous_effects():
    rng = np.random.default_rng(4)
    arms = ["control", "PCT10@email", "USD5@sms"]

    def customers(n: int) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "x1": rng.uniform(-1, 1, n),
                "x2": rng.normal(size=n),
                "segment": rng.choice(["new", "regular", "vip"], n),
            }
        )

    train = customers(4000)
    train["arm"] = rng.choice(arms, len(train), p=[0.4, 0.3, 0.3])
    train["propensity"] = train["arm"].map({"control": 0.4, "PCT10@email": 0.3, "USD5@sms": 0.3})
    # PCT10@email works only for x1 > 0, USD5@sms only for vips.
    effect_a = np.where(train["x1"] > 0, 0.25, 0.0) * (train["arm"] == arms[1])
    effect_b = np.where(train["segment"] == "vip", 0.2, 0.0) * (train["arm"] == arms[2])
    p = 0.1 + 0.05 * (train["x2"] > 0) + effect_a + effect_b
    train["converted"] = (rng.random(len(train)) < p).astype(int)

    # Fewer, larger boosting steps and one thread keep this unit test to about a second on a shared box.
    fast = {"max_iter": 60, "learning_rate": 0.15}
    model = fit_t_learner(train, ["x1", "x2"], ["segment"], arms, seed=0, params=fast, n_threads=1)
    test = customers(2000)
    probs = model.predict_proba_arms(test)
    assert probs.shape == (2000, 3) and np.all((probs >= 0) & (probs <= 1))
    uplift = probs[:, 1:] - probs[:, [0]]
    pos = test["x1"].to_numpy() > 0
    vip = test["segment"].to_numpy() == "vip"
    assert uplift[pos, 0].mean() - uplift[~pos, 0].mean() > 0.15
    assert uplift[vip, 1].mean() - uplift[~vip, 1].mean() > 0.12
    scored = model.score_frame(test)
    assert list(scored.columns) == [f"p_conv__{a}" for a in arms] + [f"uplift__{a}" for a in arms[1:]]
    # Unseen categories are treated as missing, not an error.
    test.loc[0, "segment"] = "never-seen"
    assert np.isfinite(model.predict_proba_arms(test.head(3))).all()
    with pytest.raises(ValueError):
        fit_t_learner(train, ["x1"], [], ["PCT10@email", "control"])
