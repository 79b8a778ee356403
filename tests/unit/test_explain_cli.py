"""`couponops explain` names the features, the runner-up and the binding constraint of a real campaign."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from mlpkg import stages
from mlpkg.db import models as m
from mlpkg.simulator.lab import harness
from tests.fixtures import run_cli, shop_ids

pytestmark = pytest.mark.unit


@pytest.fixture
def campaign(ingested):
    """Campaign ``c1`` allocated by a model trained, registered and promoted on the 600-customer shop."""
    settings, engine = ingested
    trained = stages.train(settings, stages.RunContext(run_id="explain"))
    stages.promote(settings, trained["model_version"], actor="test", reason="explain test")
    when = harness.load_world(settings).now.to_pydatetime()
    summary = stages.allocate(
        settings, stages.RunContext(run_id="allocate-c1"), campaign_id="c1", as_of=when, budget=40.0,
        objective="conversions", now=when,
    )  # fmt: skip
    with engine.connect() as conn:
        reasons = {r.customer_id: r for r in conn.execute(select(m.AllocationReason)).all()}
        ledger = {r.customer_id: r for r in conn.execute(select(m.Allocation)).all()}
    return settings, engine, summary, reasons, ledger


def test_explain_names_features_runner_up_and_the_binding_constraint(campaign):
    settings, engine, summary, reasons, ledger = campaign
    assert len(reasons) == len(ledger) == summary["population"]
    assert summary["reasons"]["attribution_method"] in ("integrated_gradients", "tree_shap", "linear")
    # Every row with an arm to explain carries the model's attributions in the product's feature names.
    explained = [r for r in reasons.values() if r.explained_arm]
    assert explained and all(len(r.attributions) == 5 for r in explained)
    assert summary["reasons"]["attributed_rows"] == len(explained)
    shop = shop_ids(engine)
    treated = next(c for c, row in ledger.items() if row.policy == "model" and row.coupon_id)
    result = run_cli("explain", "--campaign", "c1", "--customer", shop[treated])
    assert result.exit_code == 0, result.output
    out = result.output
    row = reasons[treated]
    assert f"customer {shop[treated]} in campaign c1: {ledger[treated].arm}" in out
    assert "why: model_choice" in out
    runner = "no coupon" if row.runner_up == "control" else row.runner_up
    assert f"runner-up: {runner}" in out
    assert all(a["feature"] in out for a in row.attributions)

    left = next((c for c, r in reasons.items() if r.binding == "budget"), None)
    assert left is not None, {r.binding for r in reasons.values()}
    result = run_cli("explain", "--campaign", "c1", "--customer", shop[left], "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["arm"] == "control" and doc["reason"]["binding"] == "budget"
    assert doc["reason"]["runner_up"] == reasons[left].explained_arm != "control"
    assert doc["reason"]["constraints"][0]["constraint"] == "budget"
    features = [a["feature"] for a in reasons[left].attributions]
    assert [a["feature"] for a in doc["reason"]["attributions"]] == features
    assert doc["stored_id"] == left


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and " INFO mlflow." not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_explain_of_an_unknown_campaign_or_customer_is_one_line(oracle_world):
    settings, engine, shop = oracle_world
    line = _one_error_line(run_cli("explain", "--campaign", "nope", "--customer", "C0000001"))
    assert "unknown campaign id 'nope'" in line
    from mlpkg.allocation.campaign import allocate_campaign

    now = shop.now.to_pydatetime()
    allocate_campaign(engine, settings, campaign_id="c1", as_of=now, run_key="r", model_uri="oracle",
                      model_version="0", now=now, budget=20.0, objective="conversions")  # fmt: skip
    line = _one_error_line(run_cli("explain", "--campaign", "c1", "--customer", "no-such-customer"))
    assert "unknown customer 'no-such-customer'" in line and "campaign 'c1'" in line
    # A real customer of the oracle's campaign: reasons without attributions (the oracle is no model).
    some = next(iter(shop_ids(engine).values()))
    result = run_cli("explain", "--campaign", "c1", "--customer", some, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["reason"]["attributions"] == []
