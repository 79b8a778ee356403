"""Feedback measures what is due: closed windows final, open ones provisional, late events re-measured."""

from __future__ import annotations

import pandas as pd
import pytest

from mlpkg import stages
from mlpkg.allocation.campaign import allocate_campaign
from mlpkg.db import models as m
from mlpkg.db.engine import session_scope
from mlpkg.feedback import attribute_campaign, campaign_metrics, measure_due, window_starts
from mlpkg.simulator.lab import harness
from tests.fixtures import stored_id, use_oracle

pytestmark = pytest.mark.unit


@pytest.fixture
def sent(ingested, monkeypatch, tmp_path):
    """A campaign allocated and sent at the shop's now, with every response drawn (not yet loaded)."""
    settings, engine = ingested
    shop = harness.load_world(settings)
    use_oracle(monkeypatch, shop)
    now = shop.now.to_pydatetime()
    allocate_campaign(
        engine,
        settings,
        campaign_id="c1",
        as_of=now,
        run_key="t/1",
        model_uri="oracle",
        model_version="0",
        now=now,
        budget=80.0,
        objective="conversions",
    )
    stages.deliver(settings, "c1", now=now)
    feedback = pd.read_csv(harness.simulate_responses(settings, "c1")["feedback_file"])
    feedback["ts"] = pd.to_datetime(feedback["ts"], utc=True)
    return settings, engine, shop, feedback, tmp_path


def _load(settings, frame: pd.DataFrame, folder):
    folder.mkdir(parents=True)
    out = frame.assign(ts=frame["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    out.to_csv(folder / "feedback.csv", index=False)
    stages.ingest(settings, folder)


def _status(engine, campaign_id):
    with session_scope(engine) as s:
        campaign = s.get(m.Campaign, campaign_id)
        return campaign.status, s.get(m.CampaignLog, f"campaign:{campaign_id}") is not None


def test_open_window_is_provisional_then_final_once_it_closes(sent):
    settings, engine, shop, feedback, tmp = sent
    start = shop.now
    three_days = start + pd.Timedelta(days=3)
    _load(settings, feedback[feedback["ts"] < three_days], tmp / "fb-early")
    wall = pd.Timestamp("2026-01-01", tz="UTC").to_pydatetime()

    early = measure_due(engine, settings, clock=three_days.to_pydatetime(), now=wall)
    assert early["measured"] == [] and early["provisional"] == ["c1"]
    closes = pd.Timestamp(early["waiting"][0]["window_closes"])
    # The window closes a week after the last send (the sends took a moment of wall-clock time).
    assert start + pd.Timedelta(days=7) <= closes < start + pd.Timedelta(days=7, minutes=1)
    metrics = campaign_metrics(engine, "c1")
    assert metrics["provisional"].all()
    assert _status(engine, "c1") == ("delivered", False), "no final status and no training labels yet"

    _load(settings, feedback[feedback["ts"] >= three_days], tmp / "fb-late")
    closed = measure_due(engine, settings, clock=(closes + pd.Timedelta(seconds=1)).to_pydatetime(), now=wall)
    assert [r["campaign_id"] for r in closed["measured"]] == ["c1"]
    assert closed["measured"][0]["late_events"] is False
    assert not campaign_metrics(engine, "c1")["provisional"].any()
    assert _status(engine, "c1") == ("measured", True)

    again = measure_due(engine, settings, clock=(start + pd.Timedelta(days=9)).to_pydatetime(), now=wall)
    assert again["measured"] == [] and again["provisional"] == []


def test_late_events_re_measure_a_measured_campaign(sent):
    settings, engine, shop, feedback, tmp = sent
    start = shop.now
    late_customer = feedback.loc[feedback["event_type"] == "delivered", "customer_id"].iloc[0]
    held_back = feedback[(feedback["customer_id"] == late_customer) & (feedback["event_type"] == "order")]
    _load(settings, feedback.drop(held_back.index), tmp / "fb-1")
    clock = (start + pd.Timedelta(days=8)).to_pydatetime()
    first = measure_due(engine, settings, clock=clock, now=clock)
    assert [r["campaign_id"] for r in first["measured"]] == ["c1"]
    if held_back.empty:  # the customer did not order: plant one late order inside their window
        held_back = pd.DataFrame(
            [
                {
                    "event_id": "c1-late-1",
                    "campaign_id": "c1",
                    "customer_id": late_customer,
                    "event_type": "order",
                    "ts": start + pd.Timedelta(days=2),
                    "coupon_id": None,
                    "channel": None,
                    "order_id": "c1-late-order",
                    "revenue": 42.0,
                }
            ]
        )
    _load(settings, held_back, tmp / "fb-2")
    second = measure_due(engine, settings, clock=clock, now=clock)
    assert [(r["campaign_id"], r["late_events"]) for r in second["measured"]] == [("c1", True)]
    rows = attribute_campaign(engine, "c1", settings.campaign.attribution_window_days)
    assert rows.set_index("customer_id").loc[stored_id(settings, late_customer), "converted"] == 1


def test_orders_reported_for_another_campaign_do_not_count(sent):
    settings, engine, shop, feedback, tmp = sent
    _load(settings, feedback, tmp / "fb")
    before = attribute_campaign(engine, "c1", 7)
    quiet = before.loc[before["converted"] == 0, "customer_id"].iloc[0]
    orphan = pd.DataFrame(
        [
            {
                "event_id": "other-E1",
                "campaign_id": "other",
                "customer_id": quiet,
                "event_type": "order",
                "ts": shop.now + pd.Timedelta(days=1),
                "coupon_id": None,
                "channel": None,
                "order_id": "other-O1",
                "revenue": 80.0,
            }
        ]
    )
    # Feedback must name a campaign CouponOps ran and a customer of its ledger: "other" is one.
    with session_scope(engine) as s:
        s.add(m.Campaign(campaign_id="other", created_at=shop.now, as_of=shop.now, budget=0.0,
                         objective="conversions", status="allocated", summary={}))
        s.flush()
        s.add(m.Allocation(campaign_id="other", customer_id=quiet, arm="control", policy="control",
                           propensity=1.0, created_at=shop.now))
    _load(settings, orphan, tmp / "fb-other")
    after = attribute_campaign(engine, "c1", 7)
    assert after.set_index("customer_id").loc[quiet, "converted"] == 0
    assert after["converted"].sum() == before["converted"].sum()


def test_each_customer_window_starts_at_their_own_send():
    campaign = m.Campaign(
        campaign_id="c",
        created_at=pd.Timestamp("2026-01-01T06:00Z").to_pydatetime(),
        as_of=pd.Timestamp("2026-01-01T00:00Z").to_pydatetime(),
    )
    sends = pd.DataFrame(
        {
            "customer_id": ["a", "b"],
            "sent_at": [pd.Timestamp("2026-01-01T06:05Z"), pd.Timestamp("2026-01-03T06:00Z")],
        }
    )
    starts = window_starts(campaign, pd.Series(["a", "b", "ctrl"]), sends)
    assert starts["a"] == pd.Timestamp("2026-01-01T00:00Z"), "the first send happens at as_of"
    assert starts["b"] == pd.Timestamp("2026-01-02T23:55Z"), "a send two days later opens its window later"
    assert starts["ctrl"] == starts["a"], "customers not sent anything start at the campaign's first send"
    data = window_starts(campaign, pd.Series(["a", "b"]), sends, data_clock=True)
    assert (data == pd.Timestamp("2026-01-01T00:00Z")).all(), "on the data clock every send is at as_of"
