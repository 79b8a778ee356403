import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from mlpkg.allocation.campaign import allocate_campaign, score_population
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope

pytestmark = pytest.mark.unit


@pytest.fixture
def world(oracle_world):
    return oracle_world


def _allocate(settings, engine, shop, run_key="dag/run-1", campaign="c1", budget=40.0, objective="profit"):
    return allocate_campaign(
        engine,
        settings,
        campaign_id=campaign,
        as_of=shop.now.to_pydatetime(),
        run_key=run_key,
        model_uri="oracle",
        model_version="0",
        now=shop.now.to_pydatetime(),
        budget=budget,
        objective=objective,
    )


def _ledger(engine, campaign="c1"):
    with engine.connect() as conn:
        return pd.read_sql(select(m.Allocation).where(m.Allocation.campaign_id == campaign), conn)


def test_ledger_respects_budget_consent_and_one_row_per_customer(world):
    settings, engine, shop = world
    summary = _allocate(settings, engine, shop)
    ledger = _ledger(engine)
    assert len(ledger) == 600 and ledger["customer_id"].is_unique
    assert ledger["expected_cost"].sum() <= 40.0 + 1e-6
    assert summary["spend"] == pytest.approx(ledger["expected_cost"].sum(), abs=1e-4)  # rounded to 4 places
    with engine.connect() as conn:
        consent = pd.read_sql(select(m.Consent), conn)
    ok = set(
        zip(
            consent.loc[consent.opted_in, "customer_id"],
            consent.loc[consent.opted_in, "channel"],
            strict=True,
        )
    )
    treated = ledger[ledger["coupon_id"].notna()]
    assert all((c, h) in ok for c, h in zip(treated["customer_id"], treated["channel"], strict=True))
    assert (ledger.loc[ledger.policy == "control", "arm"] == "control").all()
    assert ledger["propensity"].between(0, 1, inclusive="right").all()


def test_rerunning_the_same_run_changes_nothing_and_another_run_is_refused(world):
    settings, engine, shop = world
    _allocate(settings, engine, shop)
    with session_scope(engine) as s:
        before = q.table_checksums(s)
    again = _allocate(settings, engine, shop)
    assert again["idempotent_rerun"] is True
    with session_scope(engine) as s:
        assert q.table_checksums(s) == before
    with pytest.raises(q.CampaignBusyError, match="already allocated"):
        _allocate(settings, engine, shop, run_key="dag/run-2")


def test_with_a_perfect_model_the_policy_beats_random_targeting(world):
    settings, engine, shop = world
    _allocate(settings, engine, shop, objective="conversions", budget=60.0)
    ledger = _ledger(engine)
    model = ledger[ledger.policy == "model"]
    value = shop.oracle_value(model[["customer_id", "arm"]])["incremental_conversions"]
    rng = np.random.default_rng(0)
    treated = model[model.arm != "control"]
    shuffled = model[["customer_id"]].assign(arm="control")
    pick = rng.choice(len(model), size=len(treated), replace=False)
    shuffled.iloc[pick, 1] = treated["arm"].to_numpy()
    random_value = shop.oracle_value(shuffled)["incremental_conversions"]
    assert value > 0 and value > 1.5 * random_value


def test_logged_propensities_are_the_mixture_probabilities(world):
    settings, engine, shop = world
    summary = _allocate(settings, engine, shop)
    ledger = _ledger(engine)
    # The shares the campaign sized (at most the settings' shares), not the settings' upper bounds.
    c, e = summary["control_share"], summary["exploration_share"]
    assert c <= settings.campaign.control_share and e <= settings.campaign.exploration_share
    model_treated = ledger[(ledger.policy == "model") & (ledger.arm != "control")]
    assert (model_treated["propensity"] >= 1 - c - e - 1e-9).all()
    control = ledger[(ledger.policy == "control") & (ledger.model_arm == "control")]
    # Control under control and model branches: c + (1 - c - e); a customer no arm is eligible for
    # gets control from the exploration branch too, so with certainty (1.0).
    p = control["propensity"].to_numpy()
    assert (np.isclose(p, c + (1 - c - e), atol=1e-6) | np.isclose(p, 1.0)).all()


def test_budget_curve_is_monotone_and_never_overspends(world, tmp_path):
    from mlpkg.allocation.plan import budget_curve, plot_budget_curve

    settings, engine, shop = world
    table = budget_curve(
        engine,
        settings,
        as_of=shop.now.to_pydatetime(),
        model_uri="oracle",
        objective="conversions",
        budgets=[5, 10, 20, 40, 80],
    )
    assert (table["spend"] <= table["budget"] + 1e-6).all()
    assert table["expected_objective"].is_monotonic_increasing
    png = plot_budget_curve(table, tmp_path / "curve.png", objective="conversions", current_budget=20)
    assert png.stat().st_size > 5_000


def test_cold_start_explores_within_budget_with_exact_propensities(world):
    settings, engine, shop = world
    now = shop.now.to_pydatetime()
    summary = allocate_campaign(
        engine,
        settings,
        campaign_id="cold",
        as_of=now,
        run_key="r",
        model_uri=None,
        model_version=None,
        now=now,
        budget=30.0,
        objective="conversions",
    )
    ledger = _ledger(engine, "cold")
    assert summary["treated"] > 0 and ledger["expected_cost"].sum() <= 30.0 + 1e-6
    assert set(ledger.loc[ledger.arm != "control", "policy"]) == {"explore"}
    assert (ledger["model_arm"] == "control").all()
    # Exact propensities: an explored customer got each of their n eligible arms with probability
    # e / n (one exploration share e for everyone); an eligible customer got nothing with 1 - e,
    # and a customer no arm can reach got nothing for sure. They are probabilities of what happened.
    pop = score_population(engine, settings, as_of=now, model_uri=None, objective="conversions")
    n_elig = pd.Series(pop.eligible.sum(axis=1), index=pop.ids.astype(str))
    ledger = ledger.assign(n_elig=ledger["customer_id"].map(n_elig).to_numpy())
    treated = ledger[ledger.arm != "control"]
    shares = treated["propensity"] * treated["n_elig"]
    e = float(shares.iloc[0])
    assert 0 < e < 1 and shares.to_numpy() == pytest.approx(e, rel=1e-9)
    untreated = ledger[ledger.arm == "control"]
    reachable = untreated[untreated.n_elig > 0]
    assert reachable["propensity"].to_numpy() == pytest.approx(1 - e, rel=1e-9)
    assert (untreated.loc[untreated.n_elig == 0, "propensity"] == 1.0).all()
    # Exploration spends the budget in expectation: e times the mean eligible cost of everyone.
    expected_share = min(1 - settings.campaign.control_share, 30.0 / _mean_reach_cost(pop))
    assert e == pytest.approx(expected_share, rel=1e-6)


def test_cooldown_is_measured_in_campaign_time(world):
    settings, engine, shop = world
    t0 = shop.now.to_pydatetime()
    kwargs = dict(model_uri="oracle", model_version="0", budget=40.0, objective="conversions")
    allocate_campaign(engine, settings, campaign_id="w1", as_of=t0, run_key="a", now=t0, **kwargs)
    first = set(_ledger(engine, "w1").query("coupon_id == coupon_id")["customer_id"])
    week = t0 + pd.Timedelta(days=7)
    allocate_campaign(engine, settings, campaign_id="w2", as_of=week, run_key="b", now=t0, **kwargs)
    second = set(_ledger(engine, "w2").query("coupon_id == coupon_id")["customer_id"])
    assert first and not (first & second), "a coupon within the cooldown (14 days) must block the next one"
    later = t0 + pd.Timedelta(days=settings.campaign.cooldown_days)  # exactly the cooldown later
    allocate_campaign(engine, settings, campaign_id="w3", as_of=later, run_key="c", now=t0, **kwargs)
    third = set(_ledger(engine, "w3").query("coupon_id == coupon_id")["customer_id"])
    assert first & third, "after the cooldown the same customers may be targeted again"


def test_a_ledger_that_breaks_its_contract_is_refused_and_nothing_is_written(world, monkeypatch):
    import mlpkg.allocation.campaign as campaign
    from mlpkg.validation import DataContractError

    settings, engine, shop = world
    real_plan = campaign._plan

    def broken_plan(*args, **kwargs):
        summary, rows, reasons, spend, issued = real_plan(*args, **kwargs)
        rows[1] = dict(rows[0], propensity=1.7)  # duplicate customer and an impossible propensity
        return summary, rows, reasons, spend, issued

    monkeypatch.setattr(campaign, "_plan", broken_plan)
    with session_scope(engine) as s:
        before = q.table_checksums(s)
    with pytest.raises(DataContractError, match="allocations") as err:
        _allocate(settings, engine, shop)
    assert "propensity" in str(err.value)
    with session_scope(engine) as s:
        assert q.table_checksums(s) == before


def _mean_reach_cost(pop) -> float:  # noqa: ANN001 - a ScoredPopulation
    """Sum over reachable customers of their mean eligible option cost (the cold start's yardstick)."""
    n_elig = pop.eligible.sum(axis=1)
    reach = n_elig > 0
    mean_cost = (np.where(pop.eligible, pop.cost, 0).sum(axis=1)[reach] / n_elig[reach]).mean()
    return float(mean_cost * reach.sum())



class _ShuffledOracle:
    """The oracle with each customer's treated conversions scaled by a factor of their id: a version
    that disagrees (the same for a customer whichever batch or shard scores them)."""

    def __init__(self, shop):
        self.shop = shop
        self.arms = list(shop.arm_names)

    def score_arrays(self, df, chunk_size=None):
        import zlib

        ids = df["customer_id"].astype(str).tolist()
        p = self.shop.true_conversion(ids).astype(np.float32)
        factor = np.array([0.2 + 1.6 * (zlib.crc32(c.encode()) % 1000) / 1000 for c in ids], np.float32)
        p[:, 1:] = np.clip(p[:, :1] + (p[:, 1:] - p[:, :1]) * factor[:, None] + 0.01 * factor[:, None], 0, 1)
        return {"p_conv": p, "revenue": self.shop.true_revenue(ids).astype(np.float32)}


def test_a_live_challenger_allocates_its_share_of_the_model_group_with_mixture_propensities(
    world, monkeypatch
):
    import mlpkg.registry
    from tests.fixtures import OracleScorer

    settings, engine, shop = world
    scorers = {"oracle": OracleScorer(shop), "shuffled": _ShuffledOracle(shop)}
    monkeypatch.setattr(mlpkg.registry, "load_uplift_model", lambda uri, tracking_uri=None: scorers[uri])
    now = shop.now.to_pydatetime()
    summary = allocate_campaign(
        engine, settings, campaign_id="live", as_of=now, run_key="r", model_uri="oracle", model_version="1",
        now=now, budget=60.0, objective="conversions", challenger_uri="shuffled", challenger_version="2",
    )  # fmt: skip
    ledger = _ledger(engine, "live")
    live = summary["live_comparison"]
    assert live["champion_version"] == "1" and live["challenger_version"] == "2"
    assert live["challenger_share"] == settings.campaign.challenger_share == 0.5
    rows = live["model_rows"]
    model = ledger[ledger.policy == "model"]
    assert rows["champion"] + rows["challenger"] == len(model)
    # A hash split of about 540 model-group customers: each version within 4 sd of half.
    assert abs(rows["challenger"] - len(model) / 2) < 4 * np.sqrt(len(model) / 4)
    assert live["treated"]["champion"] > 0 and live["treated"]["challenger"] > 0 and live["disagreements"] > 0
    assert ledger["expected_cost"].sum() <= 60.0 + 1e-6
    # Where the versions agree the model arm comes with the model share, where they disagree
    # with half of it (plus, for a treated arm, the exploration branch's chance of drawing it).
    c, e = summary["control_share"], summary["exploration_share"]
    treated = model[model.arm != "control"]
    p = treated["propensity"].to_numpy()
    whole, half = 1 - c - e, 0.5 * (1 - c - e)
    assert ((p >= whole - 1e-9) | ((p >= half - 1e-9) & (p < half + e + 1e-9))).all()
    assert (p < whole - 1e-9).any() and (p >= whole - 1e-9).any()
    # Every reason says which version scored the customer, the challenger for about half.
    with engine.connect() as conn:
        query = select(m.AllocationReason).where(m.AllocationReason.campaign_id == "live")
        facts = pd.read_sql(query, conn)["constraints"]
    said = [next(f["detail"] for f in c if f["constraint"] == "live_comparison") for c in facts]
    drawn = sum(d.startswith("scored by live challenger v2") for d in said)
    assert len(said) == len(ledger) and abs(drawn - len(said) / 2) < 4 * np.sqrt(len(said) / 4)


def test_without_a_live_challenger_or_with_share_zero_the_champion_allocates_alone(world, monkeypatch):
    import mlpkg.registry
    from tests.fixtures import OracleScorer

    settings, engine, shop = world
    # Only the champion can be loaded: a share of 0 must not even score the challenger.
    scorers = {"oracle": OracleScorer(shop)}
    monkeypatch.setattr(mlpkg.registry, "load_uplift_model", lambda uri, tracking_uri=None: scorers[uri])
    now = shop.now.to_pydatetime()
    no_share = settings.campaign.model_copy(update={"challenger_share": 0.0})
    off = settings.model_copy(update={"campaign": no_share})
    for cfg, campaign, challenger in ((settings, "alone", None), (off, "zero", "shuffled")):
        summary = allocate_campaign(
            engine, cfg, campaign_id=campaign, as_of=now, run_key=campaign, model_uri="oracle",
            model_version="1", now=now, budget=30.0, objective="conversions", challenger_uri=challenger,
            challenger_version=challenger and "2",
        )  # fmt: skip
        assert "live_comparison" not in summary
        ledger = _ledger(engine, campaign)
        c, e = summary["control_share"], summary["exploration_share"]
        treated = ledger[(ledger.policy == "model") & (ledger.arm != "control")]
        assert len(treated) and (treated["propensity"] >= 1 - c - e - 1e-9).all()
