"""Point-in-time customer features: exact values, no leakage, signal on simulator data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mlpkg.features import CATEGORICAL_FEATURES, NUMERIC_FEATURES, build_features, feature_snapshot_id
from mlpkg.simulator import Shop, ShopConfig

pytestmark = pytest.mark.unit

AS_OF = pd.Timestamp("2025-06-01", tz="UTC")


def ts(days_before: float) -> str:
    return (AS_OF - pd.Timedelta(days=days_before)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def tiny():
    customers = pd.DataFrame(
        {
            "customer_id": ["a", "b", "c"],
            "signup_date": ["2025-01-01", "2025-05-01", "2025-07-01"],
            "region": ["north", "south", None],
            "device": ["ios", "desktop", "android"],
            "segment": ["regular", "new", "new"],
        }
    )
    events = pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(9)],
            "customer_id": ["a", "a", "a", "a", "a", "a", "b", "b", "zz"],
            "ts": [ts(1), ts(10), ts(40), ts(2), ts(3), ts(20), ts(5), ts(100), ts(1)],
            "event_type": [
                "page_view",
                "page_view",
                "page_view",
                "add_to_cart",
                "add_to_cart",
                "coupon_page_view",
                "email_open",
                "email_open",
                "page_view",
            ],
            "category": ["home", "home", "toys", "home", "home", "", "", "", "home"],
        }
    )
    orders = pd.DataFrame(
        {
            "order_id": ["o1", "o2", "o3"],
            "customer_id": ["a", "a", "b"],
            "ts": [ts(2), ts(120), ts(95)],
            "revenue": [50.0, 30.0, 20.0],
            "n_items": [1, 2, 1],
            "coupon_id": ["PCT10", "", ""],
        }
    )
    consent = pd.DataFrame(
        {
            "customer_id": ["a", "a", "a", "b", "b"],
            "channel": ["email", "sms", "push", "email", "email"],
            "opted_in": [1, 0, 1, 0, 1],
            "updated_at": [ts(100), ts(100), ts(-1), ts(50), ts(10)],
        }
    )
    return customers, events, orders, consent


def test_exact_values_on_a_tiny_shop(tiny):
    customers, events, orders, consent = tiny
    f = build_features(customers, events, orders, AS_OF, consent=consent).set_index("customer_id")
    assert list(f.index) == ["a", "b", "c"]  # every customer, in input order, unknown ids ignored
    a, b, c = f.loc["a"], f.loc["b"], f.loc["c"]
    assert a["tenure_days"] == pytest.approx(151)
    assert a["recency_days"] == pytest.approx(2)
    assert a["frequency_90d"] == 1 and a["orders_total"] == 2
    assert a["monetary_90d"] == 50 and a["avg_basket"] == 40
    assert a["coupon_order_share"] == 0.5
    assert a["page_views_30d"] == 2 and a["cart_adds_30d"] == 2 and a["coupon_page_views_30d"] == 1
    assert a["cart_abandon_rate"] == pytest.approx(1 / 3)
    assert a["days_since_last_event"] == pytest.approx(1)
    assert (a["consent_email"], a["consent_sms"], a["consent_push"]) == (1, 0, 0)  # push opt-in is later
    assert b["email_opens_90d"] == 1 and b["frequency_90d"] == 0 and b["recency_days"] == pytest.approx(95)
    assert b["consent_email"] == 1  # latest row before as_of wins
    assert c["tenure_days"] == 0 and c["recency_days"] == 365 and c["days_since_last_event"] == 365
    assert c[["orders_total", "page_views_30d", "consent_email"]].sum() == 0
    assert c["region"] == "unknown"


def test_columns_and_dtypes(tiny):
    customers, events, orders, _ = tiny
    f = build_features(customers, events, orders, AS_OF)
    assert list(f.columns) == ["customer_id", *NUMERIC_FEATURES, *CATEGORICAL_FEATURES]
    assert all(f[c].dtype == np.float64 for c in NUMERIC_FEATURES)
    assert not f[NUMERIC_FEATURES].isna().any().any()
    assert (f[["consent_email", "consent_sms", "consent_push"]] == 0).all().all()  # no consent given
    with pytest.raises(ValueError, match="duplicate"):
        build_features(pd.concat([customers, customers]), events, orders, AS_OF)


def test_rows_at_or_after_as_of_are_ignored(tiny):
    customers, events, orders, consent = tiny
    clean = build_features(customers, events, orders, AS_OF, consent=consent)
    late_events = pd.DataFrame(
        {
            "event_id": ["x1", "x2", "x3"],
            "customer_id": ["a", "b", "c"],
            "ts": [ts(0), ts(-0.5), ts(-30)],  # exactly at as_of, and after it
            "event_type": ["coupon_page_view", "add_to_cart", "page_view"],
            "category": ["", "home", "home"],
        }
    )
    late_orders = pd.DataFrame(
        {
            "order_id": ["x1", "x2"],
            "customer_id": ["a", "c"],
            "ts": [ts(0), ts(-2)],
            "revenue": [9999.0, 9999.0],
            "n_items": [5, 5],
            "coupon_id": ["PCT20", "PCT20"],
        }
    )
    late_consent = pd.DataFrame(
        {"customer_id": ["b"], "channel": ["sms"], "opted_in": [1], "updated_at": [ts(0)]}
    )
    leaky = build_features(
        customers,
        pd.concat([events, late_events]),
        pd.concat([orders, late_orders]),
        AS_OF,
        consent=pd.concat([consent, late_consent]),
    )
    pd.testing.assert_frame_equal(clean, leaky)
    assert feature_snapshot_id(clean) == feature_snapshot_id(leaky)


def test_timestamp_types_give_the_same_features(tiny):
    customers, events, orders, consent = tiny
    as_strings = build_features(customers, events, orders, AS_OF, consent=consent)
    typed_events = events.assign(ts=pd.to_datetime(events["ts"], utc=True))
    typed_orders = orders.assign(ts=pd.to_datetime(orders["ts"], utc=True).dt.tz_localize(None))
    as_datetimes = build_features(
        customers, typed_events, typed_orders, AS_OF.tz_localize(None), consent=consent
    )
    pd.testing.assert_frame_equal(as_strings, as_datetimes)


def test_snapshot_id_is_stable_and_content_sensitive(tiny):
    customers, events, orders, consent = tiny
    f = build_features(customers, events, orders, AS_OF, consent=consent)
    sid = feature_snapshot_id(f)
    assert sid == feature_snapshot_id(f.copy()) and sid.startswith("fs-")
    assert sid == feature_snapshot_id(f.iloc[::-1])  # row order does not matter
    changed = f.copy()
    changed.loc[0, "page_views_30d"] += 1
    assert feature_snapshot_id(changed) != sid


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    shop = Shop(ShopConfig(seed=21, n_customers=3000))
    paths = shop.export_batch(tmp_path_factory.mktemp("raw"))
    raw = {
        "customers": pd.read_csv(paths["customers"], keep_default_na=False),
        "consent": pd.read_csv(paths["consent"], keep_default_na=False),
        "orders": pd.read_csv(paths["orders"], keep_default_na=False),
        "events": pq.read_table(paths["events"]).to_pandas(),
    }
    feats = build_features(
        raw["customers"], raw["events"], raw["orders"], shop.campaign_sent_at, consent=raw["consent"]
    )
    return shop, feats


def test_features_carry_signal_about_hidden_types(simulated):
    shop, f = simulated
    types = pd.Series(shop.segment_truth(f["customer_id"].tolist()))
    uplift = shop.true_uplift(f["customer_id"].tolist()).mean(axis=1)

    def spearman(x, y):
        return pd.Series(x).rank().corr(pd.Series(y).rank())

    persuadable = (types == "persuadable").to_numpy(float)
    assert spearman(f["coupon_page_views_30d"], persuadable) > 0.3
    assert spearman(f["cart_abandon_rate"], persuadable) > 0.2
    assert spearman(f["coupon_page_views_30d"], uplift) > 0.3
    sure = (types == "sure_thing").to_numpy(float)
    assert spearman(f["recency_days"], sure) < -0.2
    assert spearman(f["frequency_90d"], sure) > 0.2
    means = (
        f.assign(type=types.to_numpy()).groupby("type")[["email_opens_90d", "days_since_last_event"]].mean()
    )
    assert means.loc["sleeping_dog", "email_opens_90d"] < 0.5 * means.loc["persuadable", "email_opens_90d"]
    assert (
        means.loc["lost_cause", "days_since_last_event"]
        > 3 * means.loc["sure_thing", "days_since_last_event"]
    )


def test_simulated_features_have_one_row_per_customer(simulated):
    shop, f = simulated
    assert len(f) == 3000 and f["customer_id"].is_unique
    assert f["consent_email"].mean() == pytest.approx(0.85, abs=0.04)
    assert (f["tenure_days"] > 0).all()


def test_campaign_response_features_count_only_the_window_before_as_of(tiny):
    customers, events, orders, consent = tiny
    history = pd.DataFrame(
        {
            "customer_id": ["a", "a", "a", "a", "a", "b", "b", "b", "zz"],
            "ts": [ts(30), ts(29), ts(8), ts(7), ts(-1), ts(200), ts(3), ts(0), ts(5)],
            "kind": ["delivered", "click", "delivered", "redeem", "click"]
            + ["delivered", "delivered", "click", "delivered"],
        }
    )
    f = build_features(customers, events, orders, AS_OF, campaign_history=history).set_index("customer_id")
    # a: two messages, one click (the one after as_of does not count), one redemption.
    assert f.loc["a", "campaign_messages_180d"] == 2
    assert f.loc["a", "campaign_clicks_180d"] == 1
    assert f.loc["a", "campaign_redemptions_180d"] == 1
    assert f.loc["a", "campaign_click_rate"] == pytest.approx(1 / 3)
    assert f.loc["a", "days_since_last_campaign"] == pytest.approx(8)
    # b: the message 200 days ago is outside the window but still the latest before the recent one;
    # the click at as_of itself is not before it.
    assert f.loc["b", "campaign_messages_180d"] == 1
    assert f.loc["b", "campaign_clicks_180d"] == 0
    assert f.loc["b", "days_since_last_campaign"] == pytest.approx(3)
    # c: never messaged.
    counts = ["campaign_messages_180d", "campaign_clicks_180d", "campaign_click_rate"]
    assert f.loc["c", counts].tolist() == [0, 0, 0]
    assert f.loc["c", "days_since_last_campaign"] == 365
    without = build_features(customers, events, orders, AS_OF).set_index("customer_id")
    assert (without["campaign_messages_180d"] == 0).all()
