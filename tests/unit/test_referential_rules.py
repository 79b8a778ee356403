"""Rules across tables and batches: feedback against the campaigns run, orders after signup, sane coupons."""

from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import select

from mlpkg import stages
from mlpkg.campaign_logs import import_campaign_log, parse_log_spec
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.validation import DataContractError

pytestmark = pytest.mark.unit

ISO = "%Y-%m-%dT%H:%M:%SZ"


def _snapshot(engine):
    with session_scope(engine) as s:
        return q.table_counts(s), q.table_checksums(s)


@pytest.fixture
def sent(ingested):
    """Campaign c1 sent at the data clock: A got coupon K1 by email (sent), B is control."""
    settings, engine = ingested
    with session_scope(engine) as s:
        a, b = s.execute(select(m.Customer.customer_id).order_by(m.Customer.customer_id).limit(2)).scalars()
        k1, k2 = s.execute(select(m.Coupon.coupon_id).order_by(m.Coupon.coupon_id).limit(2)).scalars()
        t = q.as_utc(q.latest_ts(s, m.Order.ts)).floor("s")
        s.add(
            m.Campaign(
                campaign_id="c1",
                created_at=t,
                as_of=t,
                budget=10.0,
                objective="conversions",
                status="delivered",
                summary={},
            )
        )
        s.flush()
        s.add(
            m.Allocation(
                campaign_id="c1",
                customer_id=a,
                arm=f"{k1}@email",
                coupon_id=k1,
                channel="email",
                policy="model",
                propensity=1.0,
                created_at=t,
            )
        )
        s.add(
            m.Allocation(
                campaign_id="c1", customer_id=b, arm="control", policy="control", propensity=0.5, created_at=t
            )
        )
        s.add(
            m.Delivery(
                dedup_key="c1/a",
                campaign_id="c1",
                customer_id=a,
                channel="email",
                coupon_id=k1,
                payload={},
                status="sent",
                created_at=t,
                sent_at=t,
            )
        )
    return settings, engine, dict(a=a, b=b, k1=k1, k2=k2, t=t)


def _event(i, ids, **kw):
    row = dict(
        event_id=f"c1-E{i}",
        campaign_id="c1",
        customer_id=ids["a"],
        event_type="delivered",
        ts=(ids["t"] + pd.Timedelta(hours=1 + i)).strftime(ISO),
        coupon_id=ids["k1"],
        channel="email",
        order_id="",
        revenue=0.0,
    )
    row.update(kw)
    return row


def _valid(ids):
    return [
        _event(0, ids),
        _event(1, ids, event_type="redeem", order_id="c1-O1"),
        _event(2, ids, event_type="order", order_id="c1-O1", revenue=30.0),
        _event(
            3,
            ids,
            customer_id=ids["b"],
            event_type="order",
            coupon_id="",
            channel="",
            order_id="c1-O2",
            revenue=20.0,
        ),
    ]


def _ingest(settings, name, ids, **files):
    folder = settings.raw_dir / name
    folder.mkdir()
    for table, rows in files.items():
        pd.DataFrame(rows).to_csv(folder / f"{table}.csv", index=False)
    return stages.ingest(settings, folder, now=(ids["t"] + pd.Timedelta(days=10)).to_pydatetime())


def _refused(settings, engine, name, ids, rule, *words, **files):
    before = _snapshot(engine)
    with pytest.raises(DataContractError) as err:
        _ingest(settings, name, ids, **files)
    msg = " ".join(str(err.value).split())
    assert rule in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert _snapshot(engine) == before
    assert (
        err.value.quarantine_path is not None
        and (err.value.quarantine_path / "validation_result.json").exists()
    )
    return msg


def test_valid_feedback_of_a_known_campaign_loads(sent):
    settings, engine, ids = sent
    report = _ingest(settings, "fb-ok", ids, feedback=_valid(ids))
    assert report["loaded"]["feedback"] == 4


def test_feedback_for_an_unknown_campaign_is_refused_naming_the_known_ids(sent):
    settings, engine, ids = sent
    rows = _valid(ids) + [
        _event(9, ids, campaign_id="ghost", event_type="order", order_id="g-1", revenue=5.0)
    ]
    _refused(
        settings,
        engine,
        "fb-ghost",
        ids,
        "known_campaign",
        "'ghost'",
        "known campaign ids: ['c1']",
        "line 6",
        feedback=rows,
    )


def test_redeeming_a_coupon_the_campaign_never_allocated_is_refused(sent):
    settings, engine, ids = sent
    control = _event(5, ids, customer_id=ids["b"], event_type="redeem", order_id="c1-O9")
    _refused(
        settings,
        engine,
        "fb-ctl",
        ids,
        "coupon_of_campaign",
        repr(ids["b"]),
        repr(ids["k1"]),
        feedback=[control],
    )
    other = _event(6, ids, event_type="redeem", coupon_id=ids["k2"], order_id="c1-O8")
    _refused(settings, engine, "fb-k2", ids, "coupon_of_campaign", repr(ids["k2"]), feedback=[other])


def test_feedback_dated_before_the_campaign_send_is_refused(sent):
    settings, engine, ids = sent
    early = _event(0, ids, ts=(ids["t"] - pd.Timedelta(days=2)).strftime(ISO))
    _refused(
        settings, engine, "fb-early", ids, "after_send", "'c1-E0'", ids["t"].isoformat(), feedback=[early]
    )


def test_feedback_about_a_customer_outside_the_ledger_or_without_a_message_is_refused(sent):
    settings, engine, ids = sent
    with session_scope(engine) as s:
        stranger = (
            s.execute(select(m.Customer.customer_id).order_by(m.Customer.customer_id.desc()))
            .scalars()
            .first()
        )
    _refused(
        settings,
        engine,
        "fb-stranger",
        ids,
        "in_campaign_ledger",
        repr(stranger),
        feedback=[_event(0, ids, customer_id=stranger, coupon_id="", channel="")],
    )
    _refused(
        settings,
        engine,
        "fb-nomsg",
        ids,
        "delivery_of_campaign",
        repr(ids["b"]),
        feedback=[_event(0, ids, customer_id=ids["b"], event_type="open", coupon_id="", channel="")],
    )


def test_an_order_before_the_customers_signup_is_refused(sent):
    settings, engine, ids = sent
    with session_scope(engine) as s:
        customer = s.get(m.Customer, ids["a"])
        signup = pd.Timestamp(customer.signup_date, tz="UTC")
    order = dict(
        order_id="EARLY-1",
        customer_id=ids["a"],
        ts=(signup - pd.Timedelta(days=3)).strftime(ISO),
        revenue=10.0,
        n_items=1,
        coupon_id="",
    )
    _refused(
        settings,
        engine,
        "early-order",
        ids,
        "order_after_signup",
        "'EARLY-1'",
        str(signup.date()),
        orders=[order],
    )


@pytest.mark.parametrize(
    ("column", "value", "words"),
    [
        ("valid_from", "1900-01-01T00:00:00Z", "valid_from must not be before 2000-01-01"),
        ("valid_to", "2100-01-01T00:00:00Z", "valid_to must not be more than 5 years after now"),
    ],
)
def test_coupon_validity_outside_a_sane_window_is_refused(sent, column, value, words):
    settings, engine, ids = sent
    coupons = pd.read_csv(settings.raw_dir / "initial" / "coupons.csv", dtype=str, keep_default_na=False)
    coupons.loc[0, column] = value
    _refused(
        settings,
        engine,
        f"coupons-{column}",
        ids,
        "coupon_validity_window",
        words,
        repr(coupons.loc[0, "coupon_id"]),
        coupons=coupons.to_dict("records"),
    )


def test_a_campaign_log_propensity_that_contradicts_the_stored_one_is_refused(sent):
    settings, engine, ids = sent
    log = pd.read_csv(settings.raw_dir / "initial" / "campaign_log.csv", dtype=str, keep_default_na=False)
    part = log.head(3).copy()
    old = part.loc[0, "propensity"]
    part.loc[0, "propensity"] = "0.01"
    _refused(
        settings,
        engine,
        "relog",
        ids,
        "no_contradiction",
        "'propensity'",
        old,
        "0.01",
        campaign_log=part.to_dict("records"),
    )


def test_an_imported_log_with_revenue_without_a_conversion_is_refused(settings, engine, tmp_path):
    frame = pd.DataFrame(
        {
            "user": [f"u{i}" for i in range(20)],
            "variant": ["a", "holdout"] * 10,
            "bought": [0] * 20,
            "value": [0.0] * 20,
            "x": range(20),
        }
    )
    frame.loc[3, "value"] = 25.0
    path = tmp_path / "log.csv"
    frame.to_csv(path, index=False)
    spec = parse_log_spec(
        {
            "name": "rev",
            "id_column": "user",
            "treatment": {"column": "variant", "control": "holdout", "costs": {"a": 1.0}},
            "outcomes": {"conversion": "bought", "revenue": "value"},
        }
    )
    with pytest.raises(DataContractError) as err:
        import_campaign_log(engine, path, spec, settings, now=pd.Timestamp("2026-01-01", tz="UTC"))
    msg = str(err.value)
    assert "revenue_needs_conversion" in msg and "value" in msg and "'value': '25.0'" in msg
    with session_scope(engine) as s:
        assert s.get(m.CampaignLog, "rev") is None
