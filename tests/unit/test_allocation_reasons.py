"""Every ledger row records why it got its arm or none: the binding constraint, the runner-up, the margin."""

from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import select

from mlpkg.allocation.campaign import allocate_campaign
from mlpkg.db import models as m

pytestmark = pytest.mark.unit


def _allocate(settings, engine, shop, campaign="c1", budget=40.0, objective="conversions", as_of=None, **kw):
    when = (as_of or shop.now).to_pydatetime() if hasattr(as_of or shop.now, "to_pydatetime") else as_of
    return allocate_campaign(
        engine, settings, campaign_id=campaign, as_of=when, run_key=f"run-{campaign}", model_uri="oracle",
        model_version="0", now=shop.now.to_pydatetime(), budget=budget, objective=objective, **kw,
    )  # fmt: skip


def _ledger_with_reasons(engine, campaign="c1") -> pd.DataFrame:
    with engine.connect() as conn:
        ledger = pd.read_sql(select(m.Allocation).where(m.Allocation.campaign_id == campaign), conn)
        reasons = pd.read_sql(
            select(m.AllocationReason).where(m.AllocationReason.campaign_id == campaign), conn
        )
    return ledger.merge(reasons, on=["campaign_id", "customer_id"], how="left", suffixes=("", "_reason"))


def _consented(engine) -> set[str]:
    with engine.connect() as conn:
        consent = pd.read_sql(select(m.Consent), conn)
    return set(consent.loc[consent.opted_in, "customer_id"])


def test_every_ledger_row_has_a_reason_that_matches_what_it_got(oracle_world):
    settings, engine, shop = oracle_world
    summary = _allocate(settings, engine, shop)
    rows = _ledger_with_reasons(engine)
    assert len(rows) == 600 and rows["binding"].notna().all()
    assert set(rows["binding"]) <= set(m.REASON_CODES)
    treated = rows[rows["coupon_id"].notna()]
    assert set(treated["binding"]) <= {"model_choice", "exploration_draw"}
    assert (treated.loc[treated.policy == "model", "binding"] == "model_choice").all()
    assert (treated.loc[treated.policy == "explore", "binding"] == "exploration_draw").all()
    assert (treated["explained_arm"] == treated["arm"]).all()
    # Model choices beat their runner-up at the solver's prices, except where the solver's repair and
    # refill (whole customers, leftover budget) decided; those rows say so.
    model_rows = treated[treated.policy == "model"]
    assert (model_rows["runner_up"] != model_rows["arm"]).all()
    assert (model_rows["margin"] >= 0).mean() > 0.7
    refilled = model_rows[model_rows["margin"] < 0]
    assert all(any(f["constraint"] == "repair" for f in c) for c in refilled["constraints"])
    control = rows[rows.policy == "control"]
    assert set(control["binding"]) <= {"control_group", "cooldown", "consent", "not_eligible"}
    assert (control["binding"] == "control_group").any()
    # A control customer the model would have treated names that arm as the runner-up.
    would = control[(control["model_arm"] != "control") & (control["binding"] == "control_group")]
    assert len(would) and (would["runner_up"] == would["model_arm"]).all() and (would["margin"] < 0).all()
    assert sum(summary["reasons"]["by_binding"].values()) == 600


def test_a_customer_left_out_by_the_budget_names_the_budget_and_its_price(oracle_world):
    settings, engine, shop = oracle_world
    summary = _allocate(settings, engine, shop, budget=8.0)
    rows = _ledger_with_reasons(engine)
    left = rows[(rows.policy == "model") & rows["coupon_id"].isna() & (rows["binding"] == "budget")]
    assert len(left) > 20, rows["binding"].value_counts()
    assert summary["spend"] <= 8.0 + 1e-9
    assert all(c[0]["constraint"] == "budget" for c in left["constraints"])
    # Their runner-up is the arm the budget took from them: either its price made that arm worth
    # less than nothing (a positive margin for no coupon), or the arm was worth it at the price but
    # the budget left (in whole customers) could not pay for it, and the reason says how much was left.
    assert left["runner_up"].ne("control").all()
    priced, spent = left[left["margin"] > 0], left[left["margin"] <= 0]
    assert len(priced) > 20
    assert all("budget's price" in c[0]["detail"] for c in priced["constraints"])
    for _, row in spent.iterrows():
        detail = row["constraints"][0]["detail"]
        assert "the budget was spent" in detail and row["runner_up"] in detail, detail


def test_cooldown_and_missing_consent_are_named(oracle_world):
    settings, engine, shop = oracle_world
    _allocate(settings, engine, shop, campaign="w1")
    first = _ledger_with_reasons(engine, "w1")
    treated = set(first.loc[first["coupon_id"].notna(), "customer_id"])
    no_consent = set(first["customer_id"]) - _consented(engine)
    assert no_consent, "the simulated shop has customers who never opted in"
    assert (first.loc[first.customer_id.isin(no_consent), "binding"] == "consent").all()

    _allocate(settings, engine, shop, campaign="w2", as_of=shop.now + pd.Timedelta(days=7))
    second = _ledger_with_reasons(engine, "w2")
    again = second[second.customer_id.isin(treated)]
    assert (again["binding"] == "cooldown").all(), again["binding"].value_counts()
    assert "cooldown" in again.iloc[0]["constraints"][0]["detail"]
