"""Off-policy estimators on a synthetic logged bandit with known reward probabilities."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mlpkg.evaluation.ope import (
    OPEWeightWarning,
    doubly_robust,
    evaluate_policy,
    ips,
    one_hot_policy,
    snips,
)

pytestmark = pytest.mark.unit

N_ARMS = 4
# Reward probability per (context, arm); the logged policy is uniform over the 4 arms.
REWARD_PROB = np.array(
    [
        [0.20, 0.40, 0.30, 0.50],
        [0.60, 0.30, 0.20, 0.40],
        [0.30, 0.35, 0.70, 0.10],
    ]
)
TARGET_ARM = np.array([3, 0, 2])  # the best arm per context
LOGGING_BEST_VALUE = REWARD_PROB[np.arange(3), TARGET_ARM].mean()  # 0.6, contexts equally likely


@pytest.fixture(scope="module")
def logged_bandit() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 50_000
    context = rng.integers(0, 3, n)
    arm = rng.integers(0, N_ARMS, n)
    reward = (rng.random(n) < REWARD_PROB[context, arm]).astype(float)
    return {"context": context, "arm": arm, "propensity": np.full(n, 1 / N_ARMS), "reward": reward}


def test_estimators_recover_the_value_of_a_different_deterministic_policy(logged_bandit):
    b = logged_bandit
    target = one_hot_policy(TARGET_ARM[b["context"]], N_ARMS)
    good_model = REWARD_PROB[b["context"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", OPEWeightWarning)  # uniform logging: weights are benign
        results = evaluate_policy(target, b["arm"], b["propensity"], b["reward"], good_model)
    assert set(results) == {"ips", "snips", "dr"}
    for res in results.values():
        assert res.value == pytest.approx(LOGGING_BEST_VALUE, rel=0.05), res
        assert res.ci_low <= LOGGING_BEST_VALUE <= res.ci_high, res
        assert res.warning is None
        assert res.max_weight == pytest.approx(N_ARMS)
        assert res.n == len(b["reward"])
    # The policy agrees with the log on 1/4 of the rows, each with weight 4: ESS = n / 4.
    assert results["ips"].effective_sample_size == pytest.approx(len(b["reward"]) / 4, rel=0.02)
    assert results["dr"].stderr < 0.8 * results["ips"].stderr
    # Without a reward model DR falls back to per-arm means and stays unbiased.
    fallback = evaluate_policy(target, b["arm"], b["propensity"], b["reward"])["dr"]
    assert fallback.value == pytest.approx(LOGGING_BEST_VALUE, rel=0.05)


def test_stochastic_target_policy(logged_bandit):
    b = logged_bandit
    n = len(b["reward"])
    target = np.tile([0.7, 0.1, 0.1, 0.1], (n, 1))
    truth = (REWARD_PROB @ target[0]).mean()
    rows = np.arange(n)
    assert ips(target[rows, b["arm"]], b["propensity"], b["reward"]).value == pytest.approx(truth, rel=0.05)
    assert snips(target[rows, b["arm"]], b["propensity"], b["reward"]).value == pytest.approx(truth, rel=0.05)
    dr = doubly_robust(target, b["arm"], b["propensity"], b["reward"], np.zeros((n, N_ARMS)))
    # A useless (all-zero) reward model reduces DR to IPS exactly.
    assert dr.value == pytest.approx(ips(target[rows, b["arm"]], b["propensity"], b["reward"]).value)


def test_extreme_weights_raise_a_warning():
    rng = np.random.default_rng(1)
    n = 2000
    propensity = np.where(np.arange(n) < 5, 0.001, 0.9)
    target = np.where(np.arange(n) < 5, 1.0, 0.0)
    reward = rng.random(n)
    with pytest.warns(OPEWeightWarning, match="max importance weight"):
        res = ips(target, propensity, reward)
    assert res.warning is not None and "effective sample size" in res.warning
    assert res.max_weight == pytest.approx(1000.0)
    assert res.effective_sample_size == pytest.approx(5.0)
    with pytest.warns(OPEWeightWarning):
        assert snips(target, propensity, reward).warning is not None


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="propensit"):
        ips(np.ones(3), np.array([0.5, 0.0, 0.5]), np.ones(3))
    with pytest.raises(ValueError, match="same length"):
        ips(np.ones(3), np.full(2, 0.5), np.ones(3))
    with pytest.raises(ValueError):
        one_hot_policy(np.array([0, 4]), 4)


@settings(max_examples=60, deadline=None)
@given(
    data=hnp.arrays(
        np.float64,
        st.integers(1, 200),
        elements=st.floats(0.001, 1.0, allow_nan=False, allow_infinity=False),
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_ips_with_target_equal_to_logging_policy_is_the_plain_mean(data, seed):
    reward = np.random.default_rng(seed).normal(0, 50, data.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OPEWeightWarning)
        res = ips(data, data, reward)
    assert res.value == pytest.approx(float(np.mean(reward)), rel=1e-12, abs=1e-12)
    assert res.max_weight == 1.0
    assert res.effective_sample_size == pytest.approx(data.size)
