"""`couponops explain` names the features, the runner-up and the binding constraint of a real campaign."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from mlpkg import stages
from mlpkg.db import models as m
from mlpkg.simulator.lab import harness
from tests.fixtures import one_error_line, run_cli, shop_ids

pytestmark = pytest.mark.unit


def _allocate(settings, campaign_id: str) -> dict:  # noqa: ANN001 - mlpkg.config.Settings
    """Allocate ``campaign_id`` at the shop's clock with budget 40 (the champion scores it)."""
    when = harness.load_world(settings).now.to_pydatetime()
    return stages.allocate(
        settings, stages.RunContext(run_id=f"allocate-{campaign_id}"), campaign_id=campaign_id, as_of=when,
        budget=40.0, objective="conversions", now=when,
    )  # fmt: skip


@pytest.fixture
def campaign(ingested):
    """Campaign ``c1`` allocated by a model trained, registered and promoted on the 600-customer shop."""
    settings, engine = ingested
    trained = stages.train(settings, stages.RunContext(run_id="explain"))
    stages.promote(settings, trained["model_version"], actor="test", reason="explain test")
    summary = _allocate(settings, "c1")
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


def test_explain_of_an_unknown_campaign_or_customer_is_one_line(oracle_world):
    settings, engine, shop = oracle_world
    line = one_error_line(run_cli("explain", "--campaign", "nope", "--customer", "C0000001"))
    assert "unknown campaign id 'nope'" in line
    from mlpkg.allocation.campaign import allocate_campaign

    now = shop.now.to_pydatetime()
    allocate_campaign(engine, settings, campaign_id="c1", as_of=now, run_key="r", model_uri="oracle",
                      model_version="0", now=now, budget=20.0, objective="conversions")  # fmt: skip
    line = one_error_line(run_cli("explain", "--campaign", "c1", "--customer", "no-such-customer"))
    assert "unknown customer 'no-such-customer'" in line and "campaign 'c1'" in line
    # A real customer of the oracle's campaign: reasons without attributions (the oracle is no model).
    some = next(iter(shop_ids(engine).values()))
    result = run_cli("explain", "--campaign", "c1", "--customer", some, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["reason"]["attributions"] == []


def test_the_model_report_shows_what_drives_the_uplift_as_logged_at_training(campaign):
    """`couponops report` and the campaign page list the champion's top features, read from its run."""
    import re

    import pandas as pd

    from mlpkg import registry, report_page
    from mlpkg.feedback import measure_campaign
    from mlpkg.reports import campaign_report

    settings, engine, _summary, _reasons, _ledger = campaign
    client = registry.make_client(settings.resolved_tracking_uri)
    version = registry.alias_version(client, settings.registered_model_name, registry.CHAMPION)
    run_id = client.get_model_version(settings.registered_model_name, version).run_id
    logged = registry.global_attributions(client, run_id)
    top = [f["feature"] for f in logged["features"][:5]]
    assert len(top) == 5

    result = run_cli("report", "--json")
    assert result.exit_code == 0, result.output
    drivers = json.loads(result.output)["model"]["drivers"]
    assert drivers["version"] == version and drivers["run_id"] == run_id
    assert [f["feature"] for f in drivers["features"]] == top
    assert drivers["features"][0]["mean_abs"] == logged["features"][0]["mean_abs"]
    text = run_cli("report")
    assert text.exit_code == 0, text.output
    out = text.output
    assert f"what drives the uplift (v{version}" in out
    table = out[out.index("what drives the uplift") :]
    assert [table.index(f) for f in top] == sorted(table.index(f) for f in top)
    assert report_page.points(logged["features"][0]["mean_abs"]) in table
    assert logged["features"][0]["direction"] in table

    # The campaign's page, once measured, has the section for the version that scored it.
    when = harness.load_world(settings).now.to_pydatetime()
    stages.deliver(settings, "c1", now=when)
    batch = harness.simulate_responses(settings, "c1")
    later = when + pd.Timedelta(days=8)
    stages.ingest_feedback(settings, batch["feedback_dir"], now=later)
    measure_campaign(engine, settings, "c1", now=later)
    html = campaign_report(settings, "c1", log_to_mlflow=False).read_text(encoding="utf-8")
    page = " ".join(re.sub(r"<[^>]+>", " ", html).replace("&#39;", "'").split())
    assert "What drives the uplift" in page
    section = page[page.index("What drives the uplift") : page.index("By coupon and channel")]
    assert f"held-out customers, measured when couponops-uplift v{version} was trained" in section
    assert [section.index(f) for f in top] == sorted(section.index(f) for f in top)
    assert "attributions/" in section and not re.search(r"\d\.\d{4,}", section)


def test_decisive_attributions_go_to_treated_and_near_margin_rows_only(campaign):
    """`campaign.attribution_rows=decisive`: every row keeps its reason; the decisive ones get features."""
    import numpy as np

    settings, engine, _summary, all_reasons, _ledger = campaign
    decisive = settings.model_copy(
        update={"campaign": settings.campaign.model_copy(update={"attribution_rows": "decisive"})}
    )
    summary = _allocate(decisive, "c2")
    with engine.connect() as conn:
        reasons = {r.customer_id: r for r in conn.execute(
            select(m.AllocationReason).where(m.AllocationReason.campaign_id == "c2")).all()}
        ledger = {r.customer_id: r for r in conn.execute(
            select(m.Allocation).where(m.Allocation.campaign_id == "c2")).all()}  # fmt: skip
    assert len(reasons) == len(ledger) == summary["population"]
    assert all(r.binding for r in reasons.values())
    treated = {c for c, row in ledger.items() if row.coupon_id is not None}
    margins = {c: r.margin for c, r in reasons.items() if r.margin is not None}
    chosen = [abs(margins[c]) for c in treated if ledger[c].policy == "model" and c in margins]
    band = float(np.median(chosen))
    near = {c for c, m_ in margins.items() if c not in treated and abs(m_) <= band}
    explained = {c for c, r in reasons.items() if r.explained_arm}
    attributed = {c for c, r in reasons.items() if r.attributions}
    assert treated and near and explained - treated - near, "the campaign must have all three kinds of row"
    assert attributed == (treated | near) & explained
    assert all(len(reasons[c].attributions) == 5 and reasons[c].method for c in attributed)
    rest = explained - attributed
    assert all(reasons[c].attributions == [] and reasons[c].method is None for c in rest)
    assert all(reasons[c].runner_up is not None for c in rest)
    assert summary["reasons"]["attributed_rows"] == len(attributed) < len(explained)
    # The same model, customers and reference as c1 (attributions for all rows): the same numbers.
    same = [c for c in attributed if reasons[c].explained_arm == all_reasons[c].explained_arm]
    assert same
    for c in same:
        mine = {a["feature"]: a["contribution"] for a in reasons[c].attributions}
        theirs = {a["feature"]: a["contribution"] for a in all_reasons[c].attributions}
        shared = mine.keys() & theirs.keys()
        assert len(shared) >= 4 and all(abs(mine[f] - theirs[f]) < 1e-5 for f in shared), (mine, theirs)
