"""The simulated shop: determinism, raw-file contract, ground-truth magnitudes, behaviour."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlpkg.simulator import HIDDEN_TYPES, Arm, Shop, ShopConfig

pytestmark = pytest.mark.unit

ISO_Z = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$"
CSV_FILES = ["customers.csv", "contacts.csv", "consent.csv", "channels.csv", "coupons.csv", "orders.csv",
             "campaign_log.csv"]


def read(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def read_typed(path):
    return pd.read_csv(path, keep_default_na=False)


@pytest.fixture(scope="module")
def small_cfg():
    return ShopConfig(seed=11, n_customers=1500)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_cfg):
    shop = Shop(small_cfg)
    out = tmp_path_factory.mktemp("batch") / "initial"
    paths = shop.export_batch(out)
    return shop, out, paths


@pytest.fixture(scope="module")
def big_shop():
    # Truth and responses are cheap: only the population is drawn, not the history.
    return Shop(ShopConfig(seed=5, n_customers=30_000))


# --- determinism and persistence ---------------------------------------------------------------


def test_same_seed_gives_identical_files(tmp_path, small_cfg, exported):
    _, first, _ = exported
    Shop(small_cfg).export_batch(tmp_path / "again")
    for name in CSV_FILES:
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert pq.read_table(first / "events.parquet").equals(
        pq.read_table(tmp_path / "again" / "events.parquet")
    )


def test_other_seed_gives_other_world(tmp_path, small_cfg, exported):
    _, first, _ = exported
    other = dataclasses.replace(small_cfg, seed=small_cfg.seed + 1)
    Shop(other).export_batch(tmp_path / "other")
    assert (first / "orders.csv").read_bytes() != (tmp_path / "other" / "orders.csv").read_bytes()


def test_config_round_trips_through_json(small_cfg):
    data = json.loads(small_cfg.to_json())
    assert ShopConfig.from_dict(data) == small_cfg
    with pytest.raises(ValueError, match="unknown ShopConfig fields"):
        ShopConfig.from_dict({**data, "bogus": 1})


def test_save_load_regenerates_identically(tmp_path, small_cfg):
    shop = Shop(small_cfg)
    shop.advance(5)
    shop.export_batch(tmp_path / "a")
    path = shop.save(tmp_path / "world")
    assert path.name == "world.json"
    loaded = Shop.load(path)
    assert loaded.now == shop.now
    assert loaded.customer_ids == shop.customer_ids
    ids = shop.customer_ids[:200]
    np.testing.assert_array_equal(loaded.true_conversion(ids), shop.true_conversion(ids))
    loaded.export_batch(tmp_path / "b", batch="initial")  # same batch name: same content
    for name in ("orders.csv", "customers.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# --- raw-file contract -------------------------------------------------------------------------


def test_api_shape(exported):
    shop, _, paths = exported
    assert len(shop.arms) == 12 and all(isinstance(a, Arm) for a in shop.arms)
    assert shop.arm_names[0] == "control" and "control" not in [a.name for a in shop.arms]
    assert all(a.name == f"{a.coupon_id}@{a.channel}" for a in shop.arms)
    assert shop.now == pd.Timestamp("2025-01-01", tz="UTC") + pd.Timedelta(days=180)
    assert shop.campaign_sent_at == shop.now - pd.Timedelta(days=10)
    assert {"customers", "contacts", "consent", "channels", "coupons", "events", "orders",
            "campaign_log"} <= set(paths)


def test_customers_consent_channels_coupons_schema(exported):
    shop, out, _ = exported
    customers = read(out / "customers.csv")
    assert list(customers.columns) == ["customer_id", "signup_date", "region", "device", "segment"]
    assert customers["customer_id"].is_unique and len(customers) == 1500
    assert customers["signup_date"].str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()
    assert set(customers["device"]) <= {"ios", "android", "desktop"}
    assert set(customers["segment"]) == {"new", "regular", "vip", "lapsed"}

    consent = read_typed(out / "consent.csv")
    assert list(consent.columns) == ["customer_id", "channel", "opted_in", "updated_at"]
    assert set(consent["opted_in"]) <= {0, 1} and consent["opted_in"].dtype == np.int64
    assert consent["updated_at"].str.match(ISO_Z).all()
    assert (pd.to_datetime(consent["updated_at"], utc=True) < shop.campaign_sent_at).all()
    assert len(consent) == 3 * len(customers)
    rates = consent.groupby("channel")["opted_in"].mean()
    assert rates["email"] == pytest.approx(0.85, abs=0.04)
    assert rates["sms"] == pytest.approx(0.50, abs=0.05)
    assert rates["push"] == pytest.approx(0.60, abs=0.05)

    channels = read_typed(out / "channels.csv")
    assert list(channels.columns) == ["channel", "send_cost", "daily_capacity"]
    assert dict(zip(channels["channel"], channels["send_cost"], strict=True)) == {
        "email": 0.01,
        "sms": 0.05,
        "push": 0.002,
    }
    assert (channels["daily_capacity"] > 0).all() and channels["daily_capacity"].dtype == np.int64

    coupons = read_typed(out / "coupons.csv")
    assert list(coupons.columns) == [
        "coupon_id",
        "kind",
        "face_value",
        "min_basket",
        "inventory",
        "valid_from",
        "valid_to",
    ]
    assert list(coupons["coupon_id"]) == ["PCT10", "PCT20", "USD5", "FREESHIP"]
    assert set(coupons["kind"]) == {"percent_off", "fixed_amount", "free_shipping"}
    assert (coupons["face_value"] > 0).all() and (coupons["inventory"] >= 0).all()
    assert coupons.set_index("coupon_id").loc["USD5", "min_basket"] == 25.0
    valid_from = pd.to_datetime(coupons["valid_from"], utc=True)
    valid_to = pd.to_datetime(coupons["valid_to"], utc=True)
    assert (valid_from <= shop.campaign_sent_at).all()
    assert (valid_to >= shop.now + pd.Timedelta(days=30)).all()


def test_events_and_orders_schema(exported):
    shop, out, _ = exported
    table = pq.read_table(out / "events.parquet")
    assert table.schema.names == ["event_id", "customer_id", "ts", "event_type", "category", "product_id"]
    assert table.schema.field("ts").type == pa.timestamp("us", "UTC")
    assert all(
        table.schema.field(c).type == pa.string()
        for c in ("event_id", "customer_id", "event_type", "category", "product_id")
    )
    events = table.to_pandas()
    assert events["event_id"].is_unique
    assert set(events["event_type"]) == {
        "page_view",
        "search",
        "add_to_cart",
        "coupon_page_view",
        "email_open",
        "sms_click",
        "push_open",
    }
    assert (events["ts"] < shop.now).all() and (events["ts"] >= shop.config.opened_at).all()
    catalog = events["event_type"].isin(["page_view", "search", "add_to_cart"])
    assert (events.loc[catalog, "category"] != "").all() and (events.loc[~catalog, "category"] == "").all()
    # Catalogue events name a product of their own category; the others name none.
    products = read(out / "products.csv").set_index("product_id")
    assert (events.loc[~catalog, "product_id"] == "").all()
    shown = events.loc[catalog]
    assert (products.loc[shown["product_id"], "category"].to_numpy() == shown["category"].to_numpy()).all()
    customers = read(out / "customers.csv")
    assert set(events["customer_id"]) <= set(customers["customer_id"])
    signup = pd.to_datetime(customers.set_index("customer_id")["signup_date"], utc=True)
    assert (events["ts"].to_numpy() >= signup.reindex(events["customer_id"]).to_numpy()).all()

    orders = read_typed(out / "orders.csv")
    assert list(orders.columns) == [
        "order_id", "customer_id", "ts", "revenue", "n_items", "coupon_id", "product_id"
    ]
    assert orders["order_id"].is_unique
    assert orders["ts"].str.match(ISO_Z).all()
    assert (pd.to_datetime(orders["ts"], utc=True) < shop.now).all()
    assert (orders["revenue"] > 0).all() and (orders["n_items"] >= 1).all()
    assert orders["n_items"].dtype == np.int64
    assert set(orders["coupon_id"]) <= {"", "PCT10", "PCT20", "USD5", "FREESHIP"}
    assert 40 <= orders["revenue"].mean() <= 80
    usd5 = orders[orders["coupon_id"] == "USD5"]
    assert (usd5["revenue"] >= 25).all()


def test_campaign_log_schema_and_randomisation(exported):
    shop, out, _ = exported
    log = read_typed(out / "campaign_log.csv")
    assert list(log.columns) == [
        "campaign_id",
        "customer_id",
        "arm",
        "coupon_id",
        "channel",
        "propensity",
        "policy",
        "sent_at",
        "opened",
        "clicked",
        "converted",
        "redeemed",
        "revenue",
        "coupon_cost",
    ]
    assert len(log) == 750 and log["customer_id"].is_unique
    assert set(log["policy"]) == {"random"}
    assert set(log["sent_at"]) == {"2025-06-20T00:00:00Z"}
    assert set(log["arm"]) == set(shop.arm_names)
    control = log["arm"] == "control"
    assert (log.loc[control, ["coupon_id", "channel"]] == "").all().all()
    treated = log[~control]
    assert (treated["arm"] == treated["coupon_id"] + "@" + treated["channel"]).all()
    for col in ("opened", "clicked", "converted", "redeemed"):
        assert set(log[col]) <= {0, 1}
    assert (log["clicked"] <= log["opened"]).all()
    assert (log["redeemed"] <= log["clicked"] * log["converted"]).all()
    assert (log.loc[log["converted"] == 0, "revenue"] == 0).all()
    assert (log.loc[log["converted"] == 1, "revenue"] > 0).all()
    assert (log.loc[log["redeemed"] == 0, "coupon_cost"] == 0).all()
    assert (log.loc[control, ["opened", "clicked", "redeemed", "coupon_cost"]] == 0).all().all()

    # Arms only on consented channels, propensity = 1 / (#eligible arms + 1).
    consent = read_typed(out / "consent.csv").pivot(index="customer_id", columns="channel", values="opted_in")
    per_customer = consent.reindex(log["customer_id"])
    n_eligible = 4 * per_customer.sum(axis=1).to_numpy()
    np.testing.assert_allclose(log["propensity"], 1.0 / (n_eligible + 1))
    ok = [
        per_customer.loc[c, ch] == 1 for c, ch in zip(treated["customer_id"], treated["channel"], strict=True)
    ]
    assert all(ok)


def test_campaign_outcomes_are_in_the_order_history(exported):
    shop, out, _ = exported
    log = read_typed(out / "campaign_log.csv")
    orders = read_typed(out / "orders.csv")
    ts = pd.to_datetime(orders["ts"], utc=True)
    window = orders[(ts >= shop.campaign_sent_at) & (ts < shop.campaign_sent_at + pd.Timedelta(days=7))]
    in_window = window[window["customer_id"].isin(log["customer_id"])]
    assert sorted(in_window["customer_id"]) == sorted(log.loc[log["converted"] == 1, "customer_id"])
    merged = in_window.merge(log, on="customer_id", suffixes=("_order", "_log"))
    np.testing.assert_allclose(merged["revenue_order"], merged["revenue_log"])
    redeemed = merged["redeemed"] == 1
    assert (merged.loc[redeemed, "coupon_id_order"] == merged.loc[redeemed, "coupon_id_log"]).all()
    assert (merged.loc[~redeemed, "coupon_id_order"] == "").all()


# --- ground-truth magnitudes -------------------------------------------------------------------


def test_truth_magnitudes(big_shop):
    ids = big_shop.customer_ids
    conv = big_shop.true_conversion(ids)
    assert conv.shape == (len(ids), 13)
    assert ((conv >= 0) & (conv <= 1)).all()
    assert 0.01 <= conv[:, 0].mean() <= 0.05
    uplift = conv[:, 1:] - conv[:, :1]
    assert 0.003 <= uplift.mean() <= 0.03
    assert (uplift < -0.001).any(axis=1).mean() >= 0.15

    types = big_shop.segment_truth(ids)
    shares = {t: (types == t).mean() for t in HIDDEN_TYPES}
    assert shares == pytest.approx(
        {"persuadable": 0.25, "sure_thing": 0.15, "lost_cause": 0.40, "sleeping_dog": 0.20}, abs=0.02
    )
    by_type = {t: uplift[types == t].mean() for t in HIDDEN_TYPES}
    assert by_type["persuadable"] > by_type["sure_thing"] > by_type["sleeping_dog"]
    assert by_type["sleeping_dog"] < 0
    assert abs(by_type["sure_thing"]) < 0.005 and abs(by_type["lost_cause"]) < 0.002
    assert 0.10 <= conv[types == "sure_thing", 0].mean() <= 0.22
    assert conv[types == "lost_cause", 0].mean() < 0.006

    # Targeting the top 20% by true best uplift captures far more than a random 20%.
    best = uplift.max(axis=1)
    top = np.sort(best)[::-1][: len(best) // 5].sum()
    assert top > 3 * 0.2 * best.sum()


def test_truth_revenue_cost_and_consent(big_shop):
    ids = big_shop.customer_ids[:5000]
    revenue = big_shop.true_revenue(ids)
    cost = big_shop.true_coupon_cost(ids)
    assert 50 <= revenue[:, 0].mean() <= 70 and (revenue > 0).all()
    assert (cost[:, 0] == 0).all()
    names = big_shop.arm_names
    reachable = big_shop.deliverable(ids)
    # Undeliverable arms (no consent) are exactly control.
    conv = big_shop.true_conversion(ids)
    blocked = ~reachable
    np.testing.assert_allclose(conv[:, 1:][blocked], np.broadcast_to(conv[:, :1], blocked.shape)[blocked])
    usd5 = names.index("USD5@email")
    assert np.allclose(cost[reachable[:, usd5 - 1], usd5], 5.0)
    free = names.index("FREESHIP@email")
    assert np.allclose(cost[reachable[:, free - 1], free], 4.99)
    pct10, pct20 = names.index("PCT10@email"), names.index("PCT20@email")
    ok = reachable[:, pct10 - 1]
    np.testing.assert_allclose(cost[ok, pct20], 2 * cost[ok, pct10] * 1.08 / 1.04, rtol=1e-9)
    red = big_shop.true_redemption(ids)
    assert ((red >= 0) & (red <= 1)).all() and (red[:, 0] == 0).all()


def test_unknown_ids_and_arms_are_rejected(big_shop):
    with pytest.raises(KeyError):
        big_shop.true_conversion(["nope"])
    with pytest.raises(ValueError, match="unknown arm"):
        big_shop.oracle_value(pd.DataFrame({"customer_id": ["C0000001"], "arm": ["GOLD@email"]}))
    with pytest.raises(ValueError, match="more than once"):
        big_shop.oracle_value(pd.DataFrame({"customer_id": ["C0000001"] * 2, "arm": ["control"] * 2}))


# --- behaviour ---------------------------------------------------------------------------------


def _random_allocation(shop, ids, seed):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"customer_id": ids, "arm": rng.choice(shop.arm_names, len(ids))})


def test_respond_is_random_and_seeded(big_shop):
    ids = big_shop.customer_ids[:3000]
    alloc = _random_allocation(big_shop, ids, 0)
    a = big_shop.respond(ids, alloc, "cmp", big_shop.now, seed=1)
    b = big_shop.respond(ids, alloc, "cmp", big_shop.now, seed=1)
    c = big_shop.respond(ids, alloc, "cmp", big_shop.now, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert (
        not a[a["event_type"] == "order"]["customer_id"]
        .reset_index(drop=True)
        .equals(c[c["event_type"] == "order"]["customer_id"].reset_index(drop=True))
    )


def test_respond_frequencies_match_truth(big_shop):
    ids = np.array(big_shop.customer_ids)
    arm = "PCT20@email"
    reach = big_shop.deliverable(ids)[:, big_shop.arm_names.index(arm) - 1]
    treated = ids[reach]
    alloc = pd.DataFrame({"customer_id": treated, "arm": arm})
    conv = big_shop.true_conversion(treated)
    for column, seed in ((big_shop.arm_names.index(arm), 3), (0, 4)):
        allocation = alloc if column else alloc.iloc[:0]
        fb = big_shop.respond(treated, allocation, "cmp", big_shop.now, seed=seed)
        observed = fb.loc[fb["event_type"] == "order", "customer_id"].nunique()
        expected = conv[:, column].sum()
        assert abs(observed - expected) < 4 * np.sqrt(expected), (column, observed, expected)


def test_feedback_rules_and_file(tmp_path, big_shop):
    ids = big_shop.customer_ids[:8000]
    alloc = _random_allocation(big_shop, ids[:6000], 5)
    fb = big_shop.respond(ids, alloc, "cmp-1", big_shop.now, seed=9)
    assert list(fb.columns) == [
        "event_id",
        "campaign_id",
        "customer_id",
        "event_type",
        "ts",
        "coupon_id",
        "channel",
        "order_id",
        "revenue",
    ]
    assert fb["event_id"].is_unique and (fb["campaign_id"] == "cmp-1").all()
    assert set(fb["event_type"]) == {"delivered", "open", "click", "redeem", "order"}
    assert (fb["ts"] >= big_shop.now).all() and (fb["ts"] < big_shop.now + pd.Timedelta(days=7)).all()
    assert (fb.loc[fb["event_type"] != "order", "revenue"] == 0).all()
    orders = fb[fb["event_type"] == "order"]
    assert (orders["revenue"] > 0).all() and orders["order_id"].is_unique
    assert orders["customer_id"].is_unique  # at most one order per customer in the window

    arm_of = alloc.set_index("customer_id")["arm"]
    by_type = {
        t: set(fb.loc[fb["event_type"] == t, "customer_id"])
        for t in ("delivered", "click", "redeem", "order", "open")
    }
    treated = set(arm_of[arm_of != "control"].index)
    assert by_type["delivered"] <= treated
    assert by_type["open"] <= by_type["delivered"] and by_type["click"] <= by_type["open"]
    assert by_type["redeem"] <= by_type["click"] & by_type["order"]
    redeem = fb[fb["event_type"] == "redeem"].merge(orders[["order_id", "revenue"]], on="order_id")
    usd5 = redeem[redeem["coupon_id"] == "USD5"]
    assert (usd5["revenue_y"] >= 25).all()
    # Delivered only through consented channels.
    delivered = fb[fb["event_type"] == "delivered"]
    reach = big_shop.deliverable(delivered["customer_id"].tolist())
    cols = [big_shop.arm_names.index(a) - 1 for a in arm_of.reindex(delivered["customer_id"])]
    assert reach[np.arange(len(cols)), cols].all()
    # Untreated customers order too, without coupons.
    untreated_orders = orders[~orders["customer_id"].isin(list(treated))]
    assert len(untreated_orders) > 0 and (untreated_orders["coupon_id"] == "").all()

    path = big_shop.write_feedback(fb, tmp_path)
    back = read_typed(path)
    assert list(back.columns) == list(fb.columns) and len(back) == len(fb)
    assert back["ts"].str.match(ISO_Z).all()


def test_oracle_value_matches_simulated_outcomes(big_shop):
    ids = big_shop.customer_ids
    alloc = _random_allocation(big_shop, ids, 7)
    oracle = big_shop.oracle_value(alloc)
    assert set(oracle) >= {
        "incremental_conversions",
        "incremental_revenue",
        "expected_coupon_cost",
        "send_cost",
        "incremental_profit",
    }
    assert oracle["incremental_profit"] == pytest.approx(
        0.35 * oracle["incremental_revenue"] - oracle["expected_coupon_cost"] - oracle["send_cost"]
    )
    reps = 4
    inc, cost = [], []
    for s in range(reps):
        treated = big_shop.respond(ids, alloc, "t", big_shop.now, seed=100 + s)
        control = big_shop.respond(ids, alloc.iloc[:0], "c", big_shop.now, seed=200 + s)
        inc.append((treated["event_type"] == "order").sum() - (control["event_type"] == "order").sum())
        redeemed = treated.loc[treated["event_type"] == "redeem", ["order_id", "coupon_id"]]
        orders = treated.loc[treated["event_type"] == "order", ["order_id", "revenue"]]
        spent = redeemed.merge(orders, on="order_id")
        kind_cost = np.where(
            spent["coupon_id"] == "PCT10",
            0.10 * spent["revenue"],
            np.where(
                spent["coupon_id"] == "PCT20",
                0.20 * spent["revenue"],
                np.where(spent["coupon_id"] == "USD5", 5.0, 4.99),
            ),
        )
        cost.append(kind_cost.sum())
    sd_inc = np.sqrt(2 * 0.04 * len(ids) / reps)
    assert abs(np.mean(inc) - oracle["incremental_conversions"]) < 4 * sd_inc
    assert np.mean(cost) == pytest.approx(oracle["expected_coupon_cost"], rel=0.1)
    all_control = big_shop.oracle_value(alloc.assign(arm="control"))
    assert all_control["incremental_conversions"] == 0 and all_control["send_cost"] == 0


def test_oracle_prefers_persuadables(big_shop):
    ids = np.array(big_shop.customer_ids)
    types = big_shop.segment_truth(ids)
    reach = big_shop.deliverable(ids)[:, 0]
    for kind in ("persuadable", "sleeping_dog"):
        pick = ids[(types == kind) & reach][:1000]
        value = big_shop.oracle_value(pd.DataFrame({"customer_id": pick, "arm": "PCT10@email"}))
        if kind == "persuadable":
            assert value["incremental_profit"] > 0
        else:
            assert value["incremental_conversions"] < 0 and value["incremental_profit"] < 0


# --- advancing the world -------------------------------------------------------------------------


def test_advance_exports_only_new_rows(tmp_path, small_cfg):
    shop = Shop(small_cfg)
    first = shop.export_batch(tmp_path / "initial")
    before = shop.now
    shop.advance(14)
    assert shop.now == before + pd.Timedelta(days=14)
    second = shop.export_batch(tmp_path / "round-2", batch="round-2")
    assert "campaign_log" not in second
    events = pq.read_table(second["events"]).to_pandas()
    orders = read_typed(second["orders"])
    assert len(events) > 0 and len(orders) > 0
    assert (events["ts"] >= before).all() and (events["ts"] < shop.now).all()
    ts = pd.to_datetime(orders["ts"], utc=True)
    assert (ts >= before).all() and (ts < shop.now).all()
    old_events = pq.read_table(first["events"]).to_pandas()
    assert not set(events["event_id"]) & set(old_events["event_id"])
    assert not set(orders["order_id"]) & set(read_typed(first["orders"])["order_id"])
    customers = read(second["customers"])
    assert len(customers) >= small_cfg.n_customers
    assert set(read(first["customers"])["customer_id"]) <= set(customers["customer_id"])
    assert set(orders["customer_id"]) <= set(customers["customer_id"])
    # New customers have truth too.
    assert shop.true_conversion(customers["customer_id"].tolist()).shape == (len(customers), 13)
    # Nothing new since the last export: empty files with the right columns.
    third = shop.export_batch(tmp_path / "round-3", batch="round-3")
    assert len(read_typed(third["orders"])) == 0
    assert pq.read_table(third["events"]).num_rows == 0
    assert list(read_typed(third["orders"]).columns) == list(orders.columns)
