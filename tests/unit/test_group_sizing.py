"""Control and exploration shares sized by what the campaign's measurement needs."""

from __future__ import annotations

import numpy as np
import pytest

from mlpkg.allocation.campaign import ArmCatalog, ScoredPopulation, size_groups
from mlpkg.config import CampaignSettings
from mlpkg.evaluation.incrementality import incremental_lift

pytestmark = pytest.mark.unit


def _population(
    n: int, effect: float, *, base: float = 0.08, seed: int = 0, options: int = 2
) -> ScoredPopulation:
    rng = np.random.default_rng(seed)
    arms = [f"C{j}@email" for j in range(options)]
    catalog = ArmCatalog(
        arms=arms, coupon_ids=[f"C{j}" for j in range(options)], channels=["email"],
        option_coupon=np.arange(options), option_channel=np.zeros(options, dtype=int),
        coupon_kind=np.array(["fixed"] * options), face_value=np.ones(options), min_basket=np.zeros(options),
        send_cost=np.full(options, 0.01), coupon_capacity=np.full(options, 10**9),
        channel_capacity=np.array([10**9]),
    )  # fmt: skip
    base_rate = np.clip(rng.normal(base, 0.02, n), 0.005, 0.5).astype(np.float32)
    uplift = np.clip(rng.normal(effect, effect / 4, (n, options)), 1e-4, 0.5).astype(np.float32)
    cost = np.full((n, options), 1.0, dtype=np.float32)
    return ScoredPopulation(
        ids=np.array([f"c{i:06d}" for i in range(n)], dtype=object), catalog=catalog, value=uplift.copy(),
        cost=cost, uplift=uplift, eligible=np.ones((n, options), dtype=bool), base_rate=base_rate,
    )  # fmt: skip


def test_a_cold_start_keeps_the_configured_shares():
    cfg = CampaignSettings()
    shares = size_groups(_population(2000, 0.05), cfg, budget=200.0, has_model=False)
    assert (shares.control, shares.exploration) == (cfg.control_share, cfg.exploration_share)


def test_a_strong_expected_effect_needs_a_smaller_control_group_than_a_weak_one():
    cfg = CampaignSettings(control_ci_target=0.5)
    # A budget for everyone: every customer is targeted, at their expected effect.
    strong = size_groups(_population(20_000, 0.04), cfg, budget=20_000.0, has_model=True)
    weak = size_groups(_population(20_000, 0.025), cfg, budget=20_000.0, has_model=True)
    assert cfg.min_control_share < strong.control < weak.control < cfg.control_share
    assert strong.sizing["control_rule"] == "ci target" and strong.sizing["targeted"] == 20_000
    # A smaller budget targets fewer customers, whose increment is measured on fewer rows.
    smaller = size_groups(_population(20_000, 0.025), cfg, budget=5_000.0, has_model=True)
    assert smaller.sizing["targeted"] == 5_000 and smaller.control >= weak.control


def test_no_measurable_effect_holds_out_the_most_and_sizing_off_keeps_the_fixed_share():
    cfg = CampaignSettings()
    none = size_groups(_population(5_000, 0.001), cfg, budget=500.0, has_model=True)
    assert none.control == cfg.control_share
    fixed = CampaignSettings(control_ci_target=None, exploration_rows_per_arm=None)
    shares = size_groups(_population(200_000, 0.12), fixed, budget=20_000.0, has_model=True)
    assert (shares.control, shares.exploration) == (fixed.control_share, fixed.exploration_share)


def test_exploration_gives_each_offered_option_its_rows_up_to_the_cap():
    cfg = CampaignSettings(exploration_rows_per_arm=100)
    shares = size_groups(_population(40_000, 0.05, options=6), cfg, budget=4_000.0, has_model=True)
    assert shares.exploration == pytest.approx(100 * 6 / 40_000)
    capped = size_groups(_population(4_000, 0.05, options=6), cfg, budget=400.0, has_model=True)
    assert capped.exploration == cfg.exploration_share


def test_the_sized_control_group_gives_the_targeted_interval_width():
    """Outcomes drawn from the model's own probabilities: the measured 95% interval's half-width
    at the sized control share is the target share of the expected increment (within 15%)."""
    cfg = CampaignSettings(control_ci_target=0.5, min_control_share=0.001)
    pop = _population(20_000, 0.04, options=1)
    shares = size_groups(pop, cfg, budget=20_000.0, has_model=True)
    assert cfg.min_control_share < shares.control < cfg.control_share  # the target bound, not a clip
    n_target = shares.sizing["targeted"]
    rng = np.random.default_rng(1)
    n_t = int(round((1 - shares.control - shares.exploration) * n_target))
    n_c = int(round(shares.control * n_target))
    p0 = pop.base_rate.astype(float)
    p1 = p0 + pop.uplift[:, 0].astype(float)
    halves, expected = [], []
    for _ in range(200):
        t_rows, c_rows = rng.choice(len(p0), n_t), rng.choice(len(p0), n_c)
        lift = incremental_lift(int((rng.random(n_t) < p1[t_rows]).sum()), n_t,
                                int((rng.random(n_c) < p0[c_rows]).sum()), n_c)  # fmt: skip
        halves.append((lift["incremental_ci_high"] - lift["incremental_ci_low"]) / 2)
        expected.append(n_t * shares.sizing["expected_effect"])
    assert np.mean(halves) / np.mean(expected) == pytest.approx(0.5, rel=0.15)
